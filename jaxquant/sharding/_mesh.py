"""Device meshes for quantized fine-tuning: a ``data`` axis (replicas) times an ``fsdp`` axis
(the quantized base weights are split across it; the batch is split over both)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["DATA", "FSDP", "make_mesh", "axis_size", "present_axes", "batch_spec",
           "batch_sharding"]

DATA = "data"
FSDP = "fsdp"


def _check_count(name: str, value: Any) -> None:
  if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                            or value < 1):
    raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def make_mesh(data: int | None = 1, fsdp: int | None = None, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 2-D ``(data, fsdp)`` mesh over ``devices`` (default: all of ``jax.devices()``).

  Args:
    data: replicas of the weights (pure data parallelism). ``None``: whatever ``fsdp`` leaves.
    fsdp: devices the quantized base weights (and, by default, the optimizer state) are split
      across; the batch is split over ``data * fsdp``. ``None``: whatever ``data`` leaves.
    devices: the devices to use, in order (e.g. ``jax.devices()[:2]``); with several hosts,
      every process passes the same global list (the default).

  Returns:
    A ``jax.sharding.Mesh`` with axis names ``("data", "fsdp")`` and ``Auto`` axis types, so
    ``jax.jit`` with ``in_shardings`` / ``out_shardings`` partitions everything else.

  Raises:
    ValueError: a count that is not a positive int, both ``None``, or ``data * fsdp`` not
      equal to the number of devices.

  Example::

    mesh = make_mesh(data=2, fsdp=4)       # 8 devices: 2 replicas x 4 weight shards
  """
  _check_count("data", data)
  _check_count("fsdp", fsdp)
  if devices is not None and np.ndim(np.asarray(devices, dtype=object)) != 1:
    raise ValueError(f"devices must be a flat sequence of jax.Device, got an array of shape "
                     f"{np.shape(np.asarray(devices, dtype=object))}; for a grid of your own, "
                     "build jax.sharding.Mesh(grid, ('data', 'fsdp'))")
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("devices must not be empty")
  n = len(devices)
  if data is None and fsdp is None:
    raise ValueError("give data or fsdp (or both); got data=None and fsdp=None")
  if data is None:
    if n % fsdp:
      raise ValueError(f"fsdp={fsdp} does not divide the {n} devices")
    data = n // fsdp
  if fsdp is None:
    if n % data:
      raise ValueError(f"data={data} does not divide the {n} devices")
    fsdp = n // data
  if data * fsdp != n:
    raise ValueError(f"data * fsdp must equal the number of devices {n}, got data={data}, "
                     f"fsdp={fsdp} ({data * fsdp}); pass devices= to use a subset")
  grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
  auto = jax.sharding.AxisType.Auto
  return Mesh(grid, (DATA, FSDP), axis_types=(auto, auto))


def present_axes(mesh: Mesh, axes: str | Sequence[str] | None) -> tuple[str, ...]:
  """The names in ``axes`` that ``mesh`` has, in order (absent axes mean "not split")."""
  if axes is None:
    return ()
  if isinstance(axes, str):
    axes = (axes,)
  return tuple(a for a in axes if a in mesh.shape)


def axis_size(mesh: Mesh, axes: str | Sequence[str] | None) -> int:
  """Number of shards along ``axes`` (1 for ``None`` or absent axes)."""
  return math.prod(mesh.shape[a] for a in present_axes(mesh, axes))


def _entry(axes: tuple[str, ...]) -> Any:
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def batch_spec(mesh: Mesh, batch_axes: str | Sequence[str], leading: int | None = None) -> P:
  """``P(batch_axes)`` on the leading (batch) dimension, or ``P()`` when ``leading`` is given
  and not divisible by the number of batch shards."""
  axes = present_axes(mesh, batch_axes)
  if leading is not None and leading % axis_size(mesh, axes):
    return P()
  return P(_entry(axes))


def batch_sharding(mesh: Mesh, tree: Any = None, *,
                   batch_axes: str | Sequence[str] = (DATA, FSDP)) -> Any:
  """``NamedSharding`` splitting the leading (batch) dimension over ``batch_axes``.

  With ``tree`` (a pytree of arrays or ``ShapeDtypeStruct``), one sharding per leaf; scalars
  and leaves whose batch dimension does not divide are replicated. Without, a single
  sharding for every batch array.
  """
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  if tree is None:
    return NamedSharding(mesh, batch_spec(mesh, batch_axes))

  def one(x):
    shape = tuple(getattr(x, "shape", ()))
    if not shape:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, batch_spec(mesh, batch_axes, shape[0]))
  return jax.tree.map(one, tree)
