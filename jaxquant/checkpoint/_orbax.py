"""Save and restore pytrees of QuantStates, LoRA adapters and 8-bit optimizer state with Orbax.

A checkpoint is an Orbax composite checkpoint with two items: ``state`` (Orbax's PyTree
format: a nested dict of arrays, see :mod:`jaxquant.checkpoint._tree`) and ``jaxquant`` (JSON
describing every entry, QuantState metadata included). Orbax writes into a temporary directory
and renames it when everything is on disk, so an interrupted save leaves no checkpoint behind;
restore refuses temporary (unfinalized) directories.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxquant.checkpoint import _tree, _validate
from jaxquant.checkpoint._validate import Shardings

__all__ = ["save", "restore", "metadata", "abstract", "CheckpointManager", "PendingSave"]

STATE = "state"
META = "jaxquant"
_TMP_MARKER = ".orbax-checkpoint-tmp"


def _prepare(tree: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """(nested dict of arrays for Orbax, JSON description) of ``tree``."""
  entries, _ = _tree.flatten(tree)
  if not entries:
    raise ValueError("tree has no arrays to save")
  for e in entries:
    if _tree.is_quant_state(e.value):
      try:
        e.value.check()
      except ValueError as err:
        raise ValueError(f"entry {e.name!r}: {err}") from None
  meta = _tree.describe_tree(entries)
  nested = _tree.nest([(e.parts, _tree.storable(e, lambda a: a)) for e in entries])
  return nested, meta


def _save_args(tree: Any) -> ocp.args.Composite:
  nested, meta = _prepare(tree)
  return ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(nested), META: ocp.args.JsonSave(meta)})


def _check_finalized(path: str) -> None:
  if _TMP_MARKER in os.path.basename(path.rstrip("/")):
    raise ValueError(f"{path} is a temporary directory of an unfinished (interrupted) save; it "
                     "is not a checkpoint and cannot be restored")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  if not os.path.isdir(os.path.join(path, META)):
    raise ValueError(f"{path} is not a jaxquant checkpoint (no '{META}' item); it was not "
                     "written by jaxquant.checkpoint.save or is incomplete")


def _read_meta(read: Any, where: str) -> dict[str, Any]:
  try:
    meta = read(ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
  except FileNotFoundError:
    raise
  except Exception as err:  # corrupted JSON item
    raise ValueError(f"cannot read the jaxquant metadata of checkpoint {where}: {err}") from err
  if not isinstance(meta, dict) or meta.get("format") != _tree.FORMAT:
    raise ValueError(f"checkpoint {where} has no jaxquant metadata of format {_tree.FORMAT!r}")
  if meta.get("version", 0) > _tree.FORMAT_VERSION:
    raise ValueError(f"checkpoint {where} has format version {meta['version']}; this jaxquant "
                     f"reads up to {_tree.FORMAT_VERSION}")
  return meta


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


def _restore_args(entries: list[_tree.Entry], infos: list[dict[str, Any]],
                  shardings: Shardings) -> tuple[dict[str, Any], dict[str, Any]]:
  """(abstract nested dict, nested restore args) for Orbax."""
  resolve = _validate.sharding_resolver(shardings, entries)
  items, rargs = [], []

  def one(entry, field, a_info):
    shape = tuple(a_info["shape"])
    abstract = jax.ShapeDtypeStruct(shape, _tree._dtype(a_info["dtype"]))
    sharding = resolve(entry, field, abstract) or _validate.default_sharding()
    name = entry.name if field is None else f"{entry.name}/{field}"
    _validate.check_sharding(name, sharding, shape)
    return (jax.ShapeDtypeStruct(shape, abstract.dtype, sharding=sharding),
            ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape))

  for entry, info in zip(entries, infos):
    if info["kind"] == "quant_state":
      pairs = {f: one(entry, f, a) for f, a in info["arrays"].items()}
      items.append((entry.parts, {f: p[0] for f, p in pairs.items()}))
      rargs.append((entry.parts, {f: p[1] for f, p in pairs.items()}))
    elif info["kind"] == "scalar":
      items.append((entry.parts, np.zeros(info["shape"], _tree._dtype(info["dtype"]))))
      rargs.append((entry.parts, ocp.RestoreArgs(restore_type=np.ndarray)))
    else:
      a, r = one(entry, None, info)
      items.append((entry.parts, a))
      rargs.append((entry.parts, r))
  return _tree.nest(items), _tree.nest(rargs)


def _restore(read: Any, where: str, target: Any, shardings: Shardings, strict: bool) -> Any:
  meta = _read_meta(read, where)
  if target is None:
    entries = _entries_from_meta(meta)
    infos = meta["entries"]
    treedef = None
  else:
    entries, treedef = _tree.flatten(target)
    if not entries:
      raise ValueError("target has no arrays to restore")
    infos = _validate.match(meta, entries, where=where, strict=strict)
  abstract, rargs = _restore_args(entries, infos, shardings)
  partial = len(entries) < len(meta["entries"])
  state_args = (ocp.args.PyTreeRestore(abstract, restore_args=rargs, partial_restore=True)
                if partial else ocp.args.PyTreeRestore(abstract, restore_args=rargs))
  try:
    restored = read(ocp.args.Composite(**{STATE: state_args}))[STATE]
  except FileNotFoundError as err:
    raise ValueError(f"checkpoint {where} is incomplete or corrupted: {err}") from err
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
  if treedef is not None:
    return jax.tree_util.tree_unflatten(treedef, values)
  return _unescaped_nest([(e.parts, v) for e, v in zip(entries, values)])


def _unescaped_nest(items: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
  root: dict[str, Any] = {}
  for parts, value in items:
    node = root
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return root


class PendingSave:
  """An asynchronous save in progress; :meth:`wait` blocks until it is on disk (finalized)."""

  def __init__(self, checkpointer: ocp.AsyncCheckpointer, path: str):
    self._checkpointer = checkpointer
    self.path = path

  def wait(self) -> str:
    """Block until the checkpoint is committed; returns its path."""
    if self._checkpointer is not None:
      self._checkpointer.wait_until_finished()
      self._checkpointer.close()
      self._checkpointer = None
    return self.path


def save(path: str | os.PathLike, tree: Any, *, force: bool = False,
         block: bool = True) -> PendingSave:
  """Save a pytree of arrays, Python scalars and QuantStates to ``path`` with Orbax.

  The tree may hold quantized model variables (QuantStates), LoRA adapters (e.g.
  ``nnx.state(model, nnx.LoRAParam)`` alone gives a small adapters-only checkpoint) and optimizer
  state (NamedTuples of QuantStates from ``jaxquant.optim``). Sharded arrays are saved by every
  host's shards. Array bytes are kept exactly; QuantState metadata goes to a JSON item beside
  them.

  Args:
    path: a directory that must not exist (unless ``force``).
    tree: any pytree (dicts, lists, NamedTuples, dataclasses, ``nnx.State``) of ``jax.Array``,
      ``np.ndarray``, Python scalars and :class:`~jaxquant.QuantState`.
    force: overwrite an existing checkpoint at ``path``.
    block: wait until the checkpoint is committed. With ``block=False`` the device arrays are
      copied to host memory before returning and written in a background thread; call
      ``.wait()`` on the result before relying on the files.

  Returns:
    A :class:`PendingSave` (already finished when ``block``).

  Raises:
    TypeError: a leaf that is not an array, scalar or QuantState (named by its key path).
    ValueError: an inconsistent QuantState; two entries with the same key path.
  """
  path = os.path.abspath(os.fspath(path))
  args = _save_args(tree)
  checkpointer = ocp.AsyncCheckpointer(ocp.CompositeCheckpointHandler())
  checkpointer.save(path, args=args, force=force)
  pending = PendingSave(checkpointer, path)
  if block:
    pending.wait()
  return pending


def _single_reader(path: str):
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  return lambda args: checkpointer.restore(path, args=args)


def restore(path: str | os.PathLike, target: Any = None, *, shardings: Shardings = None,
            strict: bool = True) -> Any:
  """Restore a checkpoint written by :func:`save`, bit-exactly, onto any device layout.

  Args:
    path: the checkpoint directory.
    target: a pytree of the saved structure whose leaves are arrays, ``jax.ShapeDtypeStruct``
      (e.g. from ``jax.eval_shape`` or :func:`abstract`), Python scalars or QuantStates of such
      leaves; the result has its structure and QuantState metadata. Shapes, dtypes and
      QuantState metadata must equal the checkpoint's (nothing is cast). ``None``: a nested
      dict (string keys) rebuilt from the checkpoint's description.
    shardings: where the arrays go: a ``jax.sharding.Sharding`` for all, a callable
      ``(name, ShapeDtypeStruct) -> Sharding | None`` (``name`` as in error messages, plus
      ``/data``, ``/absmax``... for QuantState arrays), or a pytree like ``target`` of
      shardings. Default: the target's own shardings, else the first device. The mesh may
      differ from the one the checkpoint was saved from.
    strict: with a target, refuse a checkpoint that holds entries the target lacks; with
      ``strict=False`` only the target's entries are read (e.g. the LoRA adapters of a full
      training checkpoint).

  Returns:
    The restored tree.

  Raises:
    FileNotFoundError: no checkpoint at ``path``.
    ValueError: an unfinished save, a checkpoint from another layout (missing or extra
      entries, other QuantState metadata, shape or dtype: the message names the entry), a
      sharding that does not fit, corrupted files.
  """
  path = os.path.abspath(os.fspath(path))
  _check_finalized(path)
  return _restore(_single_reader(path), path, target, shardings, strict)


def metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The JSON description of a checkpoint: for every entry its key path, kind, shape, dtype and
  QuantState metadata. Reads no array."""
  path = os.path.abspath(os.fspath(path))
  _check_finalized(path)
  return _read_meta(_single_reader(path), path)


