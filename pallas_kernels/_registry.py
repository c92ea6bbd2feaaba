"""A registry of implementations per op: ``"xla"`` (the jnp reference) and, where a kernel
exists, ``"pallas"`` (compiled for the GPU) and ``"interpret"`` (the same kernel run by the
Pallas interpreter on any backend).

A kernel registers a ``supports(*args, **kwargs) -> bool`` predicate beside itself: it says
whether the kernel handles these shapes and dtypes; callers fall back to ``"xla"`` when it
does not, so an unsupported shape never gives a wrong answer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

__all__ = ["Implementation", "register", "implementations", "get"]


@dataclasses.dataclass(frozen=True)
class Implementation:
  fn: Callable[..., Any]
  supports: Callable[..., bool]


_REGISTRY: dict[str, dict[str, Implementation]] = {}


def _always(*args: Any, **kwargs: Any) -> bool:
  del args, kwargs
  return True


def register(op: str, implementation: str, fn: Callable[..., Any],
             supports: Callable[..., bool] | None = None) -> None:
  """Register ``fn`` as ``implementation`` of ``op`` (later registrations replace earlier)."""
  _REGISTRY.setdefault(op, {})[implementation] = Implementation(fn, supports or _always)


def implementations(op: str) -> tuple[str, ...]:
  """The implementations registered for ``op``, e.g. ``("xla", "pallas", "interpret")``."""
  return tuple(_REGISTRY.get(op, {}))


def get(op: str, implementation: str) -> Implementation:
  try:
    return _REGISTRY[op][implementation]
  except KeyError:
    raise NotImplementedError(
        f"no {implementation!r} implementation of {op!r}; available: {implementations(op)}"
    ) from None
