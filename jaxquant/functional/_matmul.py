"""4-bit matmul (QLoRA's frozen base weight) with a custom VJP."""

from __future__ import annotations

import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxquant import _dispatch, _validate
from jaxquant.functional._cotangent import bias_cotangent, zeros_cotangent
from jaxquant.functional._fourbit import check_4bit_state, nested_of
from jaxquant.quant_state import QuantState

__all__ = ["matmul_4bit", "PARTITIONED"]

#: Set by :mod:`jaxquant.sharding` while a mesh is in use: ``fn(x, state, bias, backend)``
#: that runs the 4-bit matmul per shard (``shard_map``), since XLA cannot partition a Pallas
#: custom call. ``None``: one program over the arrays as they are.
PARTITIONED: contextvars.ContextVar = contextvars.ContextVar("jaxquant_partitioned_matmul_4bit",
                                                             default=None)


def matmul_4bit(x: ArrayLike, state: QuantState, bias: ArrayLike | None = None, *,
                backend: str | None = None) -> jax.Array:
  """``x @ W.T + bias`` with a 4-bit weight ``W`` (bitsandbytes' ``matmul_4bit``).

  The product is computed in ``x.dtype`` with float32 accumulation: ``W`` is dequantized to
  ``x.dtype``. On the GPU the decode is fused into the matmul kernel for up to a few hundred
  rows of ``x``; beyond that (and wherever the tuning table found it faster) ``W`` is decoded
  once into a transient ``(N, K)`` array that XLA's dot consumes, as the reference always does
  (see :mod:`pallas_kernels.fourbit_matmul`). Differentiable in ``x`` and ``bias``; the
  quantized weight is a constant (``dx = dy @ dequant(W)``, chosen the same way).

  Args:
    x: ``(..., K)`` float32/float16/bfloat16, any leading dims (an empty batch gives an
      empty result).
    state: 4-bit :class:`QuantState` of a ``(N, K)`` weight (torch layout).
    bias: ``(N,)`` or None.
    backend: ``None``, ``"auto"``, ``"xla"``, ``"pallas"`` or ``"interpret"``.

  Returns:
    ``(..., N)`` in ``x.dtype``.
  """
  x = jnp.asarray(x) if not hasattr(x, "shape") else x
  check_4bit_state(state)
  if state.ndim != 2:
    raise ValueError(f"state must hold a 2-D (out_features, in_features) weight, got shape "
                     f"{state.shape}")
  _validate.check_array("x", x, allow_empty=True)
  if x.shape[-1] != state.shape[1]:
    raise ValueError(f"x.shape[-1] must equal the weight's in_features {state.shape[1]} "
                     f"(weight shape {state.shape}), got x of shape {tuple(x.shape)}")
  if bias is not None:
    _validate.check_array("bias", bias)
    if tuple(bias.shape) != (state.shape[0],):
      raise ValueError(f"bias must have shape ({state.shape[0]},), got {tuple(bias.shape)}")
  if x.size == 0:  # no rows (e.g. an expert that got no tokens): as jnp.dot, and bnb
    return jnp.zeros((*x.shape[:-1], state.shape[0]), x.dtype)
  partitioned = PARTITIONED.get()
  if partitioned is not None:
    return partitioned(x, state, bias, backend)
  return _matmul_4bit(x, state, bias, backend)


def _weight_kwargs(state: QuantState) -> dict:
  return dict(shape=state.shape, blocksize=state.blocksize, nested=nested_of(state))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _matmul_4bit(x, state, bias, backend):
  return _dispatch.call("matmul_4bit", backend, x, state.data, state.absmax, state.code, bias,
                        **_weight_kwargs(state))


def _matmul_4bit_fwd(x, state, bias, backend):
  return _matmul_4bit(x, state, bias, backend), (state, bias)


def _matmul_4bit_bwd(backend, res, g):
  state, bias = res
  dx = _dispatch.call("matmul_4bit_grad_input", backend, g, state.data, state.absmax,
                      state.code, **_weight_kwargs(state))
  return dx, zeros_cotangent(state), bias_cotangent(g, bias)


_matmul_4bit.defvjp(_matmul_4bit_fwd, _matmul_4bit_bwd)
