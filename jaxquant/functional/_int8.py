"""LLM.int8(): row-wise int8 quantization, the int8 weight state and the int8 linear layer."""

from __future__ import annotations

import contextvars
import functools
import numbers

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxquant import _dispatch, _validate
from jaxquant.functional._cotangent import bias_cotangent, zeros_cotangent
from jaxquant.quant_state import QuantState
from pallas_kernels.int8_matmul import reference

__all__ = ["int8_vectorwise_quant", "int8_vectorwise_dequant", "quantize_int8", "int8_linear",
           "PARTITIONED"]

#: Set by :mod:`jaxquant.sharding` while a mesh is in use: ``fn(x, state, bias, threshold,
#: backend)`` that runs the LLM.int8() linear per shard (``shard_map``), since XLA cannot
#: partition a Pallas custom call. ``None``: one program over the arrays as they are.
PARTITIONED: contextvars.ContextVar = contextvars.ContextVar("jaxquant_partitioned_int8_linear",
                                                             default=None)


def _check_threshold(threshold: float) -> float:
  if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or threshold < 0:
    raise ValueError(f"threshold must be a float >= 0 (0 disables outliers), got {threshold!r}")
  return float(threshold)


def int8_vectorwise_quant(x: ArrayLike, threshold: float = 0.0, *, backend: str | None = None):
  """Row-wise absmax int8 quantization (bitsandbytes' ``int8_vectorwise_quant``).

  Args:
    x: ``(..., K)`` float32/float16/bfloat16; every leading index is a row.
    threshold: elements with ``|x| >= threshold`` are outliers (excluded from the row scale,
      zeroed in the int8 values, their columns reported); ``0`` disables this.
    backend: ``None``, ``"auto"``, ``"xla"``, ``"pallas"`` or ``"interpret"``.

  Returns:
    ``(q, row_stats, outlier_cols)``: ``int8 (..., K)``, ``float32 (...)`` row absmax and a
    ``bool (K,)`` mask of outlier columns (bitsandbytes returns their indices:
    ``jnp.nonzero(outlier_cols)`` outside jit). ``q = rint(x * 127 / row_stats)``.
  """
  x = jnp.asarray(x) if not hasattr(x, "shape") else x
  _validate.check_array("x", x)
  threshold = _check_threshold(threshold)
  return _dispatch.call("int8_vectorwise_quant", backend, x, threshold=threshold)


def int8_vectorwise_dequant(q: ArrayLike, row_stats: ArrayLike) -> jax.Array:
  """``q * row_stats / 127``: ``int8 (..., K)``, ``float32 (...)`` → ``float32 (..., K)``."""
  _validate.check_array("q", q, dtypes=(jnp.int8,))
  _validate.check_array("row_stats", row_stats, dtypes=(jnp.float32,), min_ndim=0)
  if tuple(row_stats.shape) != tuple(q.shape[:-1]):
    raise ValueError(f"row_stats must have shape {tuple(q.shape[:-1])} (q.shape[:-1]), got "
                     f"{tuple(row_stats.shape)}")
  return reference.int8_vectorwise_dequant(q, row_stats)


def quantize_int8(w: ArrayLike) -> QuantState:
  """The row-wise int8 weight of bitsandbytes' ``Int8Params`` (its ``CB`` and ``SCB``).

  As bitsandbytes does, the weight is first rounded to float16, so the bytes match its
  checkpoints.

  Args:
    w: ``(out_features, in_features)`` float weight (torch layout).

  Returns:
    An ``int8_rowwise`` :class:`QuantState`: ``data`` int8 ``(N, K)``, ``absmax`` float32
    ``(N,)`` (one scale per output row), ``code`` None.
  """
  w = jnp.asarray(w) if not hasattr(w, "shape") else w
  _validate.check_array("w", w, ndim=2)
  _validate.check_finite("w", w)
  _validate.check_float16_range("w", w)
  q, stats, _ = reference.int8_vectorwise_quant(w.astype(jnp.float16), threshold=0.0)
  return QuantState(data=q, absmax=stats, code=None, nested_absmax=None, nested_code=None,
                    offset=None, shape=tuple(w.shape), dtype=w.dtype, blocksize=w.shape[1],
                    quant_type="int8_rowwise")


