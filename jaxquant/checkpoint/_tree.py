"""A pytree with QuantStates <-> what Orbax stores: a nested dict of arrays plus JSON metadata.

Orbax saves pytree *leaves*; the static fields of a QuantState (quant type, blocksize, logical
shape and dtype) are not leaves, and Orbax restores into whatever dtype a template asks for
(a ``uint8`` code array restored into a ``bfloat16`` template is silently cast). So a
checkpoint here is

- ``state``: a nested dict of arrays. Each pytree entry becomes one path of string keys
  (dict keys, sequence indices and attribute names, in ``jax.tree_util`` key-path order); a
  QuantState becomes a dict of its array fields. Keys are escaped so that no key contains a
  ``.`` (Orbax joins keys with dots into parameter names, so ``{"a.b": x}`` and
  ``{"a": {"b": y}}`` would otherwise overwrite each other).
- ``jaxquant``: JSON describing every entry: kind (array, python scalar, QuantState, PRNG key
  array), shape, dtype, and for a QuantState its static metadata and the shape and dtype of
  each array. A typed PRNG key array (``jax.random.key``, e.g. the RNG streams in
  ``nnx.state`` of a model with dropout) is stored as its ``jax.random.key_data`` with its
  implementation and rewrapped on restore.

Restoring validates the checkpoint's description against the target before any array is read
and refuses every mismatch with an error naming the entry.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from jaxquant.quant_state import ARRAY_FIELDS as QS_FIELDS, QuantState

FORMAT = "jaxquant.checkpoint"
FORMAT_VERSION = 1
QS_STATIC = ("shape", "dtype", "blocksize", "quant_type", "nested_blocksize")
SCALAR_TYPES = (bool, int, float)


def is_quant_state(x: Any) -> bool:
  return isinstance(x, QuantState)


def _key_str(k: Any) -> str:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return k.name
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def escape(part: str) -> str:
  """A key Orbax can store unambiguously (no '.', no '/')."""
  return part.replace("%", "%25").replace(".", "%2E").replace("/", "%2F")


def path_name(parts: tuple[str, ...]) -> str:
  """Human-readable name of an entry, used in every error message."""
  return "/".join(parts) if parts else "<root>"


@dataclasses.dataclass(frozen=True)
class Entry:
  """One entry of a flattened tree: an array, a Python scalar or a QuantState."""

  parts: tuple[str, ...]
  value: Any

  @property
  def name(self) -> str:
    return path_name(self.parts)


def flatten(tree: Any) -> tuple[list[Entry], Any]:
  """Entries of ``tree`` (QuantStates kept whole) and its treedef.

  Raises:
    ValueError: two entries map to the same key path (e.g. a dict key ``"0"`` beside index 0).
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quant_state)
  entries = [Entry(tuple(_key_str(k) for k in path), leaf) for path, leaf in leaves]
  seen: set[tuple[str, ...]] = set()
  for e in entries:
    if e.parts in seen:
      raise ValueError(f"two entries of the tree have the same key path {e.name!r}; rename one")
    seen.add(e.parts)
  return entries, treedef


def _array_info(x: Any) -> dict[str, Any]:
  return {"shape": [int(d) for d in x.shape], "dtype": np.dtype(x.dtype).name}


def _is_arraylike(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def is_key_array(x: Any) -> bool:
  """A typed PRNG key array (or its ShapeDtypeStruct): dtype ``key<...>``."""
  return _is_arraylike(x) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def key_data(x: Any) -> Any:
  """The raw ``uint32`` data of a key array; other values unchanged."""
  return jax.random.key_data(x) if is_key_array(x) else x


def _key_info(x: Any) -> dict[str, Any]:
  data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
  info = {"kind": "key", "key_dtype": str(x.dtype), **_array_info(data)}
  if isinstance(x, jax.Array):
    info["impl"] = str(jax.random.key_impl(x))
  return info


def describe(entry: Entry) -> dict[str, Any]:
  """The JSON description of one entry (what restore validates against)."""
  v = entry.value
  if is_quant_state(v):
    info: dict[str, Any] = {
        "kind": "quant_state",
        "quant_type": v.quant_type,
        "shape": list(v.shape),
        "dtype": v.dtype.name,
        "blocksize": int(v.blocksize),
        "nested_blocksize": None if v.nested_blocksize is None else int(v.nested_blocksize),
        "arrays": {},
    }
    for f in QS_FIELDS:
      a = getattr(v, f)
      if a is None:
        continue
      if not _is_arraylike(a):
        raise TypeError(f"entry {entry.name!r}: QuantState.{f} must be an array, got "
                        f"{type(a).__name__}")
      info["arrays"][f] = _array_info(a)
    return info
  if isinstance(v, SCALAR_TYPES) or isinstance(v, np.generic):
    py = type(v.item()) if isinstance(v, np.generic) else type(v)
    return {"kind": "scalar", "type": py.__name__, **_array_info(np.asarray(v))}
  if is_key_array(v):
    return _key_info(v)
  if _is_arraylike(v):
    return {"kind": "array", **_array_info(v)}
  raise TypeError(f"entry {entry.name!r} is a {type(v).__name__}; a checkpoint holds arrays, "
                  "Python scalars and QuantStates (put other values in the step's metadata)")


def describe_tree(entries: list[Entry]) -> dict[str, Any]:
  return {
      "format": FORMAT,
      "version": FORMAT_VERSION,
      "entries": [{"path": list(e.parts), **describe(e)} for e in entries],
  }


def nest(items: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
  """A nested dict with escaped keys from (path, value) pairs."""
  root: dict[str, Any] = {}
  for parts, value in items:
    if not parts:
      raise ValueError("a checkpoint tree must be a container (dict, list, dataclass, ...), "
                       "not a single leaf")
    node = root
    for p in parts[:-1]:
      node = node.setdefault(escape(p), {})
    node[escape(parts[-1])] = value
  return root


def lookup(nested: dict[str, Any], parts: tuple[str, ...]) -> Any:
  node = nested
  for p in parts:
    node = node[escape(p)]
  return node


def storable(entry: Entry, convert: Callable[[Any], Any]) -> Any:
  """What Orbax saves for an entry: the array, or a dict of a QuantState's arrays."""
  v = entry.value
  if is_quant_state(v):
    return {f: convert(getattr(v, f)) for f in QS_FIELDS if getattr(v, f) is not None}
  if isinstance(v, SCALAR_TYPES) or isinstance(v, np.generic):
    return np.asarray(v)
  return convert(key_data(v))


def rebuild(info: dict[str, Any], arrays: Any) -> Any:
  """A value of the kind described by ``info`` from restored ``arrays``."""
  if info["kind"] == "quant_state":
    fields = {f: arrays.get(f) for f in QS_FIELDS}
    return QuantState(**fields, shape=tuple(info["shape"]), dtype=np.dtype(_dtype(info["dtype"])),
                      blocksize=info["blocksize"], quant_type=info["quant_type"],
                      nested_blocksize=info["nested_blocksize"])
  if info["kind"] == "scalar":
    py = {"bool": bool, "int": int, "float": float}[info["type"]]
    return py(np.asarray(arrays).item())
  if info["kind"] == "key":
    return jax.random.wrap_key_data(arrays, impl=info["impl"])
  return arrays


def _dtype(name: str) -> np.dtype:
  import jax.numpy as jnp  # bfloat16 and friends resolve through jnp
  return jnp.dtype(name)
