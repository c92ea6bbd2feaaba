"""Tiled forward kernel: ``y = x @ dequant(W).T`` on the tensor cores.

Each program computes a ``(block_m, block_n)`` output tile. Per reduction step it loads a
``(block_m, block_k)`` tile of ``x`` and the ``(block_n, block_k / 2)`` packed bytes of the
weight, decodes the bytes in registers (code lookup, absmax decoded from its double
quantization, cast to ``x.dtype`` exactly as the reference rounds) and feeds both to one
``dot`` with float32 accumulation. With ``w_lhs`` the decoded tile is the left operand, so it
can stay in registers (Hopper's wgmma takes A from registers) and the output tile is
transposed on store. Programs are ordered in groups of ``group_m`` along M so that those
decoding the same weight tiles run together and share them through L2. With ``split_k > 1``
(small M: more programs than output tiles) each program reduces one slice of K and writes
float32 partial sums, added afterwards. With ``config.pairs`` (bfloat16/float16), the weight
tile decodes to its even and odd columns (:func:`._pairs.decode`, no interleave) and ``x``,
split the same way outside the kernel, meets them in two dots of ``block_k / 2``; with
``config.prefetch`` the next step's operands are loaded into registers while this one runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.fourbit_matmul import _decode, _lut, _pairs
from pallas_kernels.fourbit_matmul._tuning import Config

__all__ = ["gemm", "grouped_ids", "KERNEL_NAME"]

KERNEL_NAME = "jaxquant_matmul_4bit_gemm"


def grouped_ids(pid, tiles_a: int, tiles_b: int, group: int):
  """Program ``pid`` → ``(i, j)`` over a ``tiles_a × tiles_b`` grid, ``i`` running fastest
  inside groups of ``group`` consecutive ``i`` (Triton's L2-friendly ordering)."""
  per_group = group * tiles_b
  first = (pid // per_group) * group
  size = jnp.minimum(tiles_a - first, group)
  return first + (pid % per_group) % size, (pid % per_group) // size


def _kernel(*refs, layout: _decode.Layout, m: int, cfg: Config, nested: bool,
            has_bias: bool, pairs: bool, interpret: bool):
  x_ref, *rest = refs
  w, rest = _decode.split_refs(rest, nested)
  bias_ref = rest[0] if has_bias else None
  o_ref = rest[-1]
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  pid_m, pid_n = grouped_ids(pl.program_id(0), pl.cdiv(m, bm), pl.cdiv(layout.n, bn),
                             cfg.group_m)
  split = cfg.split_k > 1
  steps = layout.k // bk // cfg.split_k
  first_step = pl.program_id(1) * steps
  m0, n0 = pid_m * bm, pid_n * bn
  m_rows = m0 + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
  n_rows = n0 + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
  m_mask = m_rows < m if m % bm else None
  n_mask = n_rows < layout.n if layout.n % bn else None
  dtype = x_ref.dtype
  precision = _decode.dot_precision(dtype)
  decoder = _decode.Decoder.create(w, layout, dtype, interpret)

  def product(acc, xt, wt):
    if cfg.w_lhs:
      return acc + jax.lax.dot_general(wt, xt, (((1,), (1,)), ((), ())), precision=precision,
                                        preferred_element_type=jnp.float32)
    return acc + jax.lax.dot_general(xt, wt, (((1,), (1,)), ((), ())), precision=precision,
                                      preferred_element_type=jnp.float32)

  x_mask = None if m_mask is None else m_mask[:, None]

  half, nb = bk // 2, layout.sub_blocks

  def loads(step):  # pairs: x_ref is (2, m, k / 2), even then odd columns
    xe, xo = (_decode.masked_load(
        x_ref.at[jnp.int32(j), pl.ds(m0, bm), pl.ds(step * half, half)], x_mask)
        for j in (0, 1))
    tile = w.packed.at[pl.ds(n0, bn), pl.ds(step * nb, nb), :]
    p = _decode.masked_load(tile, None if n_mask is None else n_mask[:, None, None])
    return p, _decode.load_absmax_raw(w, layout, n0, bn, step, n_mask), xe, xo

  def consume(step, loaded, acc):
    p, q, xe, xo = loaded
    scale = _decode.absmax_values(w, layout, q, n0, bn, step, n_mask)
    we, wo = _pairs.decode(p, scale, decoder.tables, w.code, dtype, interpret)
    return product(product(acc, xe, we.reshape(bn, half)), xo, wo.reshape(bn, half))

  def body(t, acc):
    step = first_step + t
    if pairs:
      return consume(step, loads(step), acc)
    xt = _decode.masked_load(x_ref.at[pl.ds(m0, bm), pl.ds(step * bk, bk)], x_mask)
    return product(acc, xt, decoder.tile(n0, bn, step, n_mask))

  def prefetched(t, carry):  # loads for the next step are in flight while this one computes
    acc, loaded = carry
    step = first_step + t
    ahead = loads(jnp.minimum(step + 1, first_step + steps - 1))
    return consume(step, loaded, acc), ahead

  shape = (bn, bm) if cfg.w_lhs else (bm, bn)
  if pairs and cfg.prefetch:
    acc, _ = jax.lax.fori_loop(0, steps, prefetched,
                               (jnp.zeros(shape, jnp.float32), loads(first_step)))
  else:
    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(shape, jnp.float32))
  if cfg.w_lhs:
    acc = acc.T
  if has_bias and not split:
    acc = acc + _decode.masked_load(bias_ref.at[pl.ds(n0, bn)], n_mask).astype(
        jnp.float32)[None, :]
  if split:
    dest = o_ref.at[pl.program_id(1), pl.ds(m0, bm), pl.ds(n0, bn)]
  else:
    dest = o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)]
  if m_mask is None and n_mask is None:
    dest[...] = acc.astype(o_ref.dtype)
  else:
    mask = jnp.ones((bm, bn), jnp.bool_)
    if m_mask is not None:
      mask = mask & m_mask[:, None]
    if n_mask is not None:
      mask = mask & n_mask[None, :]
    pltriton.store(dest, acc.astype(o_ref.dtype), mask=mask)


