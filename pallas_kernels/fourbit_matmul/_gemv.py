"""Small-M forward kernel: ``y = x @ dequant(W).T`` for a few rows of ``x``, on the FMA units.

For ``M`` up to a handful of rows the product is bound by reading the packed weight. Each
program owns ``block_n`` weight rows (and, with split-K, one slice of the reduction) and
streams its packed bytes exactly once, decoding them in registers (:class:`._decode.Decoder`:
code lookup, absmax decoded from its double quantization) and multiplying them with the
matching columns of ``x`` in float32. Nothing but the output (or the split-K partial sums)
is written.

With ``config.pairs`` (bfloat16/float16 ``x``), ``x`` is split into its even and odd columns
outside the kernel and each step is one inline-PTX block per four packed bytes
(:func:`._pairs.dot_step`): decode, packed FMAs with every row of ``x``, the absmax applied in
float32 per byte; the PTX is about 4.4 instructions per weight at ``M = 1``. With loads,
address arithmetic and Triton's layout conversions the loop runs 7-9 SASS instructions per
weight (ptxas for sm_90, 8192², ``block_n`` 1-4), against 9.3 for the generic path (decode to
a tile, convert, FMA in float32).

With ``config.prefetch`` the loads of step ``t + 1`` (packed bytes, stored absmax, ``x``) are
issued before step ``t`` is computed and held in registers across the loop (software double
buffering), so that only the cached double-quant table lookups wait on memory inside a step;
it costs register repacking of the carried bytes (about 1 SASS instruction per weight) and
won on the H100 all the same. With ``config.x_reuse`` the packed bytes are viewed in groups of
8, ``(n, k / g, g / 16, 8)``, and ``x`` alike: with one row per program Triton then lays the
``x`` tiles out as a slice of the weight tile (no shared-memory conversion, no barrier per
step; not yet timed on a GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.fourbit_matmul import _decode, _lut, _pairs
from pallas_kernels.fourbit_matmul._tuning import Config

__all__ = ["gemv", "KERNEL_NAME"]

KERNEL_NAME = "jaxquant_matmul_4bit_gemv"


def _store(o_ref, bias_ref, accs, *, r0, block_n: int, row_mask, split: bool):
  """Row sums of the accumulators → output (or split-K partials) rows ``r0 .. r0 + block_n``."""
  pid_s = pl.program_id(1)
  for i, acc in enumerate(accs):
    y = acc
    while y.ndim > 1:
      y = y.sum(axis=-1)
    if split:
      dest = o_ref.at[pid_s, jnp.int32(i), pl.ds(r0, block_n)]
    else:
      if bias_ref is not None:
        y = y + _decode.masked_load(bias_ref.at[pl.ds(r0, block_n)], row_mask).astype(
            jnp.float32)
      y = y.astype(o_ref.dtype)
      dest = o_ref.at[jnp.int32(i), pl.ds(r0, block_n)]
    if row_mask is None:
      dest[...] = y
    else:
      pltriton.store(dest, y, mask=row_mask)


def _kernel(*refs, layout: _decode.Layout, m: int, block_n: int, steps: int, nested: bool,
            has_bias: bool, mask_rows: bool, split: bool, pairs: bool, prefetch: bool,
            interpret: bool):
  x_ref, *rest = refs
  w, rest = _decode.split_refs(rest, nested)
  bias_ref = rest[0] if has_bias else None
  o_ref = rest[-1]
  pid_n, pid_s = pl.program_id(0), pl.program_id(1)
  r0 = pid_n * block_n
  rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (block_n,), 0)
  row_mask = rows < layout.n if mask_rows else None
  bk, nb = layout.block_k, layout.sub_blocks
  dtype = x_ref.dtype
  decoder = _decode.Decoder.create(w, layout, dtype, interpret)
  first = pid_s * steps

  inner = (slice(None),) * (w.packed.ndim - 2)  # (g / 2,), or (g / 16, 8) with x_reuse

  def loads(step):  # pairs: x_ref is (2, m, k / g, *inner), even then odd columns
    cols = pl.ds(step * nb, nb)
    tile = w.packed.at[(pl.ds(r0, block_n), cols, *inner)]
    mask = None if row_mask is None else row_mask.reshape((block_n,) + (1,) * (1 + len(inner)))
    p = _decode.masked_load(tile, mask)
    q = _decode.load_absmax_raw(w, layout, r0, block_n, step, row_mask)
    xs = tuple((x_ref[(0, jnp.int32(i), cols, *inner)], x_ref[(1, jnp.int32(i), cols, *inner)])
               for i in range(m))
    return p, q, xs

  def consume(step, loaded, accs):
    p, q, xs = loaded
    scale = _decode.absmax_values(w, layout, q, r0, block_n, step, row_mask)
    return tuple(_pairs.dot_step(p, scale, xs, accs, decoder.tables, w.code, dtype,
                                 interpret))

  def body(t, accs):
    step = first + t
    if pairs:
      return consume(step, loads(step), accs)
    wt = decoder.tile(r0, block_n, step, row_mask).astype(jnp.float32)
    out = []
    for i in range(m):
      xt = x_ref[jnp.int32(i), pl.ds(step * bk, bk)].astype(jnp.float32)
      out.append(accs[i] + wt * xt[None, :])
    return tuple(out)

  def prefetched(t, carry):  # loads for the next step are in flight while this one computes
    accs, loaded = carry
    step = first + t
    ahead = loads(jnp.minimum(step + 1, first + steps - 1))
    return consume(step, loaded, accs), ahead

  shape = (block_n, nb, *w.packed.shape[2:]) if pairs else (block_n, bk)
  init = tuple(jnp.zeros(shape, jnp.float32) for _ in range(m))
  if pairs and prefetch:
    accs, _ = jax.lax.fori_loop(0, steps, prefetched, (init, loads(first)))
  else:
    accs = jax.lax.fori_loop(0, steps, body, init)
  _store(o_ref, bias_ref, accs, r0=r0, block_n=block_n, row_mask=row_mask, split=split)


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
  pairs = config.pairs and jnp.dtype(x.dtype) in _lut.FAST_DTYPES
  kernel = functools.partial(
      _kernel, layout=layout, m=m, block_n=bn, steps=steps, nested=len(weights) == 7,
      has_bias=bias is not None, mask_rows=n % bn != 0, split=split, pairs=pairs,
      prefetch=config.prefetch, interpret=interpret)
  out_dtype = x.dtype
  out = jax.ShapeDtypeStruct((s, m, n) if split else (m, n),
                             jnp.float32 if split else out_dtype)
  g = layout.group
  inner = (g // 16, 8) if pairs and config.x_reuse else (g // 2,)
  if pairs:
    x = _pairs.split_x(x).reshape(2, m, k // g, *inner)
    weights = (weights[0].reshape(n, k // g, *inner), *weights[1:])
  args = (x, *weights)
  args += (bias,) if bias is not None else ()
  y = _decode.launch(kernel, out, (pl.cdiv(n, bn), s), args, name=KERNEL_NAME,
                     num_warps=config.num_warps, num_stages=config.num_stages,
                     interpret=interpret, poison=poison)
  return _decode.reduce_partials(y, bias, out_dtype) if split else y
