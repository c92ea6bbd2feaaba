"""Save and restore pytrees of QuantStates, LoRA adapters and 8-bit optimizer state with Orbax.

A checkpoint is an Orbax composite checkpoint with two items: ``state`` (Orbax's PyTree
format: a nested dict of arrays, see :mod:`jaxquant.checkpoint._tree`) and ``jaxquant`` (JSON
describing every entry, QuantState metadata and a CRC-32 per array included). Orbax writes
into a temporary directory and renames it once everything is on disk, so an interrupted save
leaves no checkpoint behind; restore refuses temporary (unfinalized) directories.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxquant.checkpoint import _exit, _integrity, _tree, _validate
from jaxquant.checkpoint._restore import META, STATE, Reader, read_meta, restore_with
from jaxquant.checkpoint._validate import Shardings

__all__ = ["save", "restore", "metadata", "abstract", "PendingSave", "save_args"]


def save_args(tree: Any, *, checksums: bool = True) -> ocp.args.Composite:
  """Orbax's save arguments for ``tree``: its arrays and their JSON description."""
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
  if checksums:
    meta["checksums"] = _integrity.checksums(entries)
  nested = _tree.nest([(e.parts, _tree.storable(e, lambda a: a)) for e in entries])
  return ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(nested), META: ocp.args.JsonSave(meta)})


def _check_finalized(path: str) -> None:
  if ocp.utils.is_tmp_checkpoint(path):
    raise ValueError(f"{path} is the temporary directory of an unfinished (interrupted) save; "
                     "it is not a checkpoint and cannot be restored")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  if not ocp.utils.is_checkpoint_finalized(path):
    raise ValueError(f"{path} is an unfinalized checkpoint (its save did not complete)")
  if not os.path.isdir(os.path.join(path, META)):
    raise ValueError(f"{path} is not a jaxquant checkpoint (no '{META}' item); it was not "
                     "written by jaxquant.checkpoint.save or is incomplete")


class PendingSave:
  """An asynchronous save in progress; :meth:`wait` blocks until it is on disk (finalized).
  If the program exits first, the exit waits for it (see ``_exit``)."""

  def __init__(self, checkpointer: ocp.AsyncCheckpointer | None, path: str):
    self._checkpointer = checkpointer
    self.path = path
    if checkpointer is not None:
      _exit.finish_at_exit(self)

  def wait(self) -> str:
    """Block until the checkpoint is committed; returns its path."""
    if self._checkpointer is not None:
      try:
        self._checkpointer.wait_until_finished()
        self._checkpointer.close()
      finally:
        self._checkpointer = None
        _exit.finished(self)
    return self.path

  def _finish(self) -> None:
    self.wait()

  def done(self) -> bool:
    """True once :meth:`wait` has returned."""
    return self._checkpointer is None


def save(path: str | os.PathLike, tree: Any, *, force: bool = False, block: bool = True,
         checksums: bool = True) -> PendingSave:
  """Save a pytree of arrays, Python scalars and QuantStates to ``path`` with Orbax.

  The tree may hold quantized model variables (QuantStates), LoRA adapters (e.g.
  ``nnx.state(model, nnx.LoRAParam)`` alone gives a small adapters-only checkpoint) and optimizer
  state (NamedTuples of QuantStates). Sharded arrays are written shard by shard. Array bytes
  are kept exactly; QuantState metadata goes to a JSON item beside them.

  Args:
    path: a directory that must not exist (unless ``force``).
    tree: any pytree (dicts, lists, NamedTuples, dataclasses, ``nnx.State``) of ``jax.Array``
      (typed PRNG key arrays included), ``np.ndarray``, Python scalars and
      :class:`~jaxquant.QuantState`.
    force: overwrite an existing checkpoint at ``path`` (Orbax removes it before writing the
      new one: a crash in between leaves no checkpoint there, never a mix of the two).
    block: wait until the checkpoint is committed. With ``block=False`` the device arrays are
      copied to host memory before returning and written in a background thread; call
      ``.wait()`` on the result before relying on the files (the interpreter's exit waits
      for a save still in flight).
    checksums: record a CRC-32 of every array so that :func:`restore` detects corrupted
      files (costs one host copy and ~0.5 s/GB of CPU at save time).

  Returns:
    A :class:`PendingSave` (already finished when ``block``).

  Raises:
    TypeError: a leaf that is not an array, scalar or QuantState (named by its key path).
    ValueError: an inconsistent QuantState; two entries with the same key path.
  """
  path = os.path.abspath(os.fspath(path))
  args = save_args(tree, checksums=checksums)
  checkpointer = ocp.AsyncCheckpointer(ocp.CompositeCheckpointHandler())
  checkpointer.save(path, args=args, force=force)
  pending = PendingSave(checkpointer, path)
  if block:
    pending.wait()
  return pending


