"""Small-M forward kernel: ``y = x @ dequant(W).T`` for a few rows of ``x``, on the FMA units.

For ``M`` up to a handful of rows the product is bound by reading the packed weight. Each
program owns ``block_n`` weight rows (and, with split-K, one slice of the reduction) and
streams its packed bytes exactly once: every byte is split into its two nibbles, looked up in
the 16-entry code (an L1-resident gather), and multiplied with the matching even and odd
elements of ``x`` in float32. The absmax (decoded from its double quantization on the fly)
multiplies a whole sub-block's partial sum rather than each element. Nothing but the output
(or the split-K partial sums) is written.
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
            has_bias: bool, mask_rows: bool, split: bool):
  x_ref, *rest = refs
  n_weight = 6 if nested else 3
  w = _decode.WeightRefs(*rest[:n_weight])
  bias_ref = rest[n_weight] if has_bias else None
  o_ref = rest[-1]
  pid_n, pid_s = pl.program_id(0), pl.program_id(1)
  r0 = pid_n * block_n
  rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (block_n,), 0)
  row_mask = rows < layout.n if mask_rows else None
  nb, half = layout.sub_blocks, layout.group // 2

  def body(t, accs):
    step = pid_s * steps + t
    hi, lo = _decode.load_codes(w, layout, r0, block_n, step, row_mask)
    scale = _decode.load_absmax(w, layout, r0, block_n, step, row_mask)[:, :, None]
    out = []
    for i in range(m):
      xt = x_ref[jnp.int32(i), pl.ds(step * nb, nb), :, :].astype(jnp.float32)
      x_even, x_odd = jnp.unstack(xt, axis=-1)
      out.append(accs[i] + scale * (hi * x_even[None] + lo * x_odd[None]))
    return tuple(out)

  init = tuple(jnp.zeros((block_n, nb, half), jnp.float32) for _ in range(m))
  accs = jax.lax.fori_loop(0, steps, body, init)
  for i in range(m):
    y = accs[i].sum(axis=2).sum(axis=1)
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
  nested = len(weights) == 6
  g = layout.group
  x4 = x.reshape(m, k // g, g // 2, 2)
  split = s > 1
  out_dtype = jnp.float32 if split else x.dtype
  out_shape = (s, m, n) if split else (m, n)
  kernel = functools.partial(
      _kernel, layout=layout, m=m, block_n=bn, steps=steps, nested=nested,
      has_bias=bias is not None, mask_rows=n % bn != 0, split=split)
  args = (x4, *weights) + ((bias,) if bias is not None else ())
  y = _decode.launch(kernel, jax.ShapeDtypeStruct(out_shape, out_dtype), (pl.cdiv(n, bn), s),
                     args, name=KERNEL_NAME, num_warps=config.num_warps,
                     num_stages=config.num_stages, interpret=interpret, poison=poison)
  if not split:
    return y
  y = y.sum(axis=0)
  if bias is not None:
    y = y + bias.astype(jnp.float32)[None, :]
  return y.astype(x.dtype)
