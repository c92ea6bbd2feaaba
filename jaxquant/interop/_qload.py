"""Quantize on load: a regular (bf16/fp16/fp32) safetensors checkpoint quantized tensor by
tensor while it is read (transformers' ``load_in_4bit`` / ``load_in_8bit`` for JAX).

Each weight is read (``pread``: nothing stays mapped), quantized and dropped before the next
one is read; a large 2-D weight is read and quantized in slices of whole rows of at most
:data:`CHUNK_ELEMENTS` elements (the bytes equal quantizing it whole: blocks never cross rows,
and the double quantization runs once on the whole absmax). Each quantization finishes before
the next read, and freed host memory goes back to the operating system (glibc
``malloc_trim``; elsewhere a no-op). So the process peaks near the quantized model plus one
slice and its float32 temporaries, whatever the largest tensor
(``benchmarks/quantize_on_load.py`` measures it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import _validate, codebooks
from jaxquant.functional import quantize_4bit, quantize_blockwise, quantize_int8
from jaxquant.functional._fourbit import NESTED_BLOCKSIZE
from jaxquant.interop import _safetensors
from jaxquant.interop._io import Placement, iter_groups, placer
from jaxquant.quant_state import QuantState

__all__ = ["quantize_on_load", "default_should_quantize", "release_host_memory",
           "CHUNK_ELEMENTS"]

#: A weight with more elements is read and quantized in slices of whole rows of at most this
#: many elements (8 MB of bfloat16), so the quantizer's float32 temporaries stay bounded.
CHUNK_ELEMENTS = 1 << 22

_SKIP_PARTS = ("embed", "lm_head", "norm", "wte", "wpe")


def default_should_quantize(name: str, shape: tuple[int, ...], dtype: np.dtype) -> bool:
  """transformers' ``load_in_4bit`` choice, from names alone: 2-D floating ``*.weight`` tensors
  (linear layers), except embeddings, norms and the output head (``lm_head``)."""
  if len(shape) != 2 or not name.endswith("weight"):
    return False
  if np.dtype(dtype).kind != "f" and np.dtype(dtype).name != "bfloat16":
    return False
  lowered = name.lower()
  return not any(p in lowered for p in _SKIP_PARTS)


@functools.cache
def _quantizer(quant_type: str, blocksize: int,
               backend: str | None) -> Callable[[jax.Array], QuantState]:
  """The compiled quantizer of one tensor or slice (4-bit without double quantization)."""
  if quant_type == "int8":
    return jax.jit(quantize_int8)
  return jax.jit(functools.partial(quantize_4bit, blocksize=blocksize, compress_statistics=False,
                                   quant_type=quant_type, backend=backend))


def _double_quantize(state: QuantState, backend: str | None) -> QuantState:
  """Double quantization of a whole float32 absmax, op by op as :func:`quantize_4bit` does it
  (mean subtracted, the rest quantized with the signed dynamic map in blocks of 256), so the
  bytes equal ``quantize_4bit(x, blocksize, True, quant_type)``."""
  offset = jnp.mean(state.absmax)
  nested = quantize_blockwise(state.absmax - offset, jnp.asarray(codebooks.dynamic_map(True)),
                              NESTED_BLOCKSIZE, backend=backend)
  return state.replace(absmax=nested.data, nested_absmax=nested.absmax.reshape(-1),
                       nested_code=nested.code, offset=offset,
                       nested_blocksize=NESTED_BLOCKSIZE)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
  name = ctypes.util.find_library("c")
  try:
    return ctypes.CDLL(name).malloc_trim if name else None
  except (OSError, AttributeError):  # not glibc
    return None


def release_host_memory() -> None:
  """Give freed heap memory back to the operating system (glibc's ``malloc_trim``).

  Freed blocks of a few MB stay in glibc's heap otherwise (its mmap threshold grows after the
  first large free), so a loop over tensors of tens of MB keeps the resident set at its
  high-water mark. No-op where the C library has no ``malloc_trim``.
  """
  trim = _malloc_trim()
  if trim is not None:
    trim(0)


def _check_values(name: str, a: np.ndarray, quant_type: str, first: int = 0,
                  chunk: int = 1 << 22) -> None:
  """Refuse non-finite values (and, for LLM.int8(), values beyond float16's range), naming
  the flat index (``first``: flat index of ``a[0]`` in the whole tensor)."""
  flat = a.reshape(-1)
  limit = 65504.0 if quant_type == "int8" else np.inf
  for i in range(0, flat.size, chunk):
    part = np.abs(flat[i:i + chunk].astype(np.float32))
    bad = ~np.isfinite(part) | (part > limit)
    if bad.any():
      j = int(np.argmax(bad))
      what = "a non-finite value" if not np.isfinite(part[j]) else (
          "a value beyond float16's range (65504), which LLM.int8() weights are quantized from")
      j += first + i
      raise ValueError(f"tensor {name!r} has {what} at flat index {j}; it cannot be quantized")


def _rows_per_chunk(rows: int, cols: int, limit: int) -> int:
  """Rows per slice: a divisor of ``rows`` near ``limit // cols`` (one compiled shape), else
  ``limit // cols`` (and a shorter last slice)."""
  cap = max(1, limit // cols)
  if cap >= rows:
    return rows
  for d in range(cap, max(1, cap // 4) - 1, -1):
    if rows % d == 0:
      return d
  return cap


def _quantize_by_rows(name: str, src: _safetensors.TensorSource, shape: tuple[int, int],
                      quant_type: str, blocksize: int, nested: bool, backend: str | None
                      ) -> QuantState:
  """Quantize a 2-D weight slice by slice of whole rows: the same bytes as quantizing it at
  once (blocks never cross rows), with one slice in memory at a time."""
  rows, cols = shape
  step = _rows_per_chunk(rows, cols, CHUNK_ELEMENTS)
  quantize = _quantizer(quant_type, blocksize, backend)
  parts = []
  for r in range(0, rows, step):
    a = src.read_rows(name, r, min(rows, r + step))
    _check_values(name, a, quant_type, first=r * cols)
    parts.append(jax.block_until_ready(quantize(jax.device_put(a))))
    del a
    release_host_memory()
  state = parts[0].replace(shape=(rows, cols),
                           data=jnp.concatenate([p.data for p in parts]),
                           absmax=jnp.concatenate([p.absmax for p in parts]))
  return _double_quantize(state, backend) if nested else state


def quantize_on_load(path: str | os.PathLike, *, quant_type: str = "nf4", blocksize: int = 64,
                     compress_statistics: bool = False,
                     should_quantize: Callable[[str, tuple[int, ...], np.dtype], bool]
                     = default_should_quantize,
                     dtype: Any = None, device: Placement = None, progress: bool = True,
                     backend: str | None = None) -> dict[str, QuantState | jax.Array]:
  """Load a regular (bf16/fp16/fp32) safetensors checkpoint, quantizing tensor by tensor.

  ``load_in_4bit`` (or ``load_in_8bit`` with ``quant_type="int8"``) for JAX. Parameters already
  quantized by bitsandbytes in the checkpoint are loaded as they are. To quantize into an
  existing model with its own per-layer settings instead, pass ``bnb.iter_load(path)`` to
  :func:`jaxquant.interop.load_into`.

  Args:
    path: a ``.safetensors`` file, an index JSON, or a directory (as :func:`load`).
    quant_type: ``"nf4"``, ``"fp4"`` or ``"int8"`` (LLM.int8() row-wise).
    blocksize: 4-bit blocksize (32 ... 4096).
    compress_statistics: double quantization of the 4-bit absmax.
    should_quantize: ``(name, shape, dtype) -> bool``; default :func:`default_should_quantize`.
    dtype: float32, float16 or bfloat16: cast the floating tensors that stay unquantized to
      it (default: as stored); integer and bool tensors (``position_ids``) keep theirs. The
      QuantStates record the stored dtype as their dequantization dtype.
    device: ``jax.Device`` or ``Sharding`` for the results (default device otherwise).
    progress: tqdm progress bar.
    backend: quantization backend (see :mod:`jaxquant.functional`).

  Returns:
    ``{name: QuantState | jax.Array}`` as :func:`load` gives.

  Raises:
    ValueError: a bad argument; a tensor with a non-finite value (named, with its index); the
      file errors of :func:`load`.
  """
  _validate.check_choice("quant_type", quant_type, ("nf4", "fp4", "int8"))
  if quant_type != "int8":
    _validate.check_choice("blocksize", blocksize, _validate.BLOCKSIZES_4BIT)
  quantize = _quantizer(quant_type, blocksize, backend)
  nested = bool(compress_statistics) and quant_type != "int8"
  put = placer(device)
  cast = None if dtype is None else _validate.check_dtype_arg("dtype", dtype)

  src = _safetensors.TensorSource(path)

  def transform(name: str) -> Any:
    st_dtype, shape = src.info(name)
    dt = _safetensors.np_dtype(st_dtype)
    if not should_quantize(name, shape, dt):
      a = src.read(name)
      floating = jnp.issubdtype(a.dtype, jnp.floating)  # bfloat16 included
      return put(a.astype(cast) if cast is not None and floating else a)
    _validate.check_array(name, jax.ShapeDtypeStruct(shape, dt))
    by_rows = (len(shape) == 2 and math.prod(shape) > CHUNK_ELEMENTS
               and (quant_type == "int8" or shape[1] % blocksize == 0))
    if by_rows:
      state = _quantize_by_rows(name, src, shape, quant_type, blocksize, nested, backend)
    else:
      a = src.read(name)
      _check_values(name, a, quant_type)
      state = jax.block_until_ready(quantize(jax.device_put(a)))
      del a
      state = _double_quantize(state, backend) if nested else state
    release_host_memory()
    return state if device is None else jax.tree.map(put, state)

  return dict(iter_groups(src, src.read, put, jnp.float16, progress,
                          f"Quantizing {os.path.basename(os.fspath(path).rstrip('/'))}",
                          transform=transform))