def _single_reader(path: str) -> Reader:
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  return lambda args: checkpointer.restore(path, args=args)


def restore(path: str | os.PathLike, target: Any = None, *, shardings: Shardings = None,
            strict: bool = True, verify: bool = True) -> Any:
  """Restore a checkpoint written by :func:`save`, bit-exactly, onto any device layout.

  Args:
    path: the checkpoint directory.
    target: a pytree of the saved structure whose leaves are arrays, ``jax.ShapeDtypeStruct``
      (e.g. from ``jax.eval_shape``, ``nnx.eval_shape`` or :func:`abstract`), Python scalars or
      QuantStates of such leaves; the result has its structure and QuantState metadata.
      Shapes, dtypes and QuantState metadata must equal the checkpoint's (nothing is cast);
      a Python scalar and a 0-d array of the same kind stand for each other (the value comes
      back as saved), e.g. ``TrainState.create(...)``'s ``step=0``.
      ``None``: a nested dict (string keys) rebuilt from the checkpoint's description.
    shardings: where the arrays go: a ``jax.sharding.Sharding`` for all, a callable
      ``(name, ShapeDtypeStruct) -> Sharding | None`` (``name`` as in error messages, plus
      ``/data``, ``/absmax``... for QuantState arrays), or a pytree like ``target`` of
      shardings. Default: the target's own shardings, else the first device. The mesh may
      differ from the one the checkpoint was saved from.
    strict: with a target, refuse a checkpoint that holds entries the target lacks; with
      ``strict=False`` only the target's entries are read (e.g. the LoRA adapters of a full
      training checkpoint).
    verify: check every array against the CRC-32 recorded at save time.

  Returns:
    The restored tree.

  Raises:
    FileNotFoundError: no checkpoint at ``path``.
    ValueError: an unfinished save, a checkpoint from another layout (missing or extra
      entries, other QuantState metadata, shape or dtype: the message names the entry), a
      sharding that does not fit, corrupted or truncated files (the entry is named).
  """
  path = os.path.abspath(os.fspath(path))
  _check_finalized(path)
  return restore_with(_single_reader(path), path, target, shardings, strict, verify)


def metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The JSON description of a checkpoint: for every entry its key path, kind, shape, dtype and
  QuantState metadata, and the arrays' checksums. Reads no array."""
  path = os.path.abspath(os.fspath(path))
  _check_finalized(path)
  return read_meta(_single_reader(path), path)


def abstract(tree: Any, shardings: Shardings = None) -> Any:
  """``tree`` with every array replaced by a ``jax.ShapeDtypeStruct`` (QuantStates kept, with
  abstract arrays): a restore target that allocates nothing. ``shardings`` as in
  :func:`restore` (default: the arrays' own shardings)."""
  entries, treedef = _tree.flatten(tree)
  resolve = _validate.sharding_resolver(shardings, entries)

  def one(entry, field, x):
    if x is None or not hasattr(x, "shape") or isinstance(x, np.generic):
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
