"""Computations shared by the NNX and Linen layers: dtype rules, quantizing a Flax kernel,
the quantized matmuls and embedding lookups. All take and return plain arrays/QuantStates."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxquant import _validate
from jaxquant import functional as F
from jaxquant.quant_state import FOUR_BIT_TYPES, QuantState

__all__ = [
    "output_dtype", "check_dropin_args", "check_4bit_layer", "quantize_kernel_4bit",
    "quantize_kernel_8bit", "linear_4bit", "linear_8bit", "embed_lookup", "embed_attend",
    "dequantize_kernel",
    "dequantize_table", "quantize_table", "constrain", "check_finite", "requantize_like",
    "merged_weight",
]

QUANT_TYPES_4BIT = FOUR_BIT_TYPES


def output_dtype(x_dtype: DTypeLike, param_dtype: DTypeLike, dtype: DTypeLike | None) -> Any:
  """The dtype the replaced Flax layer would return: ``dtype``, else the promotion of the
  input and parameter dtypes (always inexact), as ``flax.nnx.nn.dtypes.canonicalize_dtype``."""
  if dtype is not None:
    return jnp.dtype(dtype)
  dt = jnp.result_type(x_dtype, param_dtype)
  if not jnp.issubdtype(dt, jnp.inexact):
    dt = jnp.promote_types(jnp.float32, dt)
  return jnp.dtype(dt)


def check_dropin_args(layer: str, **hooks: Any) -> None:
  """Accept the computation hooks of the Flax layer being replaced (``dot_general``,
  ``promote_dtype``, ``dot_general_cls``) at their defaults only: a quantized layer computes
  through jaxquant's matmuls and could not honour a custom one."""
  from flax.nnx.nn import dtypes as nnx_dtypes
  from flax.linen import dtypes as linen_dtypes
  defaults = (None, jax.lax.dot_general, nnx_dtypes.promote_dtype, linen_dtypes.promote_dtype)
  for name, value in hooks.items():
    if not any(value is d for d in defaults):
      raise ValueError(f"{layer} computes through jaxquant's quantized matmul; {name} must be "
                       f"left at its default (a custom {name} cannot apply to a quantized "
                       f"weight), got {value!r}")


def check_4bit_layer(layer: str, in_features: int, *, quant_type: str, blocksize: int,
                     where: str = "") -> None:
  """Reject a 4-bit configuration that cannot hold a ``(*, in_features)`` weight."""
  _validate.check_choice("quant_type", quant_type, QUANT_TYPES_4BIT)
  _validate.check_choice("blocksize", blocksize, _validate.BLOCKSIZES_4BIT)
  if in_features % blocksize:
    divisors = [b for b in _validate.BLOCKSIZES_4BIT if in_features % b == 0]
    hint = (f"use blocksize in {tuple(divisors)}" if divisors else
            "no 4-bit blocksize divides it; keep this layer in floating point (skip_modules)")
    raise ValueError(
        f"blocksize={blocksize} does not divide {layer}={in_features}{where}: 4-bit blocks run "
        f"along the input dimension and must tile it exactly; {hint}")


def check_finite(name: str, w: jax.Array) -> None:
  """Outside ``jit``: reject a weight holding NaN/Inf (one reduction on the device, only the
  verdict comes back), naming the layer."""
  if _validate.is_concrete(w) and not _validate.all_finite(w):
    raise ValueError(f"{name} holds NaN or Inf values; quantization needs finite weights")


# Conversion runs one compiled program per (shape, dtype, settings) of the torch-layout
# weight: the many same-shaped layers of a model (and a kernel and a table of one shape)
# share it, and no intermediate of the quantizer is materialized eagerly.
@functools.partial(jax.jit, static_argnames=("quant_type", "blocksize", "double_quant"))
def _quantize_4bit_jit(w, *, quant_type, blocksize, double_quant):
  return F.quantize_4bit(w, blocksize, double_quant, quant_type)


def _quantize_4bit(w, *, quant_type, blocksize, double_quant, transpose):
  return _quantize_4bit_jit(w.T if transpose else w, quant_type=quant_type, blocksize=blocksize,
                            double_quant=double_quant)


_quantize_int8_jit = jax.jit(F.quantize_int8)


def _quantize_int8(w, *, transpose):
  return _quantize_int8_jit(w.T if transpose else w)


def quantize_kernel_4bit(kernel: jax.Array, *, quant_type: str, blocksize: int,
                         double_quant: bool, name: str = "kernel") -> QuantState:
  """A Flax kernel ``(in, out)`` → 4-bit QuantState of its transpose ``(out, in)``."""
  check_finite(name, kernel)
  return _quantize_4bit(kernel, quant_type=quant_type, blocksize=int(blocksize),
                        double_quant=bool(double_quant), transpose=True)


def quantize_kernel_8bit(kernel: jax.Array, *, name: str = "kernel") -> QuantState:
  """A Flax kernel ``(in, out)`` → LLM.int8() row-wise QuantState of ``(out, in)``."""
  _check_fp16_range(name, kernel)
  return _quantize_int8(kernel, transpose=True)


def quantize_table(table: jax.Array, *, bits: int, quant_type: str = "fp4",
                   blocksize: int = 64, double_quant: bool = False,
                   name: str = "embedding") -> QuantState:
  """An embedding table ``(num, features)`` → QuantState (rows stay rows)."""
  if bits == 4:
    check_finite(name, table)
    return _quantize_4bit(table, quant_type=quant_type, blocksize=int(blocksize),
                          double_quant=bool(double_quant), transpose=False)
  _check_fp16_range(name, table)
  return _quantize_int8(table, transpose=False)