def gemm(x: jax.Array, weights: tuple[jax.Array, ...], bias: jax.Array | None, *,
         layout: _decode.Layout, config: Config, interpret: bool = False,
         poison: bool = False) -> jax.Array:
  """``x (m, k) @ W.T (+ bias)`` in ``x.dtype`` on the tensor cores.

  Args:
    x: ``(m, k)`` float32/float16/bfloat16.
    weights: :func:`_decode.operands` for ``layout``.
    bias: ``(n,)`` or ``None``.
    layout: the weight layout; ``layout.block_k == config.block_k``.
    config: a ``"gemm"`` :class:`Config`.
    interpret: run the kernel in the Pallas interpreter.
    poison: fill the output with NaN first (tests: every element must be written).

  Returns:
    ``(m, n)`` in ``x.dtype``.
  """
  m = x.shape[0]
  pairs = config.pairs and jnp.dtype(x.dtype) in _lut.FAST_DTYPES
  kernel = functools.partial(_kernel, layout=layout, m=m, cfg=config, nested=len(weights) == 7,
                             has_bias=bias is not None, pairs=pairs, interpret=interpret)
  s = config.split_k
  grid = (pl.cdiv(m, config.block_m) * pl.cdiv(layout.n, config.block_n), s)
  args = (_pairs.split_x(x) if pairs else x, *weights) + ((bias,) if bias is not None else ())
  out = (jax.ShapeDtypeStruct((s, m, layout.n), jnp.float32) if s > 1 else
         jax.ShapeDtypeStruct((m, layout.n), x.dtype))
  y = _decode.launch(kernel, out, grid, args, name=KERNEL_NAME, num_warps=config.num_warps,
                     num_stages=config.num_stages, interpret=interpret, poison=poison)
  return _decode.reduce_partials(y, bias, x.dtype) if s > 1 else y
