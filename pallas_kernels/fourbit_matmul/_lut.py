"""Register-only 4-bit decode for bf16/fp16 activations: a 16-entry lookup by byte permutes.

A Triton gather from the 16-entry code is one global (L1) load per element, and inside a
pipelined loop Triton turns it into an asynchronous copy through shared memory: it made the
GEMM kernels decode-bound. Here the code, rounded to the activation dtype, lives in eight
32-bit registers (the low bytes of the 16 values in four, the high bytes in four) and one
inline-PTX block decodes four packed bytes (eight weights) with ``prmt`` byte permutes:

1. the selector of each byte permute is a nibble; its three low bits pick one of eight table
   bytes, so entries 0-7 and 8-15 are looked up separately and merged (``lop3``) with a
   byte mask built from each nibble's high bit (a ``prmt`` in sign-replicate mode);
2. low and high bytes are interleaved into four ``bf16x2``/``f16x2`` words, in the order
   of the weights (the first element of a byte is its high nibble);
3. each word is multiplied by the block's absmax, rounded to the dtype (``mul.rn``).

So a weight is ``dtype(dtype(code[q]) * dtype(absmax))``; the reference rounds once,
``dtype(code[q] * absmax)``: the two extra roundings can move a weight by one unit in the last
place of ``dtype`` (e.g. 2**-6 for a bf16 weight near 2), errors of the size the product with
16-bit activations makes anyway, within the kernel tests' tolerances. About 30
instructions per eight weights, all in registers. In interpret mode the same arithmetic runs
as jnp (the interpreter cannot run PTX).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

__all__ = ["code_tables", "decode", "FAST_DTYPES"]

FAST_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# Operands: $0-$3 the four output words; $4, $5 the packed bytes, each byte twice (the
# input tensor has one element per weight); $6 + 8 i the table word i (each argument is
# passed once per packed element: 8 copies); $70 the absmax pair.
_ASM = """{
.reg .b32 w, t, s, c, m, q, a, b, la, ha, lb, hb;
prmt.b32 w, $4, $5, 0x6420;
mov.b32 c, 0x80808080;
and.b32 s, w, 0x7777;
prmt.b32 m, c, c, w;
shl.b32 q, m, 1;
lop3.b32 m, q, m, 0x7F7F7F7F, 0xD8;
prmt.b32 a, $6, $14, s;
prmt.b32 b, $22, $30, s;
lop3.b32 la, a, b, m, 0xD8;
prmt.b32 a, $38, $46, s;
prmt.b32 b, $54, $62, s;
lop3.b32 ha, a, b, m, 0xD8;
shr.b32 t, w, 16;
and.b32 s, t, 0x7777;
prmt.b32 m, c, c, t;
shl.b32 q, m, 1;
lop3.b32 m, q, m, 0x7F7F7F7F, 0xD8;
prmt.b32 a, $6, $14, s;
prmt.b32 b, $22, $30, s;
lop3.b32 lb, a, b, m, 0xD8;
prmt.b32 a, $38, $46, s;
prmt.b32 b, $54, $62, s;
lop3.b32 hb, a, b, m, 0xD8;
prmt.b32 a, la, ha, 0x4051;
mul.rn.{T} $0, a, $70;
prmt.b32 a, la, ha, 0x6273;
mul.rn.{T} $1, a, $70;
prmt.b32 a, lb, hb, 0x4051;
mul.rn.{T} $2, a, $70;
prmt.b32 a, lb, hb, 0x6273;
mul.rn.{T} $3, a, $70;
}"""
_CONSTRAINTS = ",".join(["=r"] * 4 + ["r"] * (2 + 8 * 8 + 4))


def code_tables(code: jax.Array, dtype) -> jax.Array:
  """``uint32 (8,)``: bytes ``j`` of words ``0-3`` are the low bytes of ``dtype(code[4 i + j])``,
  of words ``4-7`` their high bytes."""
  bits = jax.lax.bitcast_convert_type(code.reshape(16).astype(dtype), jnp.uint16)
  bits = bits.astype(jnp.uint32)
  planes = jnp.concatenate([bits & 0xFF, bits >> 8]).reshape(8, 4)
  shifts = jnp.arange(4, dtype=jnp.uint32) * 8
  return jnp.sum(planes << shifts[None, :], axis=1, dtype=jnp.uint32)


def decode(packed: jax.Array, scale: jax.Array, tables, code_ref, dtype, interpret: bool):
  """Weights ``(rows, nb, 2 h)`` in ``dtype`` from packed bytes ``(rows, nb, h)`` uint8 and the
  float32 absmax ``(rows, nb)`` of each sub-block.

  Args:
    packed: packed bytes, natural order (element ``2 j`` in the high nibble of byte ``j``).
    scale: absmax per sub-block.
    tables: the eight words of :func:`code_tables` as scalars (GPU path).
    code_ref: the float32 code (interpret path).
    dtype: bfloat16 or float16.
    interpret: emulate with jnp instead of PTX.
  """
  rows, nb, h = packed.shape
  scale = scale.astype(dtype)[:, :, None]
  if interpret:
    code = code_ref[...].astype(dtype).astype(jnp.float32)
    hi = code[(packed >> 4).astype(jnp.int32)]
    lo = code[(packed & 0xF).astype(jnp.int32)]
    pairs = jnp.stack([hi, lo], axis=-1).reshape(rows, nb, 2 * h)
    return (pairs * scale.astype(jnp.float32)).astype(dtype)
  doubled = jnp.stack([packed, packed], axis=-1).reshape(rows, nb, 2 * h)
  args = [doubled] + [jnp.broadcast_to(t, doubled.shape) for t in tables]
  args.append(jnp.broadcast_to(scale, doubled.shape))
  kind = "bf16x2" if jnp.dtype(dtype) == jnp.bfloat16 else "f16x2"
  [out] = pltriton.elementwise_inline_asm(
      _ASM.replace("{T}", kind), args=args, constraints=_CONSTRAINTS, pack=8,
      result_shape_dtypes=[jax.ShapeDtypeStruct(doubled.shape, dtype)])
  return out
