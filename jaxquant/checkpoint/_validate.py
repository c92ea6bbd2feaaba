"""Checks of a checkpoint's description against a restore target, and target shardings.

Every error names the entry (its key path, ``/``-joined) and what the checkpoint and the
target each hold, before any array is read.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.checkpoint._tree import Entry, _dtype, describe, is_quant_state, path_name

Shardings = Union[jax.sharding.Sharding, Callable[[str, jax.ShapeDtypeStruct], Any], Any, None]

_MAX_LISTED = 8


def _fmt_array(info: dict[str, Any]) -> str:
  return f"{info['dtype']}{list(info['shape'])}"


def fmt(info: dict[str, Any]) -> str:
  """Short human description of an entry's JSON description."""
  if info["kind"] == "quant_state":
    nested = (f", nested_blocksize={info['nested_blocksize']}"
              if info.get("nested_blocksize") is not None else "")
    return (f"QuantState({info['quant_type']}, shape={tuple(info['shape'])}, "
            f"dtype={info['dtype']}, blocksize={info['blocksize']}{nested})")
  if info["kind"] == "scalar":
    return f"a Python {info['type']}"
  if info["kind"] == "key":
    return f"a PRNG key array of dtype {info['key_dtype']} (data {_fmt_array(info)})"
  return f"an array {_fmt_array(info)}"


def _listing(names: list[str]) -> str:
  shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
  more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
  return shown + more


def match(saved: dict[str, Any], entries: list[Entry], *, where: str,
          strict: bool) -> list[dict[str, Any]]:
  """The saved description of each target entry, after checking that they agree.

  Args:
    saved: the checkpoint's JSON description (``describe_tree``).
    entries: the target's entries.
    where: the checkpoint's location, for messages.
    strict: refuse entries of the checkpoint that the target lacks.

  Raises:
    ValueError: missing or extra entries, another kind, another QuantState metadata, another
      shape or dtype.
  """
  by_path = {tuple(e["path"]): e for e in saved["entries"]}
  found = {e.parts: _saved_info(by_path, e) for e in entries}
  missing = [e.name for e in entries if found[e.parts] is None]
  if missing:
    raise ValueError(f"checkpoint {where} has no entry {_listing(missing)} that the target "
                     "needs; it was saved from another tree (a different model or optimizer "
                     "layout, or a subset such as the LoRA adapters only)")
  if strict:
    used = set()
    for e in entries:
      used.update(found[e.parts][1])
    extra = [path_name(p) for p in by_path if p not in used]
    if extra:
      raise ValueError(f"checkpoint {where} holds entries the target lacks: {_listing(extra)}; "
                       "pass strict=False to restore only the target's entries")
  out = []
  for e in entries:
    info = found[e.parts][0]
    _compare(e.name, info, describe(e), where)
    out.append(info)
  return out


def _saved_info(by_path: dict[tuple[str, ...], dict[str, Any]], entry: Entry
                ) -> tuple[dict[str, Any], list[tuple[str, ...]]] | None:
  """``(description to restore entry from, saved paths it uses)``, or None if not saved.

  A QuantState and the mapping of its arrays are stored alike (``<path>/<field>``), so either
  form restores into the other: ``flax.nnx.Optimizer`` holds an optimizer's 8-bit moments as
  QuantStates when created and as mappings ``{data, absmax, code}`` after its first update, and a
  training run must resume from either.
  """
  if entry.parts in by_path:
    return by_path[entry.parts], [entry.parts]
  if is_quant_state(entry.value):  # saved as plain arrays at <path>/<field>
    want = describe(entry)
    paths = [entry.parts + (f,) for f in want["arrays"]]
    saved = [by_path.get(p) for p in paths]
    if any(i is None or i["kind"] != "array" for i in saved):
      return None
    for f, i in zip(want["arrays"], saved):
      if (i["shape"], i["dtype"]) != (want["arrays"][f]["shape"], want["arrays"][f]["dtype"]):
        return {**want, "arrays": {**want["arrays"], f: _array_fields(i)}}, paths
    return {"path": list(entry.parts), **want}, paths
  parent = by_path.get(entry.parts[:-1])  # an array of a saved QuantState
  if parent is not None and parent["kind"] == "quant_state":
    field = entry.parts[-1]
    if field in parent["arrays"]:
      return ({"path": list(entry.parts), "kind": "array", **parent["arrays"][field]},
              [entry.parts[:-1]])
  return None


def _array_fields(info: dict[str, Any]) -> dict[str, Any]:
  return {"shape": info["shape"], "dtype": info["dtype"]}


_SCALAR_KINDS = {"bool": jnp.bool_, "int": jnp.integer, "float": jnp.floating}


def _scalar_and_0d_array(got: dict[str, Any], want: dict[str, Any]) -> bool:
  """A Python scalar and a 0-d array of the same kind (bool, integer, floating), either way
  round: e.g. ``TrainState.create`` holds ``step=0`` where the trained state holds an int32
  array. They restore into each other's place, the value as saved."""
  kinds = {got["kind"], want["kind"]}
  if kinds != {"scalar", "array"}:
    return False
  scalar, array = (got, want) if got["kind"] == "scalar" else (want, got)
  return array["shape"] == [] and jnp.issubdtype(_dtype(array["dtype"]),
                                                 _SCALAR_KINDS[scalar["type"]])


