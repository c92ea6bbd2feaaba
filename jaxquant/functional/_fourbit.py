"""4-bit blockwise quantization (NF4 / FP4) with optional double quantization."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from jaxquant import _dispatch, _validate, codebooks
from jaxquant.functional import _layout
from jaxquant.quant_state import FOUR_BIT_TYPES, QuantState
from pallas_kernels.fourbit_matmul.reference import NestedAbsmax

__all__ = ["quantize_4bit", "quantize_nf4", "quantize_fp4", "dequantize_4bit",
           "dequantize_absmax", "NESTED_BLOCKSIZE"]

NESTED_BLOCKSIZE = 256


def quantize_4bit(x: ArrayLike, blocksize: int = 64, compress_statistics: bool = False,
                  quant_type: str = "fp4", *, backend: str | None = None) -> QuantState:
  """Quantize ``x`` to 4-bit NF4 or FP4 codes, blockwise, as bitsandbytes does.

  Args:
    x: any shape, float32/float16/bfloat16. For a linear weight pass torch layout
      ``(out_features, in_features)`` (a Flax kernel ``(in, out)`` transposed) so blocks run
      along the reduction dimension.
    blocksize: elements per absmax, one of 32, 64, ..., 4096.
    compress_statistics: double quantization: the absmax, minus its mean, is itself quantized
      to 8 bits with the signed dynamic map in blocks of 256 (saves ~0.37 bit/param at 64).
    quant_type: ``"nf4"`` or ``"fp4"`` (bitsandbytes' FP4, not OCP E2M1).
    backend: ``None``, ``"auto"``, ``"xla"``, ``"pallas"`` or ``"interpret"``.

  Returns:
    A :class:`QuantState` with ``data`` uint8 packed two codes per byte (first element in the
    high nibble), ``absmax`` float32 (uint8 when double quantized) and ``code`` float32 (16,).
    When ``x.shape[-1] % blocksize == 0`` the arrays keep the leading dimensions
    (``data``: ``x.shape[:-1] + (x.shape[-1] // 2,)``), otherwise they are flat. The bytes
    equal bitsandbytes' CUDA ``quantize_4bit`` (an all-zero block gets absmax 0 and code 0).

  Raises:
    ValueError / TypeError: bad blocksize, quant type, dtype or an empty ``x``; NaN/Inf in a
      concrete ``x`` (under ``jit`` values cannot be checked: a NaN makes its block's absmax
      NaN and takes code 0).
  """
  x = jnp.asarray(x) if not hasattr(x, "shape") else x
  _validate.check_array("x", x)
  blocksize = _validate.check_blocksize(blocksize, _validate.BLOCKSIZES_4BIT)
  _validate.check_choice("quant_type", quant_type, FOUR_BIT_TYPES)
  if not isinstance(compress_statistics, (bool, np.bool_)):
    raise TypeError(f"compress_statistics must be a bool, got {compress_statistics!r}")
  compress_statistics = bool(compress_statistics)
  _validate.check_finite("x", x)
  shape = tuple(x.shape)
  packed, absmax = _dispatch.call("quantize_4bit", backend, x, blocksize=blocksize,
                                  quant_type=quant_type)
  packed = packed.reshape(_layout.packed_shape(shape, blocksize))
  absmax = absmax.reshape(_layout.absmax_shape(shape, blocksize))
  code = jnp.asarray(codebooks.get_codebook(quant_type))
  nested = dict(nested_absmax=None, nested_code=None, offset=None, nested_blocksize=None)
  if compress_statistics:
    offset = jnp.mean(absmax)
    nested_code = jnp.asarray(codebooks.dynamic_map(True))
    q_absmax, nested_absmax = _dispatch.call("quantize_8bit", backend, absmax - offset,
                                             nested_code, blocksize=NESTED_BLOCKSIZE)
    absmax = q_absmax.reshape(absmax.shape)
    nested = dict(nested_absmax=nested_absmax, nested_code=nested_code, offset=offset,
                  nested_blocksize=NESTED_BLOCKSIZE)
  return QuantState(data=packed, absmax=absmax, code=code, shape=shape, dtype=x.dtype,
                    blocksize=blocksize, quant_type=quant_type, **nested)


def quantize_nf4(x: ArrayLike, blocksize: int = 64, compress_statistics: bool = False, *,
                 backend: str | None = None) -> QuantState:
  """:func:`quantize_4bit` with ``quant_type="nf4"``."""
  return quantize_4bit(x, blocksize, compress_statistics, "nf4", backend=backend)


def quantize_fp4(x: ArrayLike, blocksize: int = 64, compress_statistics: bool = False, *,
                 backend: str | None = None) -> QuantState:
  """:func:`quantize_4bit` with ``quant_type="fp4"``."""
  return quantize_4bit(x, blocksize, compress_statistics, "fp4", backend=backend)


def check_4bit_state(state: QuantState, name: str = "state") -> None:
  if not isinstance(state, QuantState):
    raise TypeError(f"{name} must be a QuantState, got {type(state).__name__}")
  _validate.check_choice(f"{name}.quant_type", state.quant_type, FOUR_BIT_TYPES)
  state.check()


def nested_of(state: QuantState) -> NestedAbsmax | None:
  """The double quantization of ``state.absmax`` in the kernels' argument form."""
  if not state.nested:
    return None
  return NestedAbsmax(state.nested_absmax, state.nested_code, state.offset,
                      state.nested_blocksize)


def dequantize_absmax(state: QuantState, *, backend: str | None = None) -> jax.Array:
  """float32 absmax of a 4-bit state, decoding double quantization; shape of ``state.absmax``:
  ``nested_code[q] * nested_absmax[i // nested_blocksize] + offset``."""
  check_4bit_state(state)
  if not state.nested:
    return state.absmax
  values = _dispatch.call("dequantize_8bit", backend, state.absmax, state.nested_absmax,
                          state.nested_code, blocksize=state.nested_blocksize,
                          dtype=jnp.float32)
  values = jax.lax.nextafter(values, values)  # = values; keeps XLA from fusing into an FMA
  return (values + state.offset).reshape(state.absmax.shape)


def dequantize_4bit(state: QuantState, dtype: DTypeLike | None = None, *,
                    backend: str | None = None) -> jax.Array:
  """Inverse of :func:`quantize_4bit`.

  Args:
    state: a nf4/fp4 :class:`QuantState`.
    dtype: output dtype (default ``state.dtype``).
    backend: ``None``, ``"auto"``, ``"xla"``, ``"pallas"`` or ``"interpret"``.

  Returns:
    Array of ``state.shape`` in ``dtype``: ``dtype(code[q] * absmax[block])``.
  """
  check_4bit_state(state)
  dtype = state.dtype if dtype is None else _validate.check_dtype_arg("dtype", dtype)
  nested, nested_kw = (), {}
  if state.nested:  # decoded inside the op (the kernel never writes the float32 absmax)
    nested = (state.nested_absmax, state.nested_code, state.offset)
    nested_kw = {"nested_blocksize": state.nested_blocksize}
  flat = _dispatch.call("dequantize_4bit", backend, state.data, state.absmax, state.code,
                        *nested, blocksize=state.blocksize, n=state.size, dtype=dtype,
                        **nested_kw)
  return flat.reshape(state.shape)
