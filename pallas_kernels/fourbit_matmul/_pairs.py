"""Even/odd register decode of 4-bit weights for bf16/fp16 activations, and the fused GEMV step.

Each packed byte holds two consecutive weights: ``k = 2 j`` (even) in the high nibble and
``k = 2 j + 1`` (odd) in the low one. Instead of interleaving them back into natural order,
the kernels here keep the two halves apart and split ``x`` the same way outside the kernel
(:func:`split_x`): ``x @ W.T = x_even @ W_even.T + x_odd @ W_odd.T``. Four packed bytes are one
32-bit register and decode, with no byte shuffling on input, to two ``bf16x2``/``f16x2``
words of even and two of odd weights.

The 16-entry code lives in eight 32-bit registers (:func:`._lut.code_tables`: low bytes of
entries 0-7, 8-15, high bytes of 0-7, 8-15). For four nibbles at once, one ``prmt`` looks up
the low bytes of entries 0-7 and one those of 8-15, with the nibbles' three low bits as
selectors; a third ``prmt`` picks between them by each nibble's high bit; the same for the
high bytes; two more ``prmt`` build the 16-bit pairs. About 23 instructions per 8 weights.

:func:`decode` returns the even/odd tiles scaled by the absmax (rounded to the dtype, as
:mod:`._lut` does), for the tensor-core kernels. :func:`dot_step` is the small-M step: for each
row of ``x`` it multiplies the decoded, unscaled code pairs with ``x``'s even/odd pairs in
packed ``bf16x2``/``f16x2`` arithmetic (a multiply and an FMA per two bytes, so each byte's two
products are summed in the activation dtype), widens the sums to float32 and applies the
absmax with a float32 FMA per byte into a float32 accumulator: about 35 instructions per 8
weights at ``M = 1``, 12 more per extra row. The weights are thus ``dtype(code[q])`` times a
float32 absmax, with pairs of products rounded to the dtype: differences from the reference's
``dtype(code[q] * absmax)`` products are of the order of the dtype's rounding.

Both blocks are elementwise in the packed bytes (each output element depends only on the
inputs at its own position), so they are correct however Triton groups the four elements of
one instance. (A first version summed the four bytes of an instance into one accumulator, 4
fewer instructions per 8 weights and about 15 % faster at ``M = 1``; it gave wrong results on
the GPU for a tile of fewer than 4 bytes per thread, where an instance's elements are not 4
consecutive bytes of one row.)
``tests/kernels/test_fourbit_matmul_asm.py`` checks the PTX text against these semantics
with a small PTX interpreter.

In interpret mode the same arithmetic runs as jnp.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

__all__ = ["split_x", "decode", "dot_step", "decode_asm", "dot_asm"]

_PACK = 4  # packed bytes per asm instance (one 32-bit register, 8 weights)


def _make_multi_asm():
  """``pltriton.elementwise_inline_asm`` with several results.

  jax 0.10/0.11 lower that primitive as if it had one result (the op's result list is wrapped
  in a list), so a block with several outputs fails to lower; this private primitive lowers
  to the same Triton op and returns each result.
  """
  from jax._src import core as jax_core  # pylint: disable=import-outside-toplevel
  from jax._src.lib.triton import dialect as tt_dialect  # pylint: disable=import-outside-toplevel
  from jax._src.pallas.triton import lowering  # pylint: disable=import-outside-toplevel
  from jax.interpreters import mlir  # pylint: disable=import-outside-toplevel

  prim = jax_core.Primitive("jaxquant_inline_asm")
  prim.multiple_results = True

  @prim.def_abstract_eval
  def _abstract(*avals, result_shape_dtypes, **kwargs):
    del avals, kwargs
    return [jax_core.ShapedArray(r.shape, r.dtype) for r in result_shape_dtypes]

  @lowering.register_lowering(prim)
  def _lower(ctx, *args, asm, constraints, pack, result_shape_dtypes):
    del result_shape_dtypes
    types = [mlir.aval_to_ir_type(ctx.context.mlir_ctx, a) for a in ctx.avals_out]
    out = tt_dialect.elementwise_inline_asm(types, asm, constraints=constraints, pure=True,
                                            packed_element=pack, args=args)
    return list(out) if len(types) > 1 else [out]

  def call(asm, *, args, constraints, pack, result_shape_dtypes):
    if any(a.shape != args[0].shape for a in args):
      raise ValueError("all arguments of the inline asm must have one shape")
    return prim.bind(*args, asm=asm, constraints=constraints, pack=pack,
                     result_shape_dtypes=tuple(result_shape_dtypes))
  return call


try:
  _inline_asm = _make_multi_asm()
  # Whether blocks with several results lower on this jax; without it the tuning never picks
  # the pair decode (``_tuning``), so another jax layout costs speed, not a lowering error.
  MULTI_RESULT_ASM = True
except (ImportError, AttributeError):  # another jax layout: one result per block only
  _inline_asm = pltriton.elementwise_inline_asm
  MULTI_RESULT_ASM = False


def split_x(x: jax.Array) -> jax.Array:
  """``(2, m, k / 2)``: the even then the odd columns of ``x (m, k)``."""
  m, k = x.shape
  return jnp.moveaxis(x.reshape(m, k // 2, 2), 2, 0)


def _lookup(p: str, t: Sequence[str]) -> str:
  """PTX decoding the 8 nibbles of register ``p`` into the code's 16-bit values: ``la``/``ha``
  low/high bytes of nibbles 0-3 (byte ``i`` = nibble ``i``), ``lb``/``hb`` of nibbles 4-7.
  Nibble ``2 i + 1`` is the even weight of byte ``i``, nibble ``2 i`` the odd one."""
  def half(s_src: str, t_shift: int, lo: str, hi: str) -> str:
    return f"""
