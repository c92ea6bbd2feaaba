"""Lazy, tensor-by-tensor access to safetensors checkpoints: one file or a sharded set with an
index JSON (``model.safetensors.index.json``, as transformers writes), and writing them back.

Nothing is read until a tensor is asked for; each shard file is opened once. Every error names
the file and the tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import safetensors
import safetensors.numpy
from safetensors import safe_open

INDEX_SUFFIX = ".safetensors.index.json"
DEFAULT_INDEX = "model" + INDEX_SUFFIX
DEFAULT_FILE = "model.safetensors"

# safetensors dtype names <-> numpy dtype names (bfloat16 / float8 through ml_dtypes).
ST_TO_NP = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
NP_TO_ST = {v: k for k, v in ST_TO_NP.items()}


def np_dtype(st_dtype: str) -> np.dtype:
  import ml_dtypes  # noqa: F401  (registers bfloat16 / float8 with numpy)
  import jax.numpy as jnp
  return np.dtype(jnp.dtype(ST_TO_NP[st_dtype]))


class TensorSource:
  """Read-only view of a safetensors checkpoint, one tensor at a time.

  Args:
    path: a ``.safetensors`` file, an index JSON (``*.safetensors.index.json``), or a
      directory holding ``model.safetensors.index.json``, ``model.safetensors``, or exactly
      one index or one ``.safetensors`` file.

  Raises:
    FileNotFoundError: nothing loadable at ``path``, or a shard the index names is missing.
    ValueError: an index that is not valid JSON or lacks ``weight_map``.
  """

  def __init__(self, path: str | os.PathLike):
    path = os.fspath(path)
    self.path = path
    self.index_path: str | None = None
    if os.path.isdir(path):
      path = self._pick_in_dir(path)
    if not os.path.exists(path):
      raise FileNotFoundError(f"no safetensors checkpoint at {path}")
    if path.endswith(".json"):
      self.index_path = path
      self.weight_map = self._read_index(path)
    else:
      self.weight_map = {k: path for k in self._open(path).keys()}
    self._handles: dict[str, Any] = {}
    self._headers: dict[str, tuple[int, dict[str, Any]]] = {}

  @staticmethod
  def _pick_in_dir(d: str) -> str:
    for name in (DEFAULT_INDEX, DEFAULT_FILE):
      if os.path.exists(os.path.join(d, name)):
        return os.path.join(d, name)
    names = sorted(os.listdir(d))
    for suffix in (INDEX_SUFFIX, ".safetensors"):
      found = [n for n in names if n.endswith(suffix)]
      if len(found) == 1:
        return os.path.join(d, found[0])
      if len(found) > 1:
        raise FileNotFoundError(f"{d} holds several *{suffix} files ({found}); pass one of them")
    raise FileNotFoundError(f"{d} holds no {DEFAULT_INDEX}, {DEFAULT_FILE} or other "
                            "*.safetensors file")

  @staticmethod
  def _read_index(path: str) -> dict[str, str]:
    try:
      with open(path, encoding="utf-8") as f:
        index = json.load(f)
      weight_map = index["weight_map"]
      assert isinstance(weight_map, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
      raise ValueError(f"{path} is not a safetensors index (JSON with a 'weight_map' of tensor "
                       f"name -> shard file): {err!r}") from None
    base = os.path.dirname(path)
    out = {}
    for name, file in weight_map.items():
      full = os.path.join(base, file)
      if not os.path.exists(full):
        raise FileNotFoundError(f"shard {file} of {path} (holding tensor {name!r}) is missing")
      out[name] = full
    return out

  @staticmethod
  def _open(file: str):
    """safetensors' validation of the header (offsets, sizes, dtypes); tensors are read by
    :meth:`read` into aligned buffers, not through this handle's memory map."""
    try:
      return safe_open(file, framework="np")
    except (safetensors.SafetensorError, OSError, ValueError) as err:
      raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupted?): "
                       f"{err}") from None

  def _header(self, file: str) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data section, parsed header) of a validated file."""
    got = self._headers.get(file)
    if got is None:
      self._handle(file)  # validates first
      with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        got = (8 + n, json.loads(f.read(n)))
      self._headers[file] = got
    return got

  def _handle(self, file: str):
    h = self._handles.get(file)
    if h is None:
      h = self._open(file)
      self._handles[file] = h
      if self.index_path is not None:
        have = set(h.keys())
        for name, f in self.weight_map.items():
          if f == file and name not in have:
            raise ValueError(f"tensor {name!r}: the index {self.index_path} puts it in "
                             f"{os.path.basename(file)}, which does not hold it")
    return h

  def keys(self) -> list[str]:
    return list(self.weight_map)

  def __contains__(self, name: str) -> bool:
    return name in self.weight_map

  def file_of(self, name: str) -> str:
    try:
      return self.weight_map[name]
    except KeyError:
      raise KeyError(f"tensor {name!r} is not in {self.path}") from None

  def info(self, name: str) -> tuple[str, tuple[int, ...]]:
    """(safetensors dtype string, shape) of a tensor, without reading it."""
    s = self._handle(self.file_of(name)).get_slice(name)
    return s.get_dtype(), tuple(int(d) for d in s.get_shape())

  def read(self, name: str) -> np.ndarray:
    """The tensor as a numpy array (bfloat16 via ml_dtypes) in a fresh 64-byte-aligned buffer
    (so ``jax.device_put`` on the CPU backend can use it without a copy)."""
    return self._read(name, None)

  def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` (first axis) of a tensor, reading only their bytes."""
    return self._read(name, (start, stop))

  def _read(self, name: str, rows: tuple[int, int] | None) -> np.ndarray:
    file = self.file_of(name)
    data_start, header = self._header(file)
    entry = header[name]
    dtype = np_dtype(entry["dtype"])
    shape = [int(d) for d in entry["shape"]]
    begin, end = entry["data_offsets"]
    if rows is not None:
      if not shape or not 0 <= rows[0] <= rows[1] <= shape[0]:
        raise ValueError(f"tensor {name!r}: rows {rows[0]}:{rows[1]} out of range for shape "
                         f"{tuple(shape)}")
      row_bytes = math.prod(shape[1:]) * dtype.itemsize
      begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
      shape[0] = rows[1] - rows[0]
    buf = aligned_empty(end - begin)
    with open(file, "rb") as f:
      f.seek(data_start + begin)
      got = f.readinto(memoryview(buf))
    if got != end - begin:
      raise ValueError(f"tensor {name!r} of {file} is truncated: {got} of {end - begin} bytes")
    return buf.view(dtype).reshape(shape)

  def metadata(self) -> dict[str, str] | None:
    """The ``__metadata__`` header of the (first) file, e.g. ``{"format": "pt"}``."""
    files = sorted(set(self.weight_map.values()))
    return self._handle(files[0]).metadata() if files else None

  def close(self) -> None:
    self._handles.clear()

  def __enter__(self) -> "TensorSource":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def aligned_empty(nbytes: int, alignment: int = 64) -> np.ndarray:
  """An uninitialized ``uint8`` buffer of ``nbytes`` whose address is a multiple of
  ``alignment``."""
  raw = np.empty(nbytes + alignment, np.uint8)
  skip = (-raw.ctypes.data) % alignment
  return raw[skip:skip + nbytes]


