"""Asynchronous saves finish before the interpreter exits.

Orbax writes an asynchronous save in background threads that submit work to thread pools; once
the interpreter starts shutting down, those pools refuse new work, so a script that ends right
after ``save(..., block=False)`` or ``CheckpointManager.save`` would lose its last checkpoint
(Orbax never finalizes it, and prints a traceback). Objects with saves in flight register here
and are finished from ``threading``'s exit hooks, which run before the pools shut down (a plain
``atexit`` hook runs after them, too late).
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401 -- its exit hook must be registered before ours
import threading
from typing import Protocol

__all__ = ["finish_at_exit", "finished"]


class _Finishable(Protocol):
  def _finish(self) -> None: ...


_UNFINISHED: dict[int, _Finishable] = {}
_registered = False


def _finish_all() -> None:
  errors = []
  while _UNFINISHED:
    _, obj = _UNFINISHED.popitem()
    try:
      obj._finish()
    except Exception as err:  # noqa: BLE001 -- finish the others, then report
      errors.append(err)
  if errors:
    raise errors[0]


def finish_at_exit(obj: _Finishable) -> None:
  """Call ``obj._finish()`` at interpreter exit unless :func:`finished` is called first."""
  global _registered
  if not _registered:
    # Hooks run in reverse order of registration: ours before the thread pools' own.
    getattr(threading, "_register_atexit", atexit.register)(_finish_all)
    _registered = True
  _UNFINISHED[id(obj)] = obj


def finished(obj: _Finishable) -> None:
  """``obj`` has no save in flight any more (waited for or closed)."""
  _UNFINISHED.pop(id(obj), None)
