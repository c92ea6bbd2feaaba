"""Backend selection: argument > ``JAXQUANT_BACKEND`` > auto.

``auto`` (and ``None`` with no environment variable) uses ``"pallas"`` when the op runs on a
CUDA GPU (the device of its committed array arguments, else ``jax.default_device``, else JAX's
default backend), a Pallas kernel exists for the op and its ``supports()`` predicate holds;
otherwise ``"xla"`` (the pure-jnp reference): arrays placed on the host CPU of a GPU machine
take the reference. An explicit ``backend="pallas"`` or ``"interpret"`` for an op without that
kernel is an error; the same request through the environment variable is a preference and
falls back to ``"xla"``, since it applies to all ops at once.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax

import pallas_kernels

BACKENDS = ("auto", "xla", "pallas", "interpret")
ENV_VAR = "JAXQUANT_BACKEND"


@functools.cache
def _on_cuda_gpu() -> bool:
  try:
    return jax.default_backend() == "gpu" and jax.devices()[0].platform in ("gpu", "cuda")
  except RuntimeError:
    return False


def _platform(args: tuple[Any, ...]) -> str:
  """Where an op on ``args`` runs: the platform of the first committed concrete array among
  them, else of ``jax.default_device``, else JAX's default backend."""
  for a in jax.tree.leaves(args):
    if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer) and a.committed:
      return next(iter(a.devices())).platform
  default = jax.config.jax_default_device
  if default is not None:
    return str(getattr(default, "platform", default))
  return jax.default_backend()


def _runs_on_cuda(args: tuple[Any, ...]) -> bool:
  return _on_cuda_gpu() and _platform(args) in ("gpu", "cuda")


def select(op: str, backend: str | None, *args: Any, **kwargs: Any) -> str:
  """The implementation of ``op`` to run for ``backend`` and these arguments."""
  from_env = backend is None
  if from_env:
    backend = os.environ.get(ENV_VAR, "auto") or "auto"
  if backend not in BACKENDS:
    source = f"environment variable {ENV_VAR}" if from_env else "backend"
    raise ValueError(f"{source} must be one of {BACKENDS} or None, got {backend!r}")
  available = pallas_kernels.implementations(op)
  if backend == "xla":
    return "xla"
  if backend == "auto":
    if "pallas" in available and _runs_on_cuda(args) and pallas_kernels.get(op, "pallas").supports(
        *args, **kwargs):
      return "pallas"
    return "xla"
  # backend is "pallas" or "interpret"
  if backend not in available:
    if from_env:
      return "xla"
    raise ValueError(
        f"backend={backend!r} is not available for {op}: no Pallas kernel has been written for "
        f"it yet (available: {available}). Use backend='xla' or None."
    )
  if not pallas_kernels.get(op, backend).supports(*args, **kwargs):
    return "xla"  # valid input the kernel does not cover: the reference is always right
  if backend == "pallas" and not _runs_on_cuda(args):
    if from_env:
      return "xla"
    raise ValueError(
        f"backend='pallas' needs a CUDA GPU, but this op runs on {_platform(args)!r} (JAX's "
        f"default backend is {jax.default_backend()!r}); use backend='interpret' to run the "
        "kernel there"
    )
  return backend


def _hashable(value: Any) -> bool:
  try:
    hash(value)
  except TypeError:
    return False
  return True


@functools.cache
def _jitted(op: str, impl: str, static_argnames: tuple[str, ...]):
  return jax.jit(pallas_kernels.get(op, impl).fn, static_argnames=static_argnames)


def call(op: str, backend: str | None, *args: Any, **kwargs: Any) -> Any:
  """Run ``op`` on the implementation :func:`select` picks.

  When every keyword argument is a static (hashable) parameter the implementation runs
  under ``jax.jit`` (compiled once per shape), so eager calls are fast too; inside an outer
  ``jit`` this is simply inlined.
  """
  impl = select(op, backend, *args, **kwargs)
  if all(_hashable(v) for v in kwargs.values()):
    return _jitted(op, impl, tuple(sorted(kwargs)))(*args, **kwargs)
  return pallas_kernels.get(op, impl).fn(*args, **kwargs)
