"""Row-wise int8 quantization of activations that finds the outlier columns in the same pass.

One program owns ``block_m`` rows. When a row panel fits in registers (``block_k >= K``, the
usual case up to 16384 columns) it is loaded once; its absmax over the non-outlier elements
(``|x| < threshold``) gives the scale, ``q = rint(x * 127 / absmax)`` is written with the
outlier elements zeroed, and one bit per column says whether the panel holds an outlier
there (32 columns to an int32 word, so the flags cost 1/64 of the bytes of ``x``). Wider rows
take two sweeps, the second from the far end so that the panel is still in L2. Either way
``x`` is read from memory once and ``q`` written once.

Bitsandbytes zeroes the whole outlier column of ``q`` when there are several rows; that needs
every row's verdict, so it is left to the caller (:func:`zero_columns`), which knows the
columns once the per-block flags are OR-ed together (:func:`outlier_columns`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.int8_matmul import _common

__all__ = ["QuantConfig", "quant_config", "rowwise_quant", "outlier_columns", "zero_columns",
           "supports"]

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Tiles of :func:`rowwise_quant`.

  Attributes:
    block_m: rows per program (a power of two).
    block_k: columns per step of each sweep (a power of two).
    num_warps: Triton warps per program.
  """
  block_m: int = 4
  block_k: int = 1024
  num_warps: int = 4

  def check(self) -> None:
    for name in ("block_m", "block_k", "num_warps"):
      if not _common.is_pow2(getattr(self, name)):
        raise ValueError(f"QuantConfig.{name} must be a power of two, got {self}")
    if self.block_k < 32:
      raise ValueError(f"QuantConfig.block_k must be >= 32, got {self}")


def quant_config(m: int, k: int) -> QuantConfig:
  """Heuristic tiles (measured on an H100, see benchmarks/int8_matmul.py): one row per program
  and, up to 16384 columns, the whole row in registers (read once, no second sweep)."""
  del m
  block_k = max(32, _common.pow2_at_least(k))
  if block_k > 16384:
    block_k = 4096
  num_warps = 16 if block_k >= 8192 else (8 if block_k >= 2048 else 4)
  return QuantConfig(block_m=1, block_k=block_k, num_warps=num_warps)


def supports(x: jax.Array, *, threshold: float = 0.0) -> bool:
  del threshold
  return x.ndim >= 1 and x.size > 0 and jnp.dtype(x.dtype) in SUPPORTED_DTYPES


def _kernel(x_ref, q_ref, stats_ref, *flag_refs, threshold: float, cfg: QuantConfig):
  m, k = x_ref.shape
  bm, bk = cfg.block_m, cfg.block_k
  nk = _common.cdiv(k, bk)
  ragged = (m % bm != 0, k % bk != 0)
  words = bk // 32
  ragged_words = _common.cdiv(k, 32) % words != 0
  pid = pl.program_id(0)
  r0 = pid * bm
  thr = jnp.float32(threshold)

  def load(kb):
    return _common.load_tile(x_ref, (r0, kb * bk), (bm, bk), ragged).astype(jnp.float32)

  def absmax(kb, xv):
    """Row absmax over the non-outliers; stores the tile's column flags, 32 to a word."""
    ax = jnp.abs(xv)
    if threshold > 0:
      outlier = ax >= thr
      ax = jnp.where(outlier, 0.0, ax)
      col = jnp.max(outlier.astype(jnp.int32), axis=0).reshape(words, 32)
      packed = jnp.sum(col << jnp.arange(32, dtype=jnp.int32)[None, :], axis=1)
      _common.store_tile(flag_refs[0], (pid, kb * words), packed[None, :],
                         (False, ragged_words))
    return jnp.max(ax, axis=1)

  def quant(kb, xv, scale):
    v = _common.rint(xv * scale[:, None])
    if threshold > 0:
      v = jnp.where(jnp.abs(xv) >= thr, 0.0, v)
    v = jnp.clip(v, -127.0, 127.0).astype(jnp.int32).astype(jnp.int8)
    _common.store_tile(q_ref, (r0, kb * bk), v, ragged)

  def scale_of(rowmax):
    _common.store_tile(stats_ref, (r0,), rowmax, (ragged[0],))
    return jnp.where(rowmax > 0, jnp.float32(127.0) / rowmax, jnp.float32(0.0))

  if nk == 1:  # the whole row panel fits in registers: one read
    xv = load(0)
    quant(0, xv, scale_of(absmax(0, xv)))
    return

  rowmax = jax.lax.fori_loop(0, nk, lambda kb, r: jnp.maximum(r, absmax(kb, load(kb))),
                             jnp.zeros((bm,), jnp.float32))
  scale = scale_of(rowmax)

  def sweep_quant(i, carry):
    kb = nk - 1 - i  # backwards: the last tiles read are still in L2
    quant(kb, load(kb), scale)
    return carry

  jax.lax.fori_loop(0, nk, sweep_quant, 0)


@functools.partial(jax.jit, static_argnames=("threshold", "interpret", "config"))
def rowwise_quant(x: jax.Array, *, threshold: float = 0.0, interpret: bool = False,
                  config: QuantConfig | None = None):
  """Quantize the rows of ``x`` and flag the outlier columns.

  Args:
    x: ``(M, K)`` float32/float16/bfloat16.
    threshold: ``|x| >= threshold`` marks an outlier (``0``: none).
    interpret: run the kernel in the Pallas interpreter.
    config: tiles; ``None`` picks :func:`quant_config`.

  Returns:
    ``(q, stats, flags)``: ``int8 (M, K)`` with the outlier *elements* zeroed, ``float32 (M,)``
    row absmax over the non-outliers, and ``int32 (cdiv(M, block_m), cdiv(K, 32))`` per row
    block, bit ``j`` of word ``i`` set where column ``32 * i + j`` holds an outlier (``None``
    when ``threshold == 0``).
  """
  m, k = x.shape
  cfg = config or quant_config(m, k)
  cfg.check()
  nb = _common.cdiv(m, cfg.block_m)
  out_shape = [jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((m,), jnp.float32)]
  if threshold > 0:
    out_shape.append(jax.ShapeDtypeStruct((nb, _common.cdiv(k, 32)), jnp.int32))
  outs = _common.pallas_call(
      functools.partial(_kernel, threshold=float(threshold), cfg=cfg), out_shape=out_shape,
      grid=(nb,), name="jaxquant_int8_rowwise_quant", num_warps=cfg.num_warps, num_stages=1,
      interpret=interpret)(x)
  if threshold > 0:
    return outs[0], outs[1], outs[2]
  return outs[0], outs[1], None


def outlier_columns(flags: jax.Array | None, k: int) -> jax.Array:
  """``bool (K,)``: the per-block flags of :func:`rowwise_quant` reduced over the blocks."""
  if flags is None:
    return jnp.zeros((k,), bool)
  packed = jax.lax.reduce(flags, jnp.int32(0), jax.lax.bitwise_or, (0,))
  bits = jax.lax.shift_right_logical(packed[:, None], jnp.arange(32, dtype=jnp.int32)[None, :])
  return (bits & 1).reshape(-1)[:k] != 0


def zero_columns(q: jax.Array, cols: jax.Array) -> jax.Array:
  """Bitsandbytes' rule: with several rows, every outlier column of ``q`` is zeroed."""
  if q.shape[0] <= 1:
    return q  # the kernel already zeroed the outlier elements, which are the columns
  return jnp.where(cols[None, :], jnp.zeros((), q.dtype), q)
