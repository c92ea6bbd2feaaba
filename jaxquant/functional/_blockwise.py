"""8-bit blockwise quantization with a 256-entry codebook (bitsandbytes' quantize_blockwise)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jaxquant import _dispatch, _validate, codebooks
from jaxquant.functional import _layout
from jaxquant.quant_state import QuantState

__all__ = ["quantize_blockwise", "dequantize_blockwise"]


def _check_code(code: ArrayLike | None, signed: bool = True) -> jax.Array:
  if code is None:
    return jnp.asarray(codebooks.dynamic_map(signed))
  if not hasattr(code, "shape"):
    code = jnp.asarray(code)
  if tuple(code.shape) != (256,):
    raise ValueError(f"code must have shape (256,) (one value per byte), got {tuple(code.shape)}")
  _validate.check_array("code", code)
  if _validate.is_concrete(code):  # the encoder's binary search needs ascending finite values
    values = np.asarray(jax.device_get(code), np.float32)
    bad = np.flatnonzero(~np.isfinite(values[1:]) | ~np.isfinite(values[:-1])
                         | (values[1:] < values[:-1]))
    if bad.size:
      i = int(bad[0])
      raise ValueError(f"code must be sorted ascending and finite (quantization searches it "
                       f"by bisection), got code[{i}]={values[i]} and code[{i + 1}]="
                       f"{values[i + 1]}")
  return jnp.asarray(code, jnp.float32)


def quantize_blockwise(x: ArrayLike, code: ArrayLike | None = None, blocksize: int = 4096, *,
                       backend: str | None = None) -> QuantState:
  """Quantize ``x`` to 8-bit codes into ``code``, one float32 absmax per block.

  Args:
    x: any shape, float32/float16/bfloat16.
    code: ``(256,)`` codebook in [-1, 1], sorted ascending (checked outside ``jit``);
      default: bitsandbytes' signed dynamic map.
    blocksize: elements per block, one of 64, 128, ..., 4096.
    backend: ``None``, ``"auto"``, ``"xla"``, ``"pallas"`` or ``"interpret"``.

  Returns:
    A ``blockwise8`` :class:`QuantState`: ``data`` uint8 of ``x.shape``, ``absmax`` float32
    (``x.shape[:-1] + (x.shape[-1] // blocksize,)`` or flat ``(ceil(x.size / blocksize),)``),
    ``code`` float32 ``(256,)``. Bytes equal bitsandbytes' CUDA ``quantize_blockwise``.
  """
  x = jnp.asarray(x) if not hasattr(x, "shape") else x
  _validate.check_array("x", x)
  blocksize = _validate.check_blocksize(blocksize, _validate.BLOCKSIZES_8BIT)
  code = _check_code(code)
  _validate.check_finite("x", x)
  shape = tuple(x.shape)
  q, absmax = _dispatch.call("quantize_8bit", backend, x, code, blocksize=blocksize)
  return QuantState(
      data=q.reshape(shape), absmax=absmax.reshape(_layout.absmax_shape(shape, blocksize)),
      code=code, nested_absmax=None, nested_code=None, offset=None, shape=shape,
      dtype=x.dtype, blocksize=blocksize, quant_type="blockwise8")


def dequantize_blockwise(state: QuantState, dtype: DTypeLike | None = None, *,
                         backend: str | None = None) -> jax.Array:
  """Inverse of :func:`quantize_blockwise`: an array of ``state.shape`` in ``dtype``
  (default ``state.dtype``), ``dtype(code[q] * absmax[block])``."""
  if not isinstance(state, QuantState):
    raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
  _validate.check_choice("state.quant_type", state.quant_type, ("blockwise8",))
  state.check()
  dtype = state.dtype if dtype is None else _validate.check_dtype_arg("dtype", dtype)
  flat = _dispatch.call("dequantize_8bit", backend, state.data, state.absmax, state.code,
                        blocksize=state.blocksize, dtype=dtype)
  return flat.reshape(state.shape)