and.b32 s, {s_src}, 0x7777;
shr.b32 t, {p}, {t_shift};
lop3.b32 t, t, 0x4444, 0x3210, 0xEA;
prmt.b32 a, {t[0]}, {t[1]}, s;
prmt.b32 b, {t[2]}, {t[3]}, s;
prmt.b32 {lo}, a, b, t;
prmt.b32 a, {t[4]}, {t[5]}, s;
prmt.b32 b, {t[6]}, {t[7]}, s;
prmt.b32 {hi}, a, b, t;"""
  return (".reg .b32 s, t, a, b, la, ha, lb, hb, e0, e1, o0, o1, q, r, s01, s23;\n"
          ".reg .f32 f0, f1, f2, f3;\n.reg .b16 h0, h1;"
          + half(p, 1, "la", "ha") + f"\nshr.b32 s, {p}, 16;" + half("s", 17, "lb", "hb")
          + """
prmt.b32 e0, la, ha, 0x7351;
prmt.b32 o0, la, ha, 0x6240;
prmt.b32 e1, lb, hb, 0x7351;
prmt.b32 o1, lb, hb, 0x6240;""")


def _kind(dtype) -> str:
  return "bf16x2" if jnp.dtype(dtype) == jnp.bfloat16 else "f16x2"


def _operands(first: int, counts: Sequence[int]) -> list[list[str]]:
  out, i = [], first
  for c in counts:
    out.append([f"${j}" for j in range(i, i + c)])
    i += c
  return out


def _code(packed, code_ref, dtype):
  code = code_ref[...].astype(dtype).astype(jnp.float32)
  return code[(packed >> 4).astype(jnp.int32)], code[(packed & 0xF).astype(jnp.int32)]


def decode_asm(dtype) -> tuple[str, str]:
  """PTX and constraints of :func:`decode`'s block (operands: even, odd outputs; packed
  bytes; 4 absmax; 8 x 4 table words)."""
  _, [p], s, tab = _operands(0, (4, 1, _PACK, 8 * _PACK))
  kind = _kind(dtype)
  asm = "{\n" + _lookup(p, tab[::_PACK]) + f"""
