"""Pure-jnp LLM.int8(): row-wise int8 quantization and the int8 matmul with outlier
decomposition. The CPU fallback and the oracle of the kernels.

Semantics follow bitsandbytes (``int8_vectorwise_quant``, ``int8_mm_dequant``,
``int8_mixed_scaled_mm``):

* ``stats[r] = max_j |x[r, j]|`` over the non-outlier elements, ``q = rint(x * (127 / stats))``
  (round half to even); a row of zeros quantizes to zeros;
* with ``threshold > 0`` an element with ``|x| >= threshold`` is an outlier; its column is an
  outlier column; outlier columns are zeroed in ``q`` (whole columns when there are several
  rows, as bitsandbytes does) and computed instead in 16-bit against the dequantized int8
  weight columns;
* ``y = (q_x @ q_w.T) * stats_x[:, None] * stats_w[None, :] / 127**2  (+ x_out @ w_out.T) + bias``.

Outlier columns are returned as a boolean mask of static shape ``(K,)`` rather than a list of
indices, so everything stays jit-able.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "int8_vectorwise_quant",
    "int8_vectorwise_dequant",
    "int8_linear",
    "int8_linear_grad_input",
    "int8_scaled_matmul",
    "int8_weight_only_linear",
    "DEQUANT_SCALE",
    "MM_DEQUANT_SCALE",
]

# bitsandbytes' constants: 1/127 (int8_vectorwise_dequant) and float32(1/127**2) (CUDA kernel).
DEQUANT_SCALE = 7.874015718698502e-3
MM_DEQUANT_SCALE = 6.200012e-05


def int8_vectorwise_quant(x: jax.Array, *, threshold: float = 0.0):
  """Row-wise absmax int8 quantization.

  Args:
    x: ``(..., K)`` float (float32/float16/bfloat16); rows are all leading elements.
    threshold: outlier threshold; ``0`` disables outlier detection.

  Returns:
    ``(q, stats, outlier_cols)``: ``int8 (..., K)``, ``float32 (...)`` row absmax (outliers
    excluded) and ``bool (K,)`` outlier columns (all False when ``threshold == 0``).
  """
  k = x.shape[-1]
  x2 = x.reshape(-1, k).astype(jnp.float32)
  ax = jnp.abs(x2)
  if threshold > 0:
    outlier = ax >= jnp.float32(threshold)
    outlier_cols = jnp.any(outlier, axis=0)
    ax = jnp.where(outlier, 0.0, ax)
  else:
    outlier = None
    outlier_cols = jnp.zeros((k,), bool)
  stats = jnp.max(ax, axis=1)
  scale = jnp.where(stats > 0, jnp.float32(127.0) / stats, 0.0)
  q = jnp.rint(x2 * scale[:, None])
  if outlier is not None:
    zero = outlier_cols[None, :] if x2.shape[0] > 1 else outlier
    q = jnp.where(zero, 0.0, q)
  q = jnp.clip(q, -127, 127).astype(jnp.int8)
  return q.reshape(x.shape), stats.reshape(x.shape[:-1]), outlier_cols


def int8_vectorwise_dequant(q: jax.Array, stats: jax.Array) -> jax.Array:
  """``float32(q) * stats[..., None] / 127``: ``(..., K)`` float32."""
  return q.astype(jnp.float32) * stats[..., None].astype(jnp.float32) * jnp.float32(DEQUANT_SCALE)


def _dequantized_weight(w_q: jax.Array, w_stats: jax.Array, dtype) -> jax.Array:
  return int8_vectorwise_dequant(w_q, w_stats).astype(dtype)


def int8_linear(x: jax.Array, w_q: jax.Array, w_stats: jax.Array, bias: jax.Array | None, *,
                threshold: float) -> jax.Array:
  """LLM.int8() linear layer ``x @ W.T + bias``.

  Args:
    x: ``(..., K)`` float activations.
    w_q: ``int8 (N, K)`` row-wise quantized weight (bitsandbytes' ``CB``).
    w_stats: ``float32 (N,)`` weight row absmax (``SCB``).
    bias: ``(N,)`` or ``None``.
    threshold: outlier threshold; ``0`` disables the 16-bit outlier path.

  Returns:
    ``(..., N)`` in ``x.dtype``; int32 accumulation, float32 dequantization.
  """
  k = x.shape[-1]
  x2 = x.reshape(-1, k)
  x_q, x_stats, outlier_cols = int8_vectorwise_quant(x2, threshold=threshold)
  acc = jax.lax.dot_general(x_q, w_q, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.int32)
  scale = x_stats[:, None] * w_stats.astype(jnp.float32)[None, :]
  y = acc.astype(jnp.float32) * scale * jnp.float32(MM_DEQUANT_SCALE)
  if threshold > 0:
    x_out = jnp.where(outlier_cols[None, :], x2, jnp.zeros((), x2.dtype))
    w_deq = _dequantized_weight(w_q, w_stats, x2.dtype)
    y = y + jax.lax.dot_general(x_out, w_deq, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)[None, :]
  return y.astype(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])


def int8_linear_grad_input(g: jax.Array, w_q: jax.Array, w_stats: jax.Array) -> jax.Array:
  """``g @ dequant(W)``: ``(..., N)`` → ``(..., K)`` in ``g.dtype``."""
  w_deq = _dequantized_weight(w_q, w_stats, g.dtype)
  return jax.lax.dot_general(g, w_deq, (((g.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32).astype(g.dtype)


def int8_scaled_matmul(a_q: jax.Array, a_stats: jax.Array, w_q: jax.Array, w_stats: jax.Array,
                       bias: jax.Array | None = None, *, out_dtype=jnp.bfloat16) -> jax.Array:
  """w8a8 matmul of already quantized rows (bitsandbytes' ``int8_scaled_mm``).

  Args:
    a_q: ``int8 (..., K)`` row-quantized activations; ``a_stats``: ``float32 (...)``.
    w_q: ``int8 (N, K)``; ``w_stats``: ``float32 (N,)``.
    bias: ``(N,)`` or None.
    out_dtype: the output dtype.

  Returns:
    ``(..., N)``: ``(a_q @ w_q.T)`` in int32, times ``a_stats * w_stats / 127**2``, plus bias.
  """
  k = a_q.shape[-1]
  acc = jax.lax.dot_general(a_q.reshape(-1, k), w_q, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.int32)
  scale = a_stats.reshape(-1).astype(jnp.float32)[:, None] * w_stats.astype(jnp.float32)[None, :]
  y = acc.astype(jnp.float32) * scale * jnp.float32(MM_DEQUANT_SCALE)
  if bias is not None:
    y = y + bias.astype(jnp.float32)[None, :]
  return y.astype(out_dtype).reshape(*a_q.shape[:-1], w_q.shape[0])


def int8_weight_only_linear(x: jax.Array, w_q: jax.Array, w_stats: jax.Array,
                            bias: jax.Array | None = None) -> jax.Array:
  """Weight-only int8 linear ``x @ dequant(W).T + bias`` (activations stay in 16 bits).

  The int8 weight is converted to ``x.dtype`` (exact for float16/bfloat16/float32), the product
  accumulates in float32 and the row scale ``w_stats / 127`` multiplies the result.

  Args:
    x: ``(..., K)`` float.
    w_q: ``int8 (N, K)``; ``w_stats``: ``float32 (N,)``.
    bias: ``(N,)`` or None.

  Returns:
    ``(..., N)`` in ``x.dtype``.
  """
  k = x.shape[-1]
  acc = jax.lax.dot_general(x.reshape(-1, k), w_q.astype(x.dtype), (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
  y = acc * (w_stats.astype(jnp.float32) * jnp.float32(DEQUANT_SCALE))[None, :]
  if bias is not None:
    y = y + bias.astype(jnp.float32)[None, :]
  return y.astype(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])
