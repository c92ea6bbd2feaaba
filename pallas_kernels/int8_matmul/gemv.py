"""Weight-only int8 GEMV for a few rows of activations (decode), on the CUDA cores.

With one to four rows the tensor cores would idle on padding, and what costs is reading the
int8 weight once at full bandwidth. Each program streams ``block_n`` weight rows through
``block_k``-wide tiles: the tile is decoded to float32 with integer operations
(:func:`_common.int8_to_float`), multiplied by each activation row (bfloat16/float16 products
are exact in float32) and reduced along ``K`` into one float32 accumulator per row. The row
scale ``w_stats / 127`` and the bias are applied once at the end; with ``split_k > 1`` the
programs write float32 partial sums that the caller adds.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.int8_matmul import _common
from pallas_kernels.int8_matmul.reference import DEQUANT_SCALE

__all__ = ["GemvConfig", "MAX_ROWS", "gemv_call"]

MAX_ROWS = 4


@dataclasses.dataclass(frozen=True)
class GemvConfig:
  """Tiles of the GEMV (powers of two).

  Attributes:
    block_n: weight rows (outputs) per program.
    block_k: reduction step.
    split_k: programs sharing one block's reduction.
    num_warps, num_stages: Triton parameters.
  """
  block_n: int = 32
  block_k: int = 512
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 3

  def check(self) -> None:
    for name in ("block_n", "block_k", "split_k", "num_warps"):
      if not _common.is_pow2(getattr(self, name)):
        raise ValueError(f"GemvConfig.{name} must be a power of two, got {self}")


def _kernel(x_ref, w_ref, sw_ref, *refs, cfg: GemvConfig, has_bias: bool, partial: bool):
  *in_refs, o_ref = refs
  m, k = x_ref.shape
  n = w_ref.shape[0]
  bn, bk = cfg.block_n, cfg.block_k
  rag_n, rag_k = n % bn != 0, k % bk != 0
  n0 = pl.program_id(0) * bn
  steps = _common.cdiv(k, bk) // cfg.split_k
  k_first = pl.program_id(1) * steps if cfg.split_k > 1 else 0

  def body(i, accs):
    kk = (k_first + i) * bk
    w = _common.int8_to_float(_common.load_tile(w_ref, (n0, kk), (bn, bk), (rag_n, rag_k)),
                              jnp.float32)
    return tuple(
        acc + jnp.sum(w * _common.load_tile(x_ref, (r, kk), (1, bk), (False, rag_k)).astype(
            jnp.float32), axis=1)
        for r, acc in enumerate(accs))

  accs = jax.lax.fori_loop(0, steps, body, tuple(jnp.zeros((bn,), jnp.float32)
                                                  for _ in range(m)))
  if partial:
    for r, acc in enumerate(accs):
      _common.store_tile(o_ref, (pl.program_id(1), r, n0), acc[None, None, :],
                         (False, False, rag_n))
    return
  scale = _common.load_tile(sw_ref, (n0,), (bn,), (rag_n,)) * jnp.float32(DEQUANT_SCALE)
  bias = None
  if has_bias:
    bias = _common.load_tile(in_refs[0], (n0,), (bn,), (rag_n,)).astype(jnp.float32)
  for r, acc in enumerate(accs):
    y = acc * scale
    if bias is not None:
      y = y + bias
    _common.store_tile(o_ref, (r, n0), y[None, :], (False, rag_n))


def gemv_call(x: jax.Array, w_q: jax.Array, w_stats: jax.Array, bias: jax.Array | None, *,
              cfg: GemvConfig, interpret: bool):
  """Run the GEMV: ``(M, N)`` in ``x.dtype``, or float32 partial sums ``(split_k, M, N)``
  (unscaled, no bias) when ``cfg.split_k > 1``.

  Args:
    x: ``(M, K)`` float16/bfloat16, ``M <= MAX_ROWS``.
    w_q: ``int8 (N, K)``; ``w_stats``: ``float32 (N,)``; ``bias``: ``(N,)`` or None.
    cfg: tiles; ``split_k`` must divide the number of ``block_k`` steps.
    interpret: run in the Pallas interpreter.
  """
  m, k = x.shape
  n = w_q.shape[0]
  if m > MAX_ROWS:
    raise ValueError(f"the GEMV takes at most {MAX_ROWS} rows, got x of shape {x.shape}")
  split = cfg.split_k
  if _common.cdiv(k, cfg.block_k) % split:
    raise ValueError(f"split_k={split} must divide the {_common.cdiv(k, cfg.block_k)} steps")
  operands = [x, w_q, w_stats.astype(jnp.float32)]
  if bias is not None and split == 1:
    operands.append(bias)
  out = (jax.ShapeDtypeStruct((split, m, n), jnp.float32) if split > 1
         else jax.ShapeDtypeStruct((m, n), x.dtype))
  grid = (_common.cdiv(n, cfg.block_n), split) if split > 1 else (_common.cdiv(n, cfg.block_n),)
  kernel = functools.partial(_kernel, cfg=cfg, has_bias=bias is not None, partial=split > 1)
  return _common.pallas_call(kernel, out_shape=out, grid=grid, name="jaxquant_int8_gemv",
                             num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                             interpret=interpret)(*operands)

