"""Load and save bitsandbytes / transformers safetensors checkpoints, and quantize on load."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxquant.interop import _bnb, _safetensors
from jaxquant.quant_state import QuantState

__all__ = ["iter_load", "load", "save", "metadata", "to_state_dict", "from_state_dict",
           "TRANSFORMERS_METADATA", "Placement", "placer", "iter_groups"]

# What transformers' save_pretrained writes into every safetensors header.
TRANSFORMERS_METADATA = {"format": "pt"}
Placement = jax.Device | jax.sharding.Sharding | None


def placer(device: Placement, *, copy: bool = False) -> Callable[[np.ndarray], Any]:
  """``numpy -> jax.Array`` on ``device`` (default: the default device).

  Without ``copy`` (buffers this module read itself), a 64-byte-aligned buffer on the CPU
  backend becomes the array without a copy; ``copy`` for the caller's arrays, which may be
  mutated later. 64-bit tensors stay numpy while ``jax_enable_x64`` is off (JAX would narrow
  them).
  """
  def put(a: np.ndarray) -> Any:
    if (np.dtype(a.dtype).kind in "iuf" and np.dtype(a.dtype).itemsize == 8
        and not jax.config.read("jax_enable_x64")):
      return np.array(a) if copy else a
    return jax.device_put(np.array(a) if copy else a, device)
  return put


def iter_groups(src: _safetensors.TensorSource, read: Callable[[str], np.ndarray],
                put: Callable[[np.ndarray], Any], int8_dtype: Any, progress: bool,
                desc: str, transform: Callable[[str], Any] | None = None
                ) -> Iterator[tuple[str, Any]]:
  """``(parameter name, value)`` of every parameter of ``src``, shard by shard.

  bitsandbytes-quantized parameters become QuantStates; every other tensor is ``put(read(name))``
  or, with ``transform``, ``transform(name)`` (which reads it as it likes).
  """
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
      elif transform is not None:
        value = transform(g.name)
      else:
        value = put(read(g.name))
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
  yield from iter_groups(src, src.read, placer(device), int8_dtype, progress,
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
  put = placer(device, copy=True)
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
    quant_storage: storage dtype of packed 4-bit weights (a name or a dtype): ``"uint8"``
      or a view (``"int8"``, ``"float16"``, ``"bfloat16"``, ``"float32"``) of the same bytes,
      as bnb's ``quant_storage``.
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
