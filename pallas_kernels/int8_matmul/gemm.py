"""int8 x int8 -> int32 GEMM on the tensor cores with the dequantization fused into the epilogue.

``y = (a_q @ w_q.T) * a_stats[:, None] * w_stats[None, :] / 127**2 (+ x_out @ w_out.T) + bias``

The int32 accumulator of a ``(block_m, block_n)`` tile is scaled by the row scale of the
activations and the row scale of the weight (bitsandbytes' ``int8_mm_dequant``: same float32
operations in the same order, so the same bits), then the LLM.int8() outlier part is added as
a 16-bit product over a fixed number of gathered columns (``x_out``, ``w_out``: static shapes,
zero-filled past the real outlier count), then the bias, then one cast to the output dtype.
The int32, float32 and outlier partial products never leave the registers.

Tiles are visited in groups of ``group_m`` tile rows (L2 reuse of the weight panel).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.int8_matmul import _common
from pallas_kernels.int8_matmul.reference import MM_DEQUANT_SCALE

__all__ = ["GemmConfig", "gemm_config", "int8_gemm", "supports"]

OUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
OUTLIER_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class GemmConfig:
  """Tiles of :func:`int8_gemm` (powers of two; ``block_k >= 32`` for the int8 MMA).

  Attributes:
    block_m, block_n: output tile.
    block_k: reduction step of the int8 loop.
    block_c: reduction step over the gathered outlier columns (16-bit loop).
    group_m: tile rows visited together.
    num_warps, num_stages: Triton parameters.
  """
  block_m: int = 128
  block_n: int = 256
  block_k: int = 128
  block_c: int = 32
  group_m: int = 8
  num_warps: int = 8
  num_stages: int = 3

  def check(self) -> None:
    for name in ("block_m", "block_n", "block_k", "block_c", "num_warps"):
      if not _common.is_pow2(getattr(self, name)):
        raise ValueError(f"GemmConfig.{name} must be a power of two, got {self}")
    if self.block_m < 16 or self.block_n < 16 or self.block_k < 32 or self.block_c < 16:
      raise ValueError(f"GemmConfig needs block_m, block_n >= 16, block_k >= 32, block_c >= 16;"
                       f" got {self}")


def gemm_config(m: int, n: int, k: int) -> GemmConfig:
  """Heuristic tiles, the fastest measured on an H100 for N = K = 8192
  (benchmarks/int8_matmul.py --sweep)."""
  del n, k
  if m <= 16:
    return GemmConfig(block_m=16, block_n=32, block_k=512, group_m=1, num_warps=4, num_stages=3)
  if m <= 256:
    return GemmConfig(block_m=64, block_n=128, block_k=256, group_m=8, num_warps=4,
                      num_stages=3)
  if m <= 1024:
    return GemmConfig(block_m=128, block_n=256, block_k=128)
  return GemmConfig(block_m=256, block_n=128, block_k=128)


def supports(a_q, a_stats, w_q, w_stats, bias=None, x_out=None, w_out=None, *,
             out_dtype=jnp.bfloat16) -> bool:
  """Whether :func:`int8_gemm` takes these operands (else use the reference)."""
  del a_stats, w_stats, bias
  if a_q.ndim != 2 or w_q.ndim != 2 or a_q.dtype != jnp.int8 or w_q.dtype != jnp.int8:
    return False
  if jnp.dtype(out_dtype) not in OUT_DTYPES or a_q.shape[1] != w_q.shape[1]:
    return False
  if x_out is not None:
    c = x_out.shape[1]
    if (jnp.dtype(x_out.dtype) not in OUTLIER_DTYPES or w_out.dtype != x_out.dtype
        or c < 16 or c % 16):
      return False
  return a_q.size > 0 and w_q.size > 0


def _kernel(a_ref, sa_ref, w_ref, sw_ref, *refs, cfg: GemmConfig, has_bias: bool,
            has_outliers: bool):
  *in_refs, o_ref = refs
  in_refs = list(in_refs)
  bias_ref = in_refs.pop(0) if has_bias else None
  xo_ref, wo_ref = in_refs if has_outliers else (None, None)
  m, k = a_ref.shape
  n = w_ref.shape[0]
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  rag_m, rag_n, rag_k = m % bm != 0, n % bn != 0, k % bk != 0
  pid_m, pid_n = _common.swizzle(pl.program_id(0), _common.cdiv(m, bm), _common.cdiv(n, bn),
                                 cfg.group_m)
  m0, n0 = pid_m * bm, pid_n * bn
  dims = (((1,), (1,)), ((), ()))

  def body(kb, acc):
    a = _common.load_tile(a_ref, (m0, kb * bk), (bm, bk), (rag_m, rag_k))
    w = _common.load_tile(w_ref, (n0, kb * bk), (bn, bk), (rag_n, rag_k))
    return acc + jax.lax.dot_general(a, w, dims, preferred_element_type=jnp.int32)

  acc = jax.lax.fori_loop(0, _common.cdiv(k, bk), body, jnp.zeros((bm, bn), jnp.int32))
  sa = _common.load_tile(sa_ref, (m0,), (bm,), (rag_m,))
  sw = _common.load_tile(sw_ref, (n0,), (bn,), (rag_n,))
  y = acc.astype(jnp.float32) * (sa[:, None] * sw[None, :]) * jnp.float32(MM_DEQUANT_SCALE)
  if has_outliers:
    bc = min(cfg.block_c, xo_ref.shape[1])

    def outlier_body(cb, y):
      xo = _common.load_tile(xo_ref, (m0, cb * bc), (bm, bc), (rag_m, False))
      wo = _common.load_tile(wo_ref, (n0, cb * bc), (bn, bc), (rag_n, False))
      return y + jax.lax.dot_general(xo, wo, dims, preferred_element_type=jnp.float32)

    y = jax.lax.fori_loop(0, xo_ref.shape[1] // bc, outlier_body, y)
  if has_bias:
    y = y + _common.load_tile(bias_ref, (n0,), (bn,), (rag_n,)).astype(jnp.float32)[None, :]
  _common.store_tile(o_ref, (m0, n0), y, (rag_m, rag_n))


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "config"))
def int8_gemm(a_q: jax.Array, a_stats: jax.Array, w_q: jax.Array, w_stats: jax.Array,
              bias: jax.Array | None = None, x_out: jax.Array | None = None,
              w_out: jax.Array | None = None, *, out_dtype=jnp.bfloat16,
              interpret: bool = False, config: GemmConfig | None = None) -> jax.Array:
  """``(a_q @ w_q.T)`` dequantized, plus the outlier product and the bias, in one kernel.

  Args:
    a_q: ``int8 (M, K)`` row-quantized activations.
    a_stats: ``float32 (M,)`` their row absmax.
    w_q: ``int8 (N, K)`` row-quantized weight (bitsandbytes' ``CB``).
    w_stats: ``float32 (N,)`` its row absmax (``SCB``).
    bias: ``(N,)`` float or None.
    x_out: ``(M, C)`` float16/bfloat16 activation columns of the outliers, ``C % 16 == 0``,
      zero past the real count; or None.
    w_out: ``(N, C)`` the matching dequantized weight columns, same dtype as ``x_out``.
    out_dtype: float32, float16 or bfloat16.
    interpret: run in the Pallas interpreter.
    config: tiles; ``None`` picks :func:`gemm_config`.

  Returns:
    ``(M, N)`` in ``out_dtype``.
  """
  m, k = a_q.shape
  n = w_q.shape[0]
  cfg = config or gemm_config(m, n, k)
  cfg.check()
  if x_out is not None:
    bc = min(cfg.block_c, x_out.shape[1])
    if x_out.shape[1] % bc:
      raise ValueError(f"x_out has {x_out.shape[1]} columns, not a multiple of {bc}")
  grid = (_common.cdiv(m, cfg.block_m) * _common.cdiv(n, cfg.block_n),)
  operands = [a_q, a_stats.astype(jnp.float32), w_q, w_stats.astype(jnp.float32)]
  if bias is not None:
    operands.append(bias)
  if x_out is not None:
    operands += [x_out, w_out]
  kernel = functools.partial(_kernel, cfg=cfg, has_bias=bias is not None,
                             has_outliers=x_out is not None)
  return _common.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), grid=grid,
      name="jaxquant_int8_gemm", num_warps=cfg.num_warps, num_stages=cfg.num_stages,
      interpret=interpret)(*operands)