def _compare(name: str, got: dict[str, Any], want: dict[str, Any], where: str) -> None:
  head = f"entry {name!r} of checkpoint {where}"
  if _scalar_and_0d_array(got, want):
    return
  if got["kind"] != want["kind"]:
    why = ("; the checkpoint comes from another model layout (quantized vs not)"
           if "quant_state" in (got["kind"], want["kind"]) else "")
    raise ValueError(f"{head} is {fmt(got)}, but the target has {fmt(want)} there{why}")
  if got["kind"] == "quant_state":
    for key in ("quant_type", "shape", "dtype", "blocksize", "nested_blocksize"):
      if got[key] != want[key]:
        raise ValueError(f"{head} is {fmt(got)}, but the target expects {fmt(want)} "
                         f"({key}: {got[key]!r} vs {want[key]!r}); QuantState metadata must "
                         "match exactly (quantize the target the same way, or restore without a "
                         "target and convert)")
    got_a, want_a = got["arrays"], want["arrays"]
    if set(got_a) != set(want_a):
      raise ValueError(f"{head}: the checkpoint's QuantState has arrays {sorted(got_a)}, the "
                       f"target's {sorted(want_a)}")
    for f in got_a:
      if got_a[f] != want_a[f]:
        raise ValueError(f"{head}: QuantState.{f} is {_fmt_array(got_a[f])} in the checkpoint "
                         f"but {_fmt_array(want_a[f])} in the target (another layout); "
                         "refusing to reinterpret or cast it")
    return
  if got["kind"] == "scalar" and got["type"] != want["type"]:
    raise ValueError(f"{head} is {fmt(got)}, the target has {fmt(want)}")
  if got["kind"] == "key" and got["key_dtype"] != want["key_dtype"]:
    raise ValueError(f"{head} is {fmt(got)}, the target has {fmt(want)} (another PRNG "
                     "implementation)")
  if got["shape"] != want["shape"] or got["dtype"] != want["dtype"]:
    raise ValueError(f"{head} is {_fmt_array(got)}, but the target expects {_fmt_array(want)}; "
                     "Orbax would silently cast or fail deep inside, so the restore is refused "
                     "(restore without a target, or with a target of the saved dtype, and "
                     "convert explicitly)")


def _leaf_sharding(x: Any) -> jax.sharding.Sharding | None:
  if isinstance(x, jax.Array):
    try:
      return x.sharding
    except Exception:  # deleted or abstract arrays
      return None
  if isinstance(x, jax.ShapeDtypeStruct):
    return x.sharding
  return None


def _is_sharding_leaf(x: Any) -> bool:
  return x is None or isinstance(x, jax.sharding.Sharding) or is_quant_state(x)


def sharding_resolver(shardings: Shardings, entries: list[Entry]
                      ) -> Callable[[Entry, str | None, jax.ShapeDtypeStruct],
                                    jax.sharding.Sharding | None]:
  """A function (entry, QuantState field or None, abstract array) -> sharding or None.

  ``shardings`` is a single ``Sharding`` for every array, a callable
  ``(name, ShapeDtypeStruct) -> Sharding | None`` (``name`` is the entry's path, plus
  ``/<field>`` for a QuantState's arrays), a pytree of the target's structure with a
  ``Sharding`` (or a QuantState of shardings) per entry -- ``None`` at a node: the target's own
  sharding there (e.g. ``TrainState`` shardings with optional fields left ``None``) -- or
  ``None``: the target's own shardings where it has arrays with one.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    return lambda entry, field, abstract: shardings
  if callable(shardings) and not hasattr(shardings, "__jax_array__"):
    def from_fn(entry, field, abstract):
      name = entry.name if field is None else f"{entry.name}/{field}"
      return shardings(name, abstract)
    return from_fn
  table: dict[tuple[str, ...], Any] = {}
  if shardings is not None:
    from jaxquant.checkpoint._tree import _key_str  # noqa: PLC0415
    leaves, _ = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=_is_sharding_leaf)
    # None in the tree: that entry takes the target's own sharding (as ``shardings=None`` does
    # for all); a None where the target has no array either (an unused optional field) is fine.
    table = {tuple(_key_str(k) for k in p): s for p, s in leaves if s is not None}
    unknown = set(table) - {e.parts for e in entries}
    if unknown:
      raise ValueError(f"shardings has entries the target lacks: "
                       f"{_listing([path_name(p) for p in sorted(unknown)])}")

  def from_tree(entry, field, abstract):
    del abstract
    if shardings is not None and entry.parts in table:
      s = table[entry.parts]
    else:
      s = entry.value
    if is_quant_state(s):
      s = getattr(s, field) if field is not None else None
    if s is None or isinstance(s, jax.sharding.Sharding):
      return s
    return _leaf_sharding(s)
  return from_tree


def check_sharding(name: str, sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> None:
  """Refuse a sharding that does not fit the array (before Orbax fails deep inside)."""
  try:
    sharding.shard_shape(tuple(shape))
  except (ValueError, TypeError) as err:
    raise ValueError(f"entry {name!r}: sharding {sharding} does not fit shape {tuple(shape)}: "
                     f"{err}") from None


def default_sharding() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def to_numpy_like(target_leaf: Any, restored: Any) -> Any:
  """Give a restored array the type of the target's leaf (numpy stays numpy)."""
  if isinstance(target_leaf, np.ndarray):
    return np.asarray(restored)
  return restored
