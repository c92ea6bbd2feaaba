"""Weight-only int8 matmuls: an int8 weight against 16-bit activations, decoded in registers.

Forward ``y = (x @ w_q.T) * (w_stats / 127) + bias``: each int8 weight tile is decoded to the
activation dtype with integer operations (exact: an int8 fits a bfloat16/float16 significand)
right before a tensor-core product, and the per-output-row scale is applied once to the
float32 accumulator. For a few rows of ``x`` (decode) the product runs on 16-row tiles and the
whole cost is reading the weight once; above, ``w_lhs`` puts the weight tile on the left of the
product (it stays in registers and ``x`` fills the other side); the reduction can be split
over ``split_k`` programs whose float32 partial sums are added afterwards. Beyond
``MAX_KERNEL_M`` rows XLA's fused convert+GEMM was faster, so :func:`supports` declines and
the dispatcher runs the reference there.

Backward ``dx = g @ dequant(w)``: the scale runs along the reduction, so each weight tile is
dequantized in float32 and rounded to the dtype of ``g`` exactly as the reference does. The
decoded tile is the right operand of the product, which keeps Triton off Hopper's wgmma path;
above ``MAX_GRAD_M`` rows XLA's dequantize-then-GEMM is faster and :func:`supports_grad`
declines.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.int8_matmul import _common
from pallas_kernels.int8_matmul.reference import DEQUANT_SCALE

__all__ = ["WeightOnlyConfig", "weight_only_config", "grad_config", "weight_only_matmul",
           "grad_input_matmul", "supports", "supports_grad", "MAX_KERNEL_M", "MAX_GRAD_M"]

ACT_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
# Above this many rows XLA's own weight-only product (the int8 -> bf16 convert fused into
# its GEMM) was faster on the H100 than these kernels: supports() sends larger M there.
MAX_KERNEL_M = 512
# The same for the input gradient (g @ dequant(W)): the kernel wins up to M = 128 (57 vs 150 us
# at M = 1..16), XLA from M = 512 on.
MAX_GRAD_M = 256


@dataclasses.dataclass(frozen=True)
class WeightOnlyConfig:
  """Tiles of the weight-only kernels (powers of two).

  Attributes:
    block_m: rows of ``x`` (or ``g``) per tile, at least 16 (the MMA's smallest side).
    block_n: weight rows per tile (forward: outputs; backward: the reduction step).
    block_k: reduction step (forward) or output columns per tile (backward).
    split_k: programs sharing the reduction of one tile (forward only).
    w_lhs: the weight tile is the left operand (forward only; for small ``M``).
    num_warps, num_stages: Triton parameters.
    bit_decode: decode int8 with integer/bit operations (:func:`_common.int8_to_float`)
      rather than the GPU's slower int-to-float conversion.
  """
  block_m: int = 16
  block_n: int = 64
  block_k: int = 256
  split_k: int = 1
  w_lhs: bool = True
  num_warps: int = 4
  num_stages: int = 4
  bit_decode: bool = True

  def check(self) -> None:
    for name in ("block_m", "block_n", "block_k", "split_k", "num_warps"):
      if not _common.is_pow2(getattr(self, name)):
        raise ValueError(f"WeightOnlyConfig.{name} must be a power of two, got {self}")
    if min(self.block_m, self.block_n, self.block_k) < 16:
      raise ValueError(f"WeightOnlyConfig blocks must be >= 16, got {self}")


def weight_only_config(m: int, n: int, k: int) -> WeightOnlyConfig:
  """Heuristic tiles for the forward, the fastest measured on an H100 for N = K = 8192
  (benchmarks/int8_matmul.py --sweep): 16-row tiles for decode, the weight tile on the left
  of the product above."""
  del n, k
  if m <= 16:
    return WeightOnlyConfig(block_m=16, block_n=32, block_k=512, w_lhs=False)
  if m <= 128:
    return WeightOnlyConfig(block_m=max(16, min(128, _common.pow2_at_least(m))), block_n=64,
                            block_k=128, w_lhs=True)
  return WeightOnlyConfig(block_m=256, block_n=128, block_k=64, w_lhs=True, num_warps=8,
                          num_stages=3)


def grad_config(m: int, n: int, k: int) -> WeightOnlyConfig:
  """Heuristic tiles for :func:`grad_input_matmul`."""
  del n, k
  if m <= 16:
    return WeightOnlyConfig(block_m=16, block_n=128, block_k=64, w_lhs=False)
  if m <= 64:
    return WeightOnlyConfig(block_m=64, block_n=64, block_k=64, w_lhs=False)
  return WeightOnlyConfig(block_m=128, block_n=64, block_k=128, w_lhs=False, num_warps=8,
                          num_stages=3)


def supports(x, w_q, w_stats, bias=None) -> bool:
  """Whether :func:`weight_only_matmul` takes these operands."""
  del w_stats, bias
  return (x.ndim == 2 and w_q.ndim == 2 and w_q.dtype == jnp.int8 and x.shape[1] == w_q.shape[1]
          and jnp.dtype(x.dtype) in ACT_DTYPES and x.size > 0 and w_q.size > 0
          and x.shape[0] <= MAX_KERNEL_M)


def supports_grad(g, w_q, w_stats) -> bool:
  """Whether :func:`grad_input_matmul` takes these operands."""
  del w_stats
  return (g.ndim == 2 and w_q.ndim == 2 and w_q.dtype == jnp.int8 and g.shape[1] == w_q.shape[0]
          and jnp.dtype(g.dtype) in ACT_DTYPES and g.size > 0 and w_q.size > 0
          and g.shape[0] <= MAX_GRAD_M)


def _decode(w, dtype, cfg: WeightOnlyConfig):
  if cfg.bit_decode:
    return _common.int8_to_float(w, dtype)
  return w.astype(jnp.float32).astype(dtype)


def _forward_kernel(x_ref, w_ref, sw_ref, *refs, cfg: WeightOnlyConfig, has_bias: bool,
                    partial: bool):
  *in_refs, o_ref = refs
  m, k = x_ref.shape
  n = w_ref.shape[0]
  bm, bn, bk, split = cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k
  rag_m, rag_n, rag_k = m % bm != 0, n % bn != 0, k % bk != 0
  num_m = _common.cdiv(m, bm)
  pid = pl.program_id(0)
  pid_n, pid_m = pid // num_m, pid % num_m
  m0, n0 = pid_m * bm, pid_n * bn
  steps = _common.cdiv(k, bk) // split
  k_first = pl.program_id(1) * steps if split > 1 else 0
  dims = (((1,), (1,)), ((), ()))

  def body(i, acc):
    kk = (k_first + i) * bk
    x = _common.load_tile(x_ref, (m0, kk), (bm, bk), (rag_m, rag_k))
    w = _decode(_common.load_tile(w_ref, (n0, kk), (bn, bk), (rag_n, rag_k)), x.dtype, cfg)
    if cfg.w_lhs:
      return acc + jax.lax.dot_general(w, x, dims, preferred_element_type=jnp.float32)
    return acc + jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)

  shape = (bn, bm) if cfg.w_lhs else (bm, bn)
  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(shape, jnp.float32))
  if cfg.w_lhs:
    acc = acc.T
  if partial:
    _common.store_tile(o_ref, (pl.program_id(1), m0, n0), acc[None], (False, rag_m, rag_n))
    return
  scale = _common.load_tile(sw_ref, (n0,), (bn,), (rag_n,)) * jnp.float32(DEQUANT_SCALE)
  y = acc * scale[None, :]
  if has_bias:
    y = y + _common.load_tile(in_refs[0], (n0,), (bn,), (rag_n,)).astype(jnp.float32)[None, :]
  _common.store_tile(o_ref, (m0, n0), y, (rag_m, rag_n))


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def weight_only_matmul(x: jax.Array, w_q: jax.Array, w_stats: jax.Array,
                       bias: jax.Array | None = None, *, interpret: bool = False,
                       config: WeightOnlyConfig | None = None) -> jax.Array:
  """``x @ dequant(w_q).T + bias`` reading the int8 weight once.

  Args:
    x: ``(M, K)`` float16/bfloat16.
    w_q: ``int8 (N, K)`` row-quantized weight; ``w_stats``: ``float32 (N,)`` its row absmax.
    bias: ``(N,)`` or None.
    interpret: run in the Pallas interpreter.
    config: tiles; ``None`` picks :func:`weight_only_config`.

  Returns:
    ``(M, N)`` in ``x.dtype``: ``(x @ w_q.T)`` accumulated in float32, times
    ``w_stats / 127``, plus the bias.
  """
  m, k = x.shape
  n = w_q.shape[0]
  cfg = config or weight_only_config(m, n, k)
  cfg.check()
  split = cfg.split_k
  if split > 1 and _common.cdiv(k, cfg.block_k) % split:
    split = 1
  cfg = dataclasses.replace(cfg, split_k=split)
  y = _mma_call(x, w_q, w_stats, bias, cfg=cfg, interpret=interpret)
  if split == 1:
    return y
  y = jnp.sum(y, axis=0) * (w_stats.astype(jnp.float32) * jnp.float32(DEQUANT_SCALE))[None, :]
  if bias is not None:
    y = y + bias.astype(jnp.float32)[None, :]
  return y.astype(x.dtype)


def _mma_call(x, w_q, w_stats, bias, *, cfg: WeightOnlyConfig, interpret: bool):
  m = x.shape[0]
  n = w_q.shape[0]
  split = cfg.split_k
  num = _common.cdiv(m, cfg.block_m) * _common.cdiv(n, cfg.block_n)
  operands = [x, w_q, w_stats.astype(jnp.float32)]
  if bias is not None and split == 1:
    operands.append(bias)
  out = jax.ShapeDtypeStruct((split, m, n), jnp.float32) if split > 1 else (
      jax.ShapeDtypeStruct((m, n), x.dtype))
  kernel = functools.partial(_forward_kernel, cfg=cfg, has_bias=bias is not None,
                             partial=split > 1)
  return _common.pallas_call(kernel, out_shape=out, grid=(num, split) if split > 1 else (num,),
                             name="jaxquant_int8_weight_only", num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages, interpret=interpret)(*operands)


def _grad_kernel(g_ref, w_ref, sw_ref, o_ref, *, cfg: WeightOnlyConfig):
  m, n = g_ref.shape
  k = w_ref.shape[1]
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  rag_m, rag_n, rag_k = m % bm != 0, n % bn != 0, k % bk != 0
  num_m = _common.cdiv(m, bm)
  pid = pl.program_id(0)
  pid_k, pid_m = pid // num_m, pid % num_m
  m0, k0 = pid_m * bm, pid_k * bk
  dims = (((1,), (0,)), ((), ()))

  def body(nb, acc):
    n0 = nb * bn
    g = _common.load_tile(g_ref, (m0, n0), (bm, bn), (rag_m, rag_n))
    w = _decode(_common.load_tile(w_ref, (n0, k0), (bn, bk), (rag_n, rag_k)), jnp.float32, cfg)
    sw = _common.load_tile(sw_ref, (n0,), (bn,), (rag_n,))
    w = (w * sw[:, None] * jnp.float32(DEQUANT_SCALE)).astype(g.dtype)
    return acc + jax.lax.dot_general(g, w, dims, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, _common.cdiv(n, bn), body, jnp.zeros((bm, bk), jnp.float32))
  _common.store_tile(o_ref, (m0, k0), acc, (rag_m, rag_k))


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def grad_input_matmul(g: jax.Array, w_q: jax.Array, w_stats: jax.Array, *,
                      interpret: bool = False,
                      config: WeightOnlyConfig | None = None) -> jax.Array:
  """``g @ dequant(w_q)``: the input gradient of an int8 layer.

  Args:
    g: ``(M, N)`` float16/bfloat16 output cotangent.
    w_q: ``int8 (N, K)``; ``w_stats``: ``float32 (N,)``.
    interpret: run in the Pallas interpreter.
    config: tiles (``block_n`` is the reduction step, ``block_k`` the output columns).

  Returns:
    ``(M, K)`` in ``g.dtype``, with the weight rounded to ``g.dtype`` after dequantization.
  """
  m = g.shape[0]
  n, k = w_q.shape
  cfg = config or grad_config(m, n, k)
  cfg.check()
  num = _common.cdiv(m, cfg.block_m) * _common.cdiv(k, cfg.block_k)
  return _common.pallas_call(
      functools.partial(_grad_kernel, cfg=cfg), out_shape=jax.ShapeDtypeStruct((m, k), g.dtype),
      grid=(num,), name="jaxquant_int8_grad_input", num_warps=cfg.num_warps,
      num_stages=cfg.num_stages, interpret=interpret)(g, w_q, w_stats.astype(jnp.float32))
