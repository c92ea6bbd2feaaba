"""Argument checks shared by the public ops. Every message names the argument, the value
given and what is accepted."""

from __future__ import annotations

import numbers
from typing import Any, Collection

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BLOCKSIZES_8BIT = (64, 128, 256, 512, 1024, 2048, 4096)


def _names(dtypes: Collection[Any]) -> str:
  return ", ".join(jnp.dtype(d).name for d in dtypes)


def check_array(name: str, x: Any, *, dtypes: Collection[Any] = FLOAT_DTYPES,
                min_ndim: int = 1, ndim: int | None = None, allow_empty: bool = False) -> None:
  """Require an array-like ``x`` of one of ``dtypes`` and of the given rank (and, unless
  ``allow_empty``, with no zero-length dimension)."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in dtypes]:
    raise TypeError(f"{name} must have dtype in ({_names(dtypes)}), got {jnp.dtype(x.dtype).name}")
  if ndim is not None and x.ndim != ndim:
    raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(x.shape)}")
  if x.ndim < min_ndim:
    raise ValueError(f"{name} must have rank >= {min_ndim}, got shape {tuple(x.shape)}")
  if 0 in x.shape and not allow_empty:
    raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def check_choice(name: str, value: Any, accepted: Collection[Any]) -> None:
  if value not in accepted:
    raise ValueError(f"{name} must be one of {tuple(accepted)}, got {value!r}")


def check_blocksize(blocksize: Any, accepted: Collection[int], name: str = "blocksize") -> int:
  """Require an integer (Python or NumPy, not a bool or a float such as ``64.0``) in
  ``accepted``; returns it as a Python int."""
  if (isinstance(blocksize, (bool, np.bool_)) or not isinstance(blocksize, numbers.Integral)
      or blocksize not in accepted):
    raise ValueError(f"{name} must be one of {tuple(accepted)}, got {blocksize!r}")
  return int(blocksize)


def check_dtype_arg(name: str, dtype: Any) -> jnp.dtype:
  """Validate an output-dtype argument; returns it as a ``jnp.dtype``."""
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    raise TypeError(f"{name} must be a float dtype ({_names(FLOAT_DTYPES)}), got {dtype!r}") from None
  if dt not in FLOAT_DTYPES:
    raise TypeError(f"{name} must be a float dtype ({_names(FLOAT_DTYPES)}), got {dt.name}")
  return dt


def is_concrete(x: Any) -> bool:
  """True for a value known outside of tracing (numpy or a committed jax.Array)."""
  return not isinstance(x, jax.core.Tracer)


def check_finite(name: str, x: Any) -> None:
  """Outside jit, reject NaN/Inf with a clear error. Under jit this cannot be checked (values
  are abstract); the documented result is then that a block containing NaN gets a NaN absmax
  and code 0 for the NaN elements, as bitsandbytes' CUDA kernels produce."""
  if not is_concrete(x):
    return
  if isinstance(x, jax.Array) and all_finite(x):
    return  # checked where the array lives: only a bool comes to the host
  arr = np.asarray(jax.device_get(x)).astype(np.float32)
  bad = ~np.isfinite(arr)
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"{name} contains {int(bad.sum())} non-finite value(s) (first at index {first}: "
        f"{arr[first]}); quantization needs finite values"
    )


def all_finite(x: Any) -> bool:
  """Whether a concrete array (a constant under an outer ``jit`` counts) holds only finite
  values: one reduction where the array lives, only the verdict comes to the host."""
  with jax.ensure_compile_time_eval():
    return bool(_all_finite(x))


def check_float16_range(name: str, w: Any) -> None:
  """Outside ``jit``: LLM.int8() weights are quantized from float16, as bitsandbytes does;
  refuse ``|w| > 65504``."""
  if not is_concrete(w):
    return
  with jax.ensure_compile_time_eval():
    big = float(_abs_max(w))
  if big > 65504.0:
    raise ValueError(f"{name} has |values| up to {big}, beyond float16's range (65504) that "
                     "LLM.int8() weights are quantized from")


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x))


@jax.jit
def _abs_max(w: jax.Array) -> jax.Array:
  return jnp.max(jnp.abs(w.astype(jnp.float32)))
