"""The two other int8 matmuls: w8a8 on already-quantized activations, and weight-only int8.

* :func:`int8_matmul` multiplies int8 rows (from :func:`int8_vectorwise_quant`) by an int8
  weight on the int8 tensor cores and dequantizes in the same kernel (inference; to train
  through int8 use :func:`int8_linear`, which quantizes inside and has a VJP).
* :func:`int8_weight_only_linear` keeps the activations in 16 bits and decodes the int8 weight
  in registers: half the weight bytes of bfloat16, no activation rounding; differentiable in
  ``x`` and ``bias``.
"""

from __future__ import annotations

import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from jaxquant import _dispatch, _validate
from jaxquant.functional._cotangent import bias_cotangent, zeros_cotangent
from jaxquant.functional._int8 import check_int8_state, check_linear_args
from jaxquant.quant_state import QuantState

__all__ = ["int8_matmul", "int8_weight_only_linear", "PARTITIONED"]

#: Set by :mod:`jaxquant.sharding` while a mesh is in use: ``fn(x, state, bias, backend)``
#: that runs the weight-only int8 linear per shard (``shard_map``), since XLA cannot partition
#: a Pallas custom call. ``None``: one program over the arrays as they are.
PARTITIONED: contextvars.ContextVar = contextvars.ContextVar(
    "jaxquant_partitioned_int8_weight_only_linear", default=None)


def int8_matmul(a_q: ArrayLike, a_stats: ArrayLike, state: QuantState,
                bias: ArrayLike | None = None, *, dtype: DTypeLike = jnp.bfloat16,
                backend: str | None = None) -> jax.Array:
  """w8a8 matmul ``dequant(a_q) @ dequant(W).T + bias`` (bitsandbytes' ``int8_scaled_mm``).

  The int32 product of the int8 operands is scaled by ``a_stats * w_stats / 127**2``; the
  bias and the cast to ``dtype`` happen in the same kernel on the GPU.

  Args:
    a_q: ``int8 (..., K)`` row-quantized activations (``int8_vectorwise_quant(x)[0]``).
    a_stats: ``float32 (...)`` their row absmax.
    state: ``quantize_int8(w)`` of a ``(N, K)`` weight.
    bias: ``(N,)`` or None.
    dtype: output dtype (float32, float16 or bfloat16).
    backend: ``None``, ``"auto"``, ``"xla"``, ``"pallas"`` or ``"interpret"``.

  Returns:
    ``(..., N)`` in ``dtype``. Not differentiable (integer inputs).
  """
  check_int8_state(state)
  _validate.check_array("a_q", a_q, dtypes=(jnp.int8,))
  _validate.check_array("a_stats", a_stats, dtypes=(jnp.float32,), min_ndim=0)
  if tuple(a_stats.shape) != tuple(a_q.shape[:-1]):
    raise ValueError(f"a_stats must have shape {tuple(a_q.shape[:-1])} (a_q.shape[:-1]), got "
                     f"{tuple(a_stats.shape)}")
  if a_q.shape[-1] != state.shape[1]:
    raise ValueError(f"a_q.shape[-1] must equal the weight's in_features {state.shape[1]} "
                     f"(weight shape {state.shape}), got a_q of shape {tuple(a_q.shape)}")
  if bias is not None:
    _validate.check_array("bias", bias)
    if tuple(bias.shape) != (state.shape[0],):
      raise ValueError(f"bias must have shape ({state.shape[0]},), got {tuple(bias.shape)}")
  out_dtype = _validate.check_dtype_arg("dtype", dtype)
  return _dispatch.call("int8_scaled_matmul", backend, a_q, a_stats, state.data, state.absmax,
                        bias, out_dtype=out_dtype)


def int8_weight_only_linear(x: ArrayLike, state: QuantState, bias: ArrayLike | None = None, *,
                            backend: str | None = None) -> jax.Array:
  """Weight-only int8 linear ``x @ dequant(W).T + bias`` with 16-bit activations.

  The int8 weight is decoded to ``x.dtype`` tile by tile, the product accumulates in float32
  and the row scale ``absmax / 127`` is applied to the result. Differentiable in ``x`` and
  ``bias`` (``dx = dy @ dequant(W)``); the weight is a constant.

  Args:
    x: ``(..., K)`` float32/float16/bfloat16 (the kernels take float16/bfloat16; float32 runs
      the reference).
    state: ``quantize_int8(w)`` of a ``(N, K)`` weight.
    bias: ``(N,)`` or None.
    backend: ``None``, ``"auto"``, ``"xla"``, ``"pallas"`` or ``"interpret"``.

  Returns:
    ``(..., N)`` in ``x.dtype``.
  """
  x = jnp.asarray(x) if not hasattr(x, "shape") else x
  check_int8_state(state)
  check_linear_args(x, state, bias)
  if x.size == 0:  # no rows: an empty result, as jnp.dot
    return jnp.zeros((*x.shape[:-1], state.shape[0]), x.dtype)
  partitioned = PARTITIONED.get()
  if partitioned is not None:
    return partitioned(x, state, bias, backend)
  return _weight_only(x, state, bias, backend)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _weight_only(x, state, bias, backend):
  return _dispatch.call("int8_weight_only_linear", backend, x, state.data, state.absmax, bias)


def _weight_only_fwd(x, state, bias, backend):
  return _weight_only(x, state, bias, backend), (state, bias)


def _weight_only_bwd(backend, res, g):
  state, bias = res
  dx = _dispatch.call("int8_linear_grad_input", backend, g, state.data, state.absmax)
  return dx, zeros_cotangent(state), bias_cotangent(g, bias)


_weight_only.defvjp(_weight_only_fwd, _weight_only_bwd)
