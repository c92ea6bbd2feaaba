"""Numbered checkpoints of a training run, on ``orbax.checkpoint.CheckpointManager``."""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from jaxquant.checkpoint import _exit
from jaxquant.checkpoint._orbax import save_args
from jaxquant.checkpoint._restore import META, STATE, read_meta, restore_with
from jaxquant.checkpoint._validate import Shardings

__all__ = ["CheckpointManager"]


class CheckpointManager:
  """Numbered checkpoints of a training run in one directory.

  Saves are asynchronous by default: :meth:`save` returns once the arrays are copied to host
  memory and the files are written in the background. A step only becomes visible
  (:meth:`all_steps`, :meth:`latest_step`) once Orbax has finalized it (renamed its temporary
  directory), so a run killed mid-save resumes from the previous step; the leftover temporary
  directory is removed by the next save of that step. A program that exits without
  :meth:`close` still waits for the save in flight.

  Args:
    directory: where the steps go (``<directory>/<step>/``); created if missing.
    max_to_keep: keep only the newest ``max_to_keep`` steps (``None``: all).
    save_interval_steps: :meth:`save` skips steps that are not a multiple of it.
    async_save: write in a background thread (``False``: :meth:`save` blocks).
    checksums: record a CRC-32 per array (see :func:`jaxquant.checkpoint.save`).

  Example::

    mngr = jaxquant.checkpoint.CheckpointManager("/tmp/run", max_to_keep=2)
    mngr.save(step, {"model": nnx.state(model), "opt": opt_state})
    ...
    state = mngr.restore(target={"model": nnx.state(model), "opt": opt_state})
    mngr.close()
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = None,
               save_interval_steps: int = 1, async_save: bool = True, checksums: bool = True):
    if max_to_keep is not None and (isinstance(max_to_keep, bool) or int(max_to_keep) < 1):
      raise ValueError(f"max_to_keep must be None or an int >= 1, got {max_to_keep!r}")
    if isinstance(save_interval_steps, bool) or int(save_interval_steps) < 1:
      raise ValueError(f"save_interval_steps must be an int >= 1, got {save_interval_steps!r}")
    self.directory = os.path.abspath(os.fspath(directory))
    self._checksums = bool(checksums)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=int(save_interval_steps),
        enable_async_checkpointing=bool(async_save), create=True)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(),
                       META: ocp.JsonCheckpointHandler()})
    if async_save:
      _exit.finish_at_exit(self)

  def save(self, step: int, tree: Any, *, force: bool = False) -> bool:
    """Start saving ``tree`` as ``step``; False when ``save_interval_steps`` skips it.

    Raises:
      TypeError, ValueError: as :func:`jaxquant.checkpoint.save`.
    """
    if not self._mngr.should_save(int(step)) and not force:
      return False
    return self._mngr.save(int(step), args=save_args(tree, checksums=self._checksums),
                           force=force)

  def _step(self, step: int | None) -> int:
    self._mngr.wait_until_finished()
    steps = list(self._mngr.all_steps())
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no finalized checkpoint in {self.directory}")
      return max(steps)
    if int(step) not in steps:
      raise FileNotFoundError(f"no finalized checkpoint for step {step} in {self.directory} "
                              f"(steps: {sorted(steps)})")
    return int(step)

  def restore(self, step: int | None = None, target: Any = None, *,
              shardings: Shardings = None, strict: bool = True, verify: bool = True) -> Any:
    """Restore ``step`` (default: the latest finalized one); waits for a save in progress.
    Arguments and errors as :func:`jaxquant.checkpoint.restore`."""
    step = self._step(step)
    return restore_with(lambda args: self._mngr.restore(step, args=args),
                        f"{self.directory} step {step}", target, shardings, strict, verify)

  def metadata(self, step: int | None = None) -> dict[str, Any]:
    """The JSON description of ``step`` (default: the latest); reads no array."""
    step = self._step(step)
    return read_meta(lambda args: self._mngr.restore(step, args=args),
                     f"{self.directory} step {step}")

  def latest_step(self) -> int | None:
    """The newest finalized step (``None`` if there is none); does not wait for a save."""
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    """The finalized steps, ascending."""
    return sorted(self._mngr.all_steps())

  def wait_until_finished(self) -> None:
    """Block until an asynchronous save has been finalized."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    """Wait for saves in progress and release the manager's threads."""
    try:
      self._mngr.close()
    finally:
      _exit.finished(self)

  def _finish(self) -> None:
    self.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