cvt.rn.{kind}.f32 s01, {s[1]}, {s[0]};
cvt.rn.{kind}.f32 s23, {s[3]}, {s[2]};
mul.rn.{kind} $0, e0, s01;
mul.rn.{kind} $1, e1, s23;
mul.rn.{kind} $2, o0, s01;
mul.rn.{kind} $3, o1, s23;
}}"""
  return asm, ",".join(["=r"] * 4 + ["r"] + ["f"] * _PACK + ["r"] * (8 * _PACK))


def decode(packed: jax.Array, scale: jax.Array, tables, code_ref, dtype,
           interpret: bool) -> tuple[jax.Array, jax.Array]:
  """Even and odd weights ``(rows, nb, h)`` in ``dtype`` from packed bytes ``(rows, nb, h)``
  uint8 and the float32 absmax ``(rows, nb)``: ``dtype(dtype(code[q]) * dtype(absmax))``.

  Args:
    packed: packed bytes (weight ``2 j`` in the high nibble of byte ``j``).
    scale: absmax per sub-block.
    tables: the eight words of :func:`._lut.code_tables` as scalars (GPU path).
    code_ref: the float32 code (interpret path).
    dtype: bfloat16 or float16.
    interpret: emulate with jnp instead of PTX.
  """
  scale = jnp.broadcast_to(scale.reshape(scale.shape + (1,) * (packed.ndim - 2)), packed.shape)
  if interpret:
    s = scale.astype(dtype).astype(jnp.float32)
    return tuple((c * s).astype(dtype) for c in _code(packed, code_ref, dtype))
  asm, constraints = decode_asm(dtype)
  args = [packed, scale] + [jnp.broadcast_to(t, packed.shape) for t in tables]
  out = jax.ShapeDtypeStruct(packed.shape, dtype)
  even, odd = _inline_asm(
      asm, args=args, constraints=constraints, pack=_PACK, result_shape_dtypes=[out, out])
  return even, odd


def dot_asm(dtype, m: int) -> tuple[str, str]:
  """PTX and constraints of :func:`dot_step`'s block for ``m`` rows of ``x`` (operands:
  ``m`` x 4 accumulator outputs; packed bytes; 4 absmax; 8 x 4 table words; per row: 2 + 2
  registers of even/odd ``x`` pairs and 4 accumulators)."""
  ops = _operands(0, [_PACK] * m + [1, _PACK, 8 * _PACK] + [2, 2, _PACK] * m)
  outs, (p,), s, tab, rows = ops[:m], ops[m], ops[m + 1], ops[m + 2], ops[m + 3:]
  kind = _kind(dtype)

  def widen(src, lo, hi):  # the two 16-bit lanes of src as float32
    if kind == "bf16x2":
      return f"shl.b32 {lo}, {src}, 16;\nand.b32 {hi}, {src}, 0xFFFF0000;"
    return f"mov.b32 {{h0, h1}}, {src};\ncvt.f32.f16 {lo}, h0;\ncvt.f32.f16 {hi}, h1;"

  body = ["{", _lookup(p, tab[::_PACK])]
  for i in range(m):
    xe, xo, acc = rows[3 * i], rows[3 * i + 1], rows[3 * i + 2]
    out = outs[i]
    body.append(f"""mul.rn.{kind} q, e0, {xe[0]};
fma.rn.{kind} q, o0, {xo[0]}, q;
mul.rn.{kind} r, e1, {xe[1]};
fma.rn.{kind} r, o1, {xo[1]}, r;
{widen("q", "f0", "f1")}
{widen("r", "f2", "f3")}""")
    body += [f"fma.rn.f32 {out[j]}, f{j}, {s[j]}, {acc[j]};" for j in range(_PACK)]
  body.append("}")
  constraints = ",".join(["=f"] * (_PACK * m) + ["r"] + ["f"] * _PACK + ["r"] * (8 * _PACK)
                         + (["r"] * 4 + ["f"] * _PACK) * m)
  return "\n".join(body), constraints


def dot_step(packed: jax.Array, scale: jax.Array, xs: Sequence[tuple[jax.Array, jax.Array]],
             accs: Sequence[jax.Array], tables, code_ref, dtype,
             interpret: bool) -> list[jax.Array]:
  """One reduction step of the small-M kernel, per packed byte (element): ``accs[i] +=
  absmax * (code[hi] * x_even_i + code[lo] * x_odd_i)``, the two products summed in ``dtype``.

  Args:
    packed: ``(rows, nb, ...)`` uint8 packed bytes (the trailing dims span one sub-block).
    scale: ``(rows, nb)`` float32 absmax per sub-block.
    xs: per row of ``x``, its even and odd columns for this step, ``(nb, ...)`` in ``dtype``.
    accs: per row of ``x``, the float32 accumulator, shaped as ``packed``.
    tables, code_ref, dtype, interpret: as :func:`decode`.

  Returns:
    The updated accumulators.
  """
  shape = packed.shape
  scale = jnp.broadcast_to(scale.reshape(scale.shape + (1,) * (len(shape) - 2)), shape)
  xs = [(jnp.broadcast_to(xe[None], shape), jnp.broadcast_to(xo[None], shape))
        for xe, xo in xs]
  if interpret:
    ce, co = _code(packed, code_ref, dtype)
    return [acc + scale * (ce * xe.astype(jnp.float32) + co * xo.astype(jnp.float32))
            for (xe, xo), acc in zip(xs, accs)]
  asm, constraints = dot_asm(dtype, len(accs))
  args = [packed, scale] + [jnp.broadcast_to(t, shape) for t in tables]
  for (xe, xo), acc in zip(xs, accs):
    args += [xe, xo, acc]
  out = jax.ShapeDtypeStruct(shape, jnp.float32)
  return list(_inline_asm(asm, args=args, constraints=constraints, pack=_PACK,
                          result_shape_dtypes=[out] * len(accs)))