def _check_fp16_range(name: str, w: jax.Array) -> None:
  """LLM.int8() weights are quantized from float16, as bitsandbytes does."""
  check_finite(name, w)
  _validate.check_float16_range(name, w)


def requantize_like(state: QuantState, w: jax.Array, *, kernel: bool) -> QuantState:
  """Quantize ``w`` with ``state``'s format and settings: a Flax kernel ``(in, out)`` when
  ``kernel`` (stored transposed), else a table of ``state.shape``."""
  if state.quant_type in FOUR_BIT_TYPES:
    check_finite("merged weight", w)
    return _quantize_4bit(w.astype(state.dtype), quant_type=state.quant_type,
                          blocksize=state.blocksize, double_quant=state.nested, transpose=kernel)
  _check_fp16_range("merged weight", w)
  return _quantize_int8(w.astype(state.dtype), transpose=kernel)


@functools.partial(jax.jit, static_argnames=("scaling", "dtype", "kernel"))
def merged_weight(w: Any, a: jax.Array, b: jax.Array, *, scaling: float, dtype: Any,
                  kernel: bool) -> jax.Array:
  """``W + a @ b * scaling`` in ``dtype``, summed in float32. ``w`` is a float array (a Flax
  kernel ``(in, out)`` or a table ``(num, features)``) or a QuantState, dequantized (and
  transposed to ``(in, out)`` when ``kernel``); ``a`` ``(in|num, r)``,
  ``b`` ``(r, out|features)``."""
  if isinstance(w, QuantState):
    w = dequantize_table(w, jnp.float32)
    w = w.T if kernel else w
  delta = (a.astype(jnp.float32) @ b.astype(jnp.float32)) * jnp.float32(scaling)
  return (w.astype(jnp.float32) + delta).astype(dtype)


def dequantize_kernel(state: QuantState, dtype: DTypeLike) -> jax.Array:
  """The float Flax kernel ``(in, out)`` of a linear QuantState (stored ``(out, in)``)."""
  return dequantize_table(state, dtype).T


def dequantize_table(state: QuantState, dtype: DTypeLike) -> jax.Array:
  """The float tensor of ``state.shape`` in ``dtype``."""
  if state.quant_type in FOUR_BIT_TYPES:
    return F.dequantize_4bit(state, dtype)
  return F.int8_vectorwise_dequant(state.data, state.absmax).astype(dtype)


def constrain(y: jax.Array, out_sharding: Any) -> jax.Array:
  if out_sharding is None:
    return y
  return jax.lax.with_sharding_constraint(y, out_sharding)


def _bias_in(bias: jax.Array | None, dtype: Any) -> jax.Array | None:
  return None if bias is None else bias.astype(dtype)


def linear_4bit(x: jax.Array, state: QuantState, bias: jax.Array | None, *, out_dtype: Any,
                compute_dtype: Any | None) -> jax.Array:
  """``x @ W.T + bias`` through :func:`jaxquant.functional.matmul_4bit`, computed in
  ``compute_dtype`` (default ``out_dtype``) and returned in ``out_dtype``."""
  cdt = out_dtype if compute_dtype is None else jnp.dtype(compute_dtype)
  y = F.matmul_4bit(x.astype(cdt), state, _bias_in(bias, cdt))
  return y.astype(out_dtype)


def linear_8bit(x: jax.Array, state: QuantState, bias: jax.Array | None, *, out_dtype: Any,
                compute_dtype: Any | None, threshold: float) -> jax.Array:
  """LLM.int8() ``x @ W.T + bias`` through :func:`jaxquant.functional.int8_linear`."""
  cdt = out_dtype if compute_dtype is None else jnp.dtype(compute_dtype)
  y = F.int8_linear(x.astype(cdt), state, _bias_in(bias, cdt), threshold)
  return y.astype(out_dtype)


def _check_ids(inputs: jax.Array) -> None:
  if not jnp.issubdtype(inputs.dtype, jnp.integer):
    raise ValueError(f"inputs must be integer token ids, got dtype {inputs.dtype}")


def embed_lookup(state: QuantState, inputs: jax.Array, dtype: Any) -> jax.Array:
  """Rows ``inputs`` of a quantized ``(num, features)`` table, dequantized to ``dtype``:
  ``inputs.shape + (features,)``. Only the gathered rows are decoded."""
  _check_ids(inputs)
  num, features = state.shape
  ids = inputs.reshape(-1)
  if state.quant_type in FOUR_BIT_TYPES:
    absmax = F.dequantize_absmax(state)  # (num, features // blocksize) float32
    rows = QuantState(
        data=jnp.take(state.data, ids, axis=0), absmax=jnp.take(absmax, ids, axis=0),
        code=state.code, nested_absmax=None, nested_code=None, offset=None,
        shape=(ids.shape[0], features), dtype=state.dtype, blocksize=state.blocksize,
        quant_type=state.quant_type)
    out = F.dequantize_4bit(rows, dtype)
  else:
    out = F.int8_vectorwise_dequant(jnp.take(state.data, ids, axis=0),
                                    jnp.take(state.absmax, ids, axis=0)).astype(dtype)
  return out.reshape(*inputs.shape, features)


def embed_attend(state: QuantState, query: jax.Array, dtype: Any, *,
                 threshold: float = 0.0) -> jax.Array:
  """``query @ table.T`` (a tied output head): ``(..., features)`` → ``(..., num)`` in
  ``dtype``, through the same quantized matmuls as the linear layers."""
  if state.quant_type in FOUR_BIT_TYPES:
    return F.matmul_4bit(query.astype(dtype), state)
  return F.int8_linear(query.astype(dtype), state, None, threshold)