def _st_dtype(name: str, a: np.ndarray) -> str:
  try:
    return NP_TO_ST[np.dtype(a.dtype).name]
  except KeyError:
    raise TypeError(f"tensor {name!r} has dtype {a.dtype}, which safetensors cannot "
                    "store") from None


def nbytes_of(a: Any) -> int:
  return int(math.prod(a.shape)) * np.dtype(a.dtype).itemsize


def write_file(path: str, tensors: Mapping[str, np.ndarray],
               metadata: Mapping[str, str] | None) -> None:
  """One safetensors file (tensor order and alignment are the safetensors library's)."""
  arrays = {}
  for name, a in tensors.items():
    _st_dtype(name, a)
    a = np.asarray(a)
    arrays[name] = a if a.flags.c_contiguous else a.copy(order="C")  # keeps 0-d shapes
  safetensors.numpy.save_file(arrays, path, metadata=dict(metadata) if metadata else None)


def shard_plan(sizes: Iterable[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
  """Greedy split of (group, bytes) pairs, in order, into shards of at most ``max_shard_size``
  bytes (a group larger than that gets a shard of its own)."""
  shards: list[list[str]] = [[]]
  used = 0
  for group, size in sizes:
    if shards[-1] and used + size > max_shard_size:
      shards.append([])
      used = 0
    shards[-1].append(group)
    used += size
  return shards


def iter_sharded_names(n_shards: int, prefix: str = "model") -> Iterator[str]:
  for i in range(n_shards):
    yield f"{prefix}-{i + 1:05d}-of-{n_shards:05d}.safetensors"
