"""The int8 layers composed from the kernels: LLM.int8() with outlier decomposition, w8a8.

``int8_linear`` quantizes the rows of ``x`` (one pass that also flags the outlier columns),
then runs one GEMM kernel whose epilogue dequantizes, adds the 16-bit product of the outlier
columns and the bias, and casts. The outlier columns are gathered into a fixed number of slots
(``capacity``), so every shape is static; which of three programs runs is chosen on the device:

* no outlier column: the plain int8 GEMM;
* up to ``capacity`` columns: the int8 GEMM over ``q`` with those columns zeroed, plus the
  16-bit product of the gathered ``x`` columns and dequantized weight columns, in one kernel;
* more: the reference (a 16-bit product over all of ``K``), slow but exact, never wrong.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.int8_matmul import _common, gemm, quantize, reference

__all__ = ["int8_linear", "int8_vectorwise_quant", "outlier_capacity", "supports",
           "MAX_OUTLIER_COLUMNS"]

MAX_OUTLIER_COLUMNS = 128


def outlier_capacity(k: int) -> int:
  """Outlier-column slots of the fast path: a power of two, at least 16, at most 128."""
  return min(MAX_OUTLIER_COLUMNS, _common.pow2_at_least(max(16, k)))


def supports(x, w_q, w_stats, bias=None, *, threshold: float = 0.0) -> bool:
  """Whether the kernels take this layer: 16-bit activations (float32 too without outliers)."""
  del w_stats, bias
  dtypes = gemm.OUTLIER_DTYPES + ((jnp.dtype(jnp.float32),) if threshold == 0 else ())
  return (x.ndim >= 1 and w_q.ndim == 2 and w_q.dtype == jnp.int8 and x.size > 0
          and x.shape[-1] == w_q.shape[1] and jnp.dtype(x.dtype) in dtypes and w_q.size > 0)


def int8_vectorwise_quant(x: jax.Array, *, threshold: float = 0.0, interpret: bool = False):
  """The kernel behind ``jaxquant.functional.int8_vectorwise_quant`` (same results as the
  reference: outlier columns zeroed in every row)."""
  k = x.shape[-1]
  q, stats, flags = quantize.rowwise_quant(x.reshape(-1, k), threshold=threshold,
                                           interpret=interpret)
  cols = quantize.outlier_columns(flags, k)
  q = quantize.zero_columns(q, cols)
  return q.reshape(x.shape), stats.reshape(x.shape[:-1]), cols


def _outlier_operands(x2, q, w_q, w_stats, cols, capacity):
  k = x2.shape[1]
  idx = jnp.nonzero(cols, size=capacity, fill_value=k)[0]
  valid = (idx < k)[None, :]
  safe = jnp.minimum(idx, k - 1)
  q = q.at[:, idx].set(jnp.zeros((), q.dtype), mode="drop")
  x_out = jnp.where(valid, x2[:, safe], jnp.zeros((), x2.dtype))
  w_out = reference.int8_vectorwise_dequant(w_q[:, safe], w_stats).astype(x2.dtype)
  w_out = jnp.where(valid, w_out, jnp.zeros((), x2.dtype))
  return q, x_out, w_out


@functools.partial(jax.jit, static_argnames=("threshold", "interpret", "capacity"))
def int8_linear(x: jax.Array, w_q: jax.Array, w_stats: jax.Array, bias: jax.Array | None,
                *, threshold: float, interpret: bool = False,
                capacity: int | None = None) -> jax.Array:
  """LLM.int8() linear ``x @ W.T + bias`` on the kernels (``threshold == 0``: plain w8a8).

  Args:
    x: ``(..., K)`` float16/bfloat16 (float32 allowed when ``threshold == 0``).
    w_q: ``int8 (N, K)``; ``w_stats``: ``float32 (N,)``.
    bias: ``(N,)`` or None.
    threshold: outlier threshold (``0``: none).
    interpret: run the kernels in the Pallas interpreter.
    capacity: outlier-column slots of the fast path (default :func:`outlier_capacity`).

  Returns:
    ``(..., N)`` in ``x.dtype``, as :func:`reference.int8_linear`.
  """
  k = x.shape[-1]
  n = w_q.shape[0]
  x2 = x.reshape(-1, k)
  q, stats, flags = quantize.rowwise_quant(x2, threshold=threshold, interpret=interpret)
  run = functools.partial(gemm.int8_gemm, out_dtype=x.dtype, interpret=interpret)
  if threshold == 0:
    y = run(q, stats, w_q, w_stats, bias)
  else:
    capacity = capacity or outlier_capacity(k)
    cols = quantize.outlier_columns(flags, k)
    count = jnp.sum(cols.astype(jnp.int32))

    def plain():
      return run(q, stats, w_q, w_stats, bias)

    def decomposed():
      qz, x_out, w_out = _outlier_operands(x2, q, w_q, w_stats, cols, capacity)
      return run(qz, stats, w_q, w_stats, bias, x_out, w_out)

    def everywhere():
      return reference.int8_linear(x2, w_q, w_stats, bias, threshold=threshold)

    branch = jnp.where(count == 0, 0, jnp.where(count <= capacity, 1, 2))
    y = jax.lax.switch(branch, (plain, decomposed, everywhere))
  return y.reshape(*x.shape[:-1], n)
