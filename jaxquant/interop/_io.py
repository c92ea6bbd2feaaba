"""Load and save bitsandbytes / transformers safetensors checkpoints, and quantize on load."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxquant import _validate
from jaxquant.functional import quantize_4bit, quantize_int8
from jaxquant.interop import _bnb, _safetensors
from jaxquant.quant_state import QuantState

__all__ = ["iter_load", "load", "save", "metadata", "to_state_dict", "from_state_dict",
           "quantize_on_load", "default_should_quantize", "TRANSFORMERS_METADATA"]

# What transformers' save_pretrained writes into every safetensors header.
TRANSFORMERS_METADATA = {"format": "pt"}
Placement = jax.Device | jax.sharding.Sharding | None


def _placer(device: Placement) -> Callable[[np.ndarray], jax.Array]:
  if device is None:
    return jnp.asarray
  return lambda a: jax.device_put(a, device)


def _iter_groups(src: _safetensors.TensorSource, read: Callable[[str], np.ndarray],
                 put: Callable[[np.ndarray], Any], int8_dtype: Any, progress: bool,
                 desc: str, transform: Callable[[str, np.ndarray], Any] | None = None
                 ) -> Iterator[tuple[str, Any]]:
  keys = src.keys()
  # Read shard by shard (files in order, tensors in index order within one).
  files = {f: i for i, f in enumerate(dict.fromkeys(src.weight_map[k] for k in keys))}
  keys = sorted(keys, key=lambda k: files[src.weight_map[k]])
  groups = _bnb.group_keys(keys)
  with tqdm.tqdm(total=len(groups), desc=desc, unit="tensor", disable=not progress,
                 leave=False) as bar:
    for g in groups:
      if g.kind == "4bit":
        value = _bnb.state_from_4bit(g, read, put)
      elif g.kind == "int8":
        value = _bnb.state_from_int8(g, read, put, int8_dtype)
      else:
        a = read(g.name)
        value = transform(g.name, a) if transform is not None else put(a)
        del a
      bar.update(1)
      yield g.name, value


def iter_load(path: str | os.PathLike, *, int8_dtype: Any = jnp.float16,
              device: Placement = None, progress: bool = True
              ) -> Iterator[tuple[str, QuantState | jax.Array]]:
  """Yield ``(name, value)`` for every parameter of a safetensors checkpoint, reading one
  parameter's tensors at a time (shard by shard for a sharded checkpoint).

  Arguments as in :func:`load`.
  """
  src = _safetensors.TensorSource(path)
  yield from _iter_groups(src, src.read, _placer(device), int8_dtype, progress,
                          f"Loading {os.path.basename(os.fspath(path).rstrip('/'))}")


def load(path: str | os.PathLike, *, int8_dtype: Any = jnp.float16, device: Placement = None,
         progress: bool = True) -> dict[str, QuantState | jax.Array]:
  """Read a checkpoint written by transformers + bitsandbytes (or by :func:`save`).

  4-bit parameters (nf4/fp4, with or without double quantization, any ``quant_storage``)
  become nf4/fp4 QuantStates with bitsandbytes' exact bytes; LLM.int8() weights
  (``weight`` int8 + ``SCB``) become ``int8_rowwise`` QuantStates; every other tensor stays an
  array of its stored dtype.

  Args:
    path: a ``.safetensors`` file, a ``*.safetensors.index.json`` of a sharded checkpoint, or a
      directory holding either (as ``save_pretrained`` writes).
    int8_dtype: the dequantization dtype recorded in LLM.int8() states (their files do not
      store it; transformers' 8-bit models compute in float16).
    device: a ``jax.Device`` or ``Sharding`` for every array (default: the default device).
    progress: show a tqdm progress bar (one tick per parameter).

  Returns:
    ``{parameter name: QuantState | jax.Array}``, e.g. ``"model.layers.0.mlp.up_proj.weight"``
    (a 4-bit weight of torch layout ``(out_features, in_features)``) and its ``".bias"``.

  Raises:
    FileNotFoundError: no checkpoint at ``path``, a missing shard.
    ValueError: a truncated or corrupted file, a missing or malformed bitsandbytes tensor,
      an unknown quant type: the message names the tensor.
  """
  return dict(iter_load(path, int8_dtype=int8_dtype, device=device, progress=progress))


def metadata(path: str | os.PathLike) -> dict[str, str] | None:
  """The safetensors header metadata of a checkpoint (``None`` when it has none). Pass it to
  :func:`save` to reproduce a file byte for byte."""
  with _safetensors.TensorSource(path) as src:
    return src.metadata()


def from_state_dict(tensors: Mapping[str, np.ndarray], *, int8_dtype: Any = jnp.float16,
                    device: Placement = None) -> dict[str, QuantState | jax.Array]:
  """:func:`load` for tensors already in memory (numpy arrays keyed as bitsandbytes does)."""
  def read(key: str) -> np.ndarray:
    return np.asarray(tensors[key])
  put = _placer(device)
  out = {}
  for g in _bnb.group_keys(list(tensors)):
    if g.kind == "4bit":
      out[g.name] = _bnb.state_from_4bit(g, read, put)
    elif g.kind == "int8":
      out[g.name] = _bnb.state_from_int8(g, read, put, int8_dtype)
    else:
      out[g.name] = put(read(g.name))
  return out


def _entry_tensors(name: str, value: Any, quant_storage: str) -> dict[str, np.ndarray]:
  if isinstance(value, QuantState):
    return _bnb.state_to_tensors(name, value, quant_storage)
  if isinstance(value, Mapping):
    raise TypeError(f"{name!r} is a nested mapping; save takes a flat mapping of parameter name "
                    "-> QuantState or array")
  if not hasattr(value, "shape"):
    raise TypeError(f"{name!r} is a {type(value).__name__}, not an array or QuantState")
  return {name: np.asarray(jax.device_get(value))}


def to_state_dict(tree: Mapping[str, QuantState | Any], *, quant_storage: str = "uint8"
                  ) -> dict[str, np.ndarray]:
  """The bitsandbytes state dict (numpy) of ``{name: QuantState | array}``.

  Raises:
    ValueError: two parameters that produce the same key; states bitsandbytes cannot store.
  """
  out: dict[str, np.ndarray] = {}
  for name, value in tree.items():
    for k, a in _entry_tensors(name, value, quant_storage).items():
      if k in out:
        raise ValueError(f"tensor {k!r} would be written twice (by {name!r} and an earlier "
                         "parameter)")
      out[k] = a
  return out


def _entry_nbytes(value: Any) -> int:
  if isinstance(value, QuantState):
    return value.nbytes
  return _safetensors.nbytes_of(value)


def save(path: str | os.PathLike, tree: Mapping[str, QuantState | Any], *,
         metadata: Mapping[str, str] | None = TRANSFORMERS_METADATA,
         quant_storage: str = "uint8", max_shard_size: int | None = None) -> list[str]:
  """Write ``{name: QuantState | array}`` as a bitsandbytes / transformers safetensors checkpoint.

  4-bit states are written as ``Linear4bit`` saves them (packed weight, absmax, quant_map,
  nested statistics, the quant_state JSON blob with bitsandbytes' key order and separators);
  ``int8_rowwise`` states as ``Linear8bitLt`` does (``weight``, ``SCB``, ``weight_format``).
  A checkpoint read by :func:`load` is reproduced byte for byte when written with its
  :func:`metadata`.

  Args:
    path: the output file; with ``max_shard_size``, a directory for the shards and
      ``model.safetensors.index.json``.
    tree: flat mapping of parameter name to QuantState or array (e.g. from :func:`load`).
    metadata: the header metadata; transformers writes ``{"format": "pt"}`` (the default),
      bitsandbytes' plain ``save_file`` none (pass ``None``).
    quant_storage: storage dtype of packed 4-bit weights: ``"uint8"`` or a float view
      (``"float16"``, ``"bfloat16"``, ``"float32"``) of the same bytes, as bnb's
      ``quant_storage``.
    max_shard_size: bytes per shard (a parameter's tensors stay in one shard); ``None`` writes
      one file.

  Returns:
    The files written.
  """
  path = os.fspath(path)
  if max_shard_size is None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    _safetensors.write_file(path, to_state_dict(tree, quant_storage=quant_storage), metadata)
    return [path]
  if max_shard_size <= 0:
    raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size}")
  os.makedirs(path, exist_ok=True)
  names = list(tree)
  plan = _safetensors.shard_plan([(n, _entry_nbytes(tree[n])) for n in names], max_shard_size)
  if len(plan) == 1:
    out = os.path.join(path, _safetensors.DEFAULT_FILE)
    _safetensors.write_file(out, to_state_dict(tree, quant_storage=quant_storage), metadata)
    return [out]
  weight_map: dict[str, str] = {}
  written, total = [], 0
  for file, group in zip(_safetensors.iter_sharded_names(len(plan)), plan):
    tensors = to_state_dict({n: tree[n] for n in group}, quant_storage=quant_storage)
    dup = set(tensors) & set(weight_map)
    if dup:
      raise ValueError(f"tensor {sorted(dup)[0]!r} would be written twice")
    _safetensors.write_file(os.path.join(path, file), tensors, metadata)
    total += sum(a.nbytes for a in tensors.values())
    weight_map.update({k: file for k in tensors})
    written.append(os.path.join(path, file))
    del tensors
  import json
  index = os.path.join(path, _safetensors.DEFAULT_INDEX)
  with open(index, "w", encoding="utf-8") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2,
              sort_keys=True)
    f.write("\n")
  return written + [index]


# -- quantize on load ------------------------------------------------------------------------

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
def _quantizer(quant_type: str, blocksize: int, compress_statistics: bool,
               backend: str | None) -> Callable[[jax.Array], QuantState]:
  if quant_type == "int8":
    return jax.jit(quantize_int8)
  return jax.jit(functools.partial(quantize_4bit, blocksize=blocksize,
                                   compress_statistics=compress_statistics,
                                   quant_type=quant_type, backend=backend))


def _check_finite_chunked(name: str, a: np.ndarray, chunk: int = 1 << 22) -> None:
  flat = a.reshape(-1)
  for i in range(0, flat.size, chunk):
    part = flat[i:i + chunk].astype(np.float32)
    if not np.isfinite(part).all():
      j = i + int(np.argmax(~np.isfinite(part)))
      raise ValueError(f"tensor {name!r} has a non-finite value at flat index {j}; it cannot be "
                       "quantized")


def quantize_on_load(path: str | os.PathLike, *, quant_type: str = "nf4", blocksize: int = 64,
                     compress_statistics: bool = False,
                     should_quantize: Callable[[str, tuple[int, ...], np.dtype], bool]
                     = default_should_quantize,
                     dtype: Any = None, device: Placement = None, progress: bool = True,
                     backend: str | None = None) -> dict[str, QuantState | jax.Array]:
  """Load a regular (bf16/fp16/fp32) safetensors checkpoint, quantizing tensor by tensor.

  ``load_in_4bit`` (or ``load_in_8bit`` with ``quant_type="int8"``) for JAX: each tensor is read,
  quantized and dropped before the next one is read, so peak host memory is about the
  quantized model plus one full-precision tensor (see ``benchmarks/quantize_on_load.py``).
  Parameters already quantized by bitsandbytes in the checkpoint are loaded as they are.

  Args:
    path: a ``.safetensors`` file, an index JSON, or a directory (as :func:`load`).
    quant_type: ``"nf4"``, ``"fp4"`` or ``"int8"`` (LLM.int8() row-wise).
    blocksize: 4-bit blocksize (32 ... 4096).
    compress_statistics: double quantization of the 4-bit absmax.
    should_quantize: ``(name, shape, dtype) -> bool``; default :func:`default_should_quantize`.
    dtype: cast the tensors that stay unquantized to this dtype (default: as stored). The
      QuantStates record the stored dtype as their dequantization dtype.
    device: ``jax.Device`` or ``Sharding`` for the results (default device otherwise).
    progress: tqdm progress bar.
    backend: quantization backend (see :mod:`jaxquant.functional`).

  Returns:
    ``{name: QuantState | jax.Array}`` as :func:`load` gives.
  """
  _validate.check_choice("quant_type", quant_type, ("nf4", "fp4", "int8"))
  if quant_type != "int8":
    _validate.check_choice("blocksize", blocksize, _validate.BLOCKSIZES_4BIT)
  quantize = _quantizer(quant_type, blocksize, bool(compress_statistics), backend)
  put = _placer(device)
  cast = None if dtype is None else jnp.dtype(dtype)

  def transform(name: str, a: np.ndarray) -> Any:
    if should_quantize(name, tuple(a.shape), a.dtype):
      _validate.check_array(name, a)
      _check_finite_chunked(name, a)
      x = put(a) if device is not None else jnp.asarray(a)
      state = quantize(x)
      del x
      return state
    return put(a if cast is None else a.astype(cast))

  src = _safetensors.TensorSource(path)
  return dict(_iter_groups(src, src.read, put, jnp.float16, progress,
                           f"Quantizing {os.path.basename(os.fspath(path).rstrip('/'))}",
                           transform=transform))
