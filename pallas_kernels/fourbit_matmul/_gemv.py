"""Small-M forward kernel: ``y = x @ dequant(W).T`` for a few rows of ``x``, on the FMA units.

For ``M`` up to a handful of rows the product is bound by reading the packed weight. Each
program owns ``block_n`` weight rows (and, with split-K, one slice of the reduction) and
streams its packed bytes exactly once, decoding them in registers (:class:`._decode.Decoder`:
code lookup, absmax decoded from its double quantization) and multiplying them with the
matching columns of ``x`` in float32. Nothing but the output (or the split-K partial sums)
is written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.fourbit_matmul import _decode
from pallas_kernels.fourbit_matmul._tuning import Config

__all__ = ["gemv", "KERNEL_NAME"]

KERNEL_NAME = "jaxquant_matmul_4bit_gemv"


def _kernel(*refs, layout: _decode.Layout, m: int, block_n: int, steps: int, nested: bool,
            has_bias: bool, mask_rows: bool, split: bool, interpret: bool):
  x_ref, *rest = refs
  w, rest = _decode.split_refs(rest, nested)
  bias_ref = rest[0] if has_bias else None
  o_ref = rest[-1]
  pid_n, pid_s = pl.program_id(0), pl.program_id(1)
  r0 = pid_n * block_n
  rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (block_n,), 0)
  row_mask = rows < layout.n if mask_rows else None
  bk = layout.block_k
  decoder = _decode.Decoder.create(w, layout, x_ref.dtype, interpret)

  def body(t, accs):
    step = pid_s * steps + t
    wt = decoder.tile(r0, block_n, step, row_mask).astype(jnp.float32)
    out = []
    for i in range(m):
      xt = x_ref[jnp.int32(i), pl.ds(step * bk, bk)].astype(jnp.float32)
      out.append(accs[i] + wt * xt[None, :])
    return tuple(out)

  init = tuple(jnp.zeros((block_n, bk), jnp.float32) for _ in range(m))
  accs = jax.lax.fori_loop(0, steps, body, init)
  for i in range(m):
    y = accs[i].sum(axis=1)
    if split:
      dest = o_ref.at[pid_s, jnp.int32(i), pl.ds(r0, block_n)]
    else:
      if has_bias:
        y = y + _decode.masked_load(bias_ref.at[pl.ds(r0, block_n)], row_mask).astype(
            jnp.float32)
      y = y.astype(o_ref.dtype)
      dest = o_ref.at[jnp.int32(i), pl.ds(r0, block_n)]
    if row_mask is None:
      dest[...] = y
    else:
      pltriton.store(dest, y, mask=row_mask)


def gemv(x: jax.Array, weights: tuple[jax.Array, ...], bias: jax.Array | None, *,
         layout: _decode.Layout, config: Config, interpret: bool = False,
         poison: bool = False) -> jax.Array:
  """``x (m, k) @ W.T (+ bias)`` in ``x.dtype``.

  Args:
    x: ``(m, k)`` float32/float16/bfloat16, ``m`` small (rows are unrolled in the kernel).
    weights: :func:`_decode.operands` for ``layout``.
    bias: ``(n,)`` or ``None``.
    layout: the weight layout; ``layout.block_k == config.block_k``.
    config: a ``"gemv"`` :class:`Config`.
    interpret: run the kernel in the Pallas interpreter.
    poison: fill the output with NaN first (tests: every element must be written).

  Returns:
    ``(m, n)`` in ``x.dtype``.
  """
  m, k = x.shape
  n, bn, s = layout.n, config.block_n, config.split_k
  steps = k // config.block_k // s
  split = s > 1
  kernel = functools.partial(
      _kernel, layout=layout, m=m, block_n=bn, steps=steps, nested=len(weights) == 7,
      has_bias=bias is not None, mask_rows=n % bn != 0, split=split, interpret=interpret)
  out = jax.ShapeDtypeStruct((s, m, n) if split else (m, n),
                             jnp.float32 if split else x.dtype)
  args = (x, *weights)
  args += (bias,) if bias is not None else ()
  y = _decode.launch(kernel, out, (pl.cdiv(n, bn), s), args, name=KERNEL_NAME,
                     num_warps=config.num_warps, num_stages=config.num_stages,
                     interpret=interpret, poison=poison)
  return _decode.reduce_partials(y, bias, x.dtype) if split else y