def abstract(tree: Any, shardings: Shardings = None) -> Any:
  """``tree`` with every array replaced by a ``jax.ShapeDtypeStruct`` (QuantStates kept, with
  abstract arrays): a restore target that allocates nothing. ``shardings`` as in
  :func:`restore` (default: the arrays' own shardings)."""
  entries, treedef = _tree.flatten(tree)
  resolve = _validate.sharding_resolver(shardings, entries)

  def one(entry, field, x):
    if x is None or not hasattr(x, "shape"):
      return x
    a = jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=resolve(entry, field, a))

  values = []
  for e in entries:
    if _tree.is_quant_state(e.value):
      values.append(e.value.replace(**{f: one(e, f, getattr(e.value, f))
                                       for f in _tree.QS_FIELDS}))
    else:
      values.append(one(e, None, e.value))
  return jax.tree_util.tree_unflatten(treedef, values)


class CheckpointManager:
  """Numbered checkpoints of a training run in one directory, on ``ocp.CheckpointManager``.

  Saves are asynchronous by default: :meth:`save` returns once the arrays are copied to host
  memory and the files are written in the background; the step only becomes visible
  (:meth:`latest_step`) once Orbax has finalized it, so a run killed mid-save resumes from the
  previous step.

  Example::

    mngr = jaxquant.checkpoint.CheckpointManager("/tmp/run", max_to_keep=2)
    mngr.save(step, {"model": nnx.state(model), "opt": opt_state})
    ...
    state = mngr.restore(target={"model": nnx.state(model), "opt": opt_state})
    mngr.close()
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = None,
               save_interval_steps: int = 1, async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_save, create=True)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(),
                       META: ocp.JsonCheckpointHandler()})

  def save(self, step: int, tree: Any, *, force: bool = False) -> bool:
    """Start saving ``tree`` as ``step``; False when ``save_interval_steps`` skips it."""
    return self._mngr.save(int(step), args=_save_args(tree), force=force)

  def restore(self, step: int | None = None, target: Any = None, *,
              shardings: Shardings = None, strict: bool = True) -> Any:
    """Restore ``step`` (default: the latest finalized one). Arguments as in :func:`restore`."""
    self._mngr.wait_until_finished()
    if step is None:
      step = self._mngr.latest_step()
      if step is None:
        raise FileNotFoundError(f"no finalized checkpoint in {self.directory}")
    where = f"{self.directory} step {step}"
    if step not in self._mngr.all_steps():
      raise FileNotFoundError(f"no finalized checkpoint for step {step} in {self.directory} "
                              f"(steps: {list(self._mngr.all_steps())})")
    return _restore(lambda args: self._mngr.restore(step, args=args), where, target,
                    shardings, strict)

  def metadata(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    return _read_meta(lambda args: self._mngr.restore(step, args=args),
                      f"{self.directory} step {step}")

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def wait_until_finished(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
