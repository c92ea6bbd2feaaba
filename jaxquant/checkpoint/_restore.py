"""Restoring: the checkpoint's description checked against the target, Orbax's restore
arguments (target shardings, numpy for 64-bit arrays), damaged entries located and named, and
every array checked against its CRC-32."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxquant.checkpoint import _integrity, _tree, _validate
from jaxquant.checkpoint._validate import Shardings

__all__ = ["read_meta", "restore_with", "STATE", "META", "Reader"]

STATE = "state"
META = "jaxquant"
Reader = Callable[[Any], Any]


def read_meta(read: Reader, where: str) -> dict[str, Any]:
  """The checkpoint's JSON description, checked for format and version."""
  try:
    meta = read(ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
  except FileNotFoundError:
    raise
  except Exception as err:  # corrupted or missing JSON item
    raise ValueError(f"cannot read the jaxquant metadata of checkpoint {where}: "
                     f"{_short(err)}") from err
  if not isinstance(meta, dict) or meta.get("format") != _tree.FORMAT:
    raise ValueError(f"checkpoint {where} has no jaxquant metadata of format {_tree.FORMAT!r}")
  if meta.get("version", 0) > _tree.FORMAT_VERSION:
    raise ValueError(f"checkpoint {where} has format version {meta['version']}; this jaxquant "
                     f"reads up to {_tree.FORMAT_VERSION}")
  return meta


def _short(err: BaseException, limit: int = 300) -> str:
  text = str(err).strip().splitlines()
  first = (text[0] if text else type(err).__name__).split(" See full TensorStore details")[0]
  return first if len(first) <= limit else first[:limit] + " ..."


def _entries_from_meta(meta: dict[str, Any]) -> list[_tree.Entry]:
  """Entries with abstract values (ShapeDtypeStructs) rebuilt from the description."""
  out = []
  for info in meta["entries"]:
    parts = tuple(info["path"])
    if info["kind"] == "quant_state":
      arrays = {f: jax.ShapeDtypeStruct(tuple(a["shape"]), _tree._dtype(a["dtype"]))
                for f, a in info["arrays"].items()}
      value = _tree.rebuild(info, arrays)
    elif info["kind"] == "scalar":
      value = {"bool": bool, "int": int, "float": float}[info["type"]](0)
    else:
      value = jax.ShapeDtypeStruct(tuple(info["shape"]), _tree._dtype(info["dtype"]))
    out.append(_tree.Entry(parts, value))
  return out


def _restore_items(entries: list[_tree.Entry], infos: list[dict[str, Any]],
                   shardings: Shardings) -> list[tuple[tuple[str, ...], Any, Any]]:
  """(path, abstract value, Orbax restore args) of every entry."""
  resolve = _validate.sharding_resolver(shardings, entries)

  def one(entry, field, a_info):
    shape = tuple(a_info["shape"])
    abstract = jax.ShapeDtypeStruct(shape, _tree._dtype(a_info["dtype"]))
    sharding = resolve(entry, field, abstract) or _validate.default_sharding()
    name = entry.name if field is None else f"{entry.name}/{field}"
    _validate.check_sharding(name, sharding, shape)
    return (jax.ShapeDtypeStruct(shape, abstract.dtype, sharding=sharding),
            ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape))

  items = []
  for entry, info in zip(entries, infos):
    if info["kind"] == "quant_state":
      pairs = {f: one(entry, f, a) for f, a in info["arrays"].items()}
      items.append((entry.parts, {f: p[0] for f, p in pairs.items()},
                    {f: p[1] for f, p in pairs.items()}))
    elif info["kind"] == "scalar":
      items.append((entry.parts, np.zeros(info["shape"], _tree._dtype(info["dtype"])),
                    ocp.RestoreArgs(restore_type=np.ndarray)))
    elif _as_numpy(entry.value, info):
      items.append((entry.parts, np.zeros((0,), _tree._dtype(info["dtype"])),
                    ocp.RestoreArgs(restore_type=np.ndarray)))
    else:
      items.append((entry.parts, *one(entry, None, info)))
  return items


def _as_numpy(target_leaf: Any, info: dict[str, Any]) -> bool:
  """Restore to host numpy: the target holds numpy there, or the array is 64-bit and JAX
  would narrow it (``jax_enable_x64`` off), which would change its bytes."""
  if isinstance(target_leaf, np.ndarray):
    return True
  return (np.dtype(_tree._dtype(info["dtype"])).itemsize == 8
          and not jax.config.read("jax_enable_x64"))


def _read_state(read: Reader, items: list[tuple[tuple[str, ...], Any, Any]],
                partial: bool) -> dict[str, Any]:
  abstract = _tree.nest([(p, a) for p, a, _ in items])
  rargs = _tree.nest([(p, r) for p, _, r in items])
  args = (ocp.args.PyTreeRestore(abstract, restore_args=rargs, partial_restore=True) if partial
          else ocp.args.PyTreeRestore(abstract, restore_args=rargs))
  return read(ocp.args.Composite(**{STATE: args}))[STATE]


def _unreadable(read: Reader, items, where: str, err: Exception) -> ValueError:
  """The error for a failed read, naming the first entry that cannot be read on its own."""
  for item in items:
    try:
      _read_state(read, [item], partial=True)
    except Exception as one_err:  # noqa: BLE001 -- locating the damaged entry
      return ValueError(f"checkpoint {where} is corrupted or incomplete: entry "
                        f"{_tree.path_name(item[0])!r} cannot be read ({_short(one_err)})")
  return ValueError(f"checkpoint {where} is corrupted or incomplete: {_short(err)}")


def restore_with(read: Reader, where: str, target: Any, shardings: Shardings, strict: bool,
                 verify: bool) -> Any:
  """Restore through ``read`` (a single checkpointer or a manager's step); see :func:`restore`."""
  meta = read_meta(read, where)
  if target is None:
    entries, infos, treedef = _entries_from_meta(meta), meta["entries"], None
  else:
    entries, treedef = _tree.flatten(target)
    if not entries:
      raise ValueError("target has no arrays to restore")
    infos = _validate.match(meta, entries, where=where, strict=strict)
  items = _restore_items(entries, infos, shardings)
  try:
    restored = _read_state(read, items, partial=len(entries) < len(meta["entries"]))
  except Exception as err:  # noqa: BLE001 -- tensorstore/orbax raise many types
    raise _unreadable(read, items, where, err) from err
  values = []
  for entry, info in zip(entries, infos):
    raw = _tree.lookup(restored, entry.parts)
    value = _tree.rebuild(info, raw)
    if target is not None:
      if _tree.is_quant_state(entry.value):
        value = entry.value.replace(**{f: _validate.to_numpy_like(getattr(entry.value, f), raw[f])
                                       for f in info["arrays"]})
      else:
        value = _validate.to_numpy_like(entry.value, value)
    if _tree.is_quant_state(value):
      value.check()
    values.append(value)
  if verify:
    _integrity.verify(meta.get("checksums", {}),
                      [_tree.Entry(e.parts, v) for e, v in zip(entries, values)], where)
  if treedef is not None:
    return jax.tree_util.tree_unflatten(treedef, values)
  return _plain_nest([(e.parts, v) for e, v in zip(entries, values)])


def _plain_nest(items: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
  root: dict[str, Any] = {}
  for parts, value in items:
    node = root
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return root