def check_int8_state(state: QuantState) -> None:
  if not isinstance(state, QuantState):
    raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
  _validate.check_choice("state.quant_type", state.quant_type, ("int8_rowwise",))
  state.check()


def check_linear_args(x, state: QuantState, bias) -> None:
  _validate.check_array("x", x, allow_empty=True)
  if x.shape[-1] != state.shape[1]:
    raise ValueError(f"x.shape[-1] must equal the weight's in_features {state.shape[1]} "
                     f"(weight shape {state.shape}), got x of shape {tuple(x.shape)}")
  if bias is not None:
    _validate.check_array("bias", bias)
    if tuple(bias.shape) != (state.shape[0],):
      raise ValueError(f"bias must have shape ({state.shape[0]},), got {tuple(bias.shape)}")


def int8_linear(x: ArrayLike, state: QuantState, bias: ArrayLike | None = None,
                threshold: float = 6.0, *, backend: str | None = None) -> jax.Array:
  """LLM.int8() linear: ``x @ W.T + bias`` with int8 activations and weight.

  Rows of ``x`` are quantized to int8 on the fly; with ``threshold > 0`` the columns holding
  an outlier (``|x| >= threshold``) are computed in 16-bit against the dequantized weight
  columns and added back; ``threshold=0`` is plain w8a8. Differentiable in ``x`` and ``bias``
  (``dx = dy @ dequant(W)``); the weight is a constant.

  On a GPU (``backend="pallas"`` or auto) one Pallas kernel quantizes the rows and flags the
  outlier columns, and one int8 tensor-core GEMM dequantizes, adds the outlier product (up to
  128 outlier columns, gathered into fixed slots; more take the reference) and the bias in its
  epilogue. float16/bfloat16 activations (float32 with ``threshold=0``) take the kernels.

  Args:
    x: ``(..., K)`` float32/float16/bfloat16 (an empty batch gives an empty result).
    state: ``quantize_int8(w)`` of a ``(N, K)`` weight.
    bias: ``(N,)`` or None.
    threshold: outlier threshold (``0`` disables the outlier path).
    backend: ``None``, ``"auto"``, ``"xla"``, ``"pallas"`` or ``"interpret"``.

  Returns:
    ``(..., N)`` in ``x.dtype``.
  """
  x = jnp.asarray(x) if not hasattr(x, "shape") else x
  check_int8_state(state)
  check_linear_args(x, state, bias)
  if x.size == 0:  # no rows: an empty result, as jnp.dot (and bnb's MatMul8bitLt)
    return jnp.zeros((*x.shape[:-1], state.shape[0]), x.dtype)
  threshold = _check_threshold(threshold)
  partitioned = PARTITIONED.get()
  if partitioned is not None:
    return partitioned(x, state, bias, threshold, backend)
  return _int8_linear(x, state, bias, threshold, backend)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _int8_linear(x, state, bias, threshold, backend):
  return _dispatch.call("int8_linear", backend, x, state.data, state.absmax, bias,
                        threshold=threshold)


def _int8_linear_fwd(x, state, bias, threshold, backend):
  return _int8_linear(x, state, bias, threshold, backend), (state, bias)


def _int8_linear_bwd(threshold, backend, res, g):
  del threshold
  state, bias = res
  dx = _dispatch.call("int8_linear_grad_input", backend, g, state.data, state.absmax)
  return dx, zeros_cotangent(state), bias_cotangent(g, bias)


_int8_linear.defvjp(_int8_linear_fwd, _int8_linear_bwd)
