"""Partition rules, and the PartitionSpec of every array of a QuantState given the spec of the
tensor it stands for.

A 4-bit weight ``(N, K)`` whose rows tile into blocks (``K % blocksize == 0``) is stored as
``data (N, K/2)`` and ``absmax (N, K/blocksize)``: splitting the tensor's rows splits both the
same way. The double quantization (``nested_absmax``) runs over the *flattened* absmax in
blocks of ``nested_blocksize`` (256), so it splits along with the rows only when every shard
holds whole nested blocks: ``(N / n) * (K / blocksize) % 256 == 0``. Otherwise it is
replicated (it is 1/256 of the absmax, a few kB) and a shard decodes its absmax with the
global block offset (:func:`jaxquant.sharding.local_absmax`). Codebooks and the offset are
always replicated.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

from jax.sharding import Mesh, PartitionSpec as P

from jaxquant.functional._layout import blocks_tile_rows
from jaxquant.quant_state import FOUR_BIT_TYPES, QuantState
from jaxquant.sharding._mesh import DATA, FSDP, axis_size, present_axes

__all__ = ["PartitionRules", "normalize_spec", "array_spec", "fit_spec", "quant_state_specs",
           "row_spec"]

_LORA_MODES = ("follow", "replicate")


def _axes_tuple(name: str, value: Any) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  try:
    items = tuple(value)
  except TypeError:
    raise TypeError(f"{name} must be a mesh axis name, a sequence of names or None, got "
                    f"{value!r}") from None
  for item in items:
    if not isinstance(item, str):
      raise TypeError(f"{name} must hold mesh axis names (str), got {item!r}")
  if len(set(items)) != len(items):
    raise ValueError(f"{name} names a mesh axis twice: {items!r}")
  return items


@dataclasses.dataclass(frozen=True)
class PartitionRules:
  """How a model's state is laid out on a ``(data, fsdp)`` mesh.

  Attributes:
    fsdp: mesh axes the frozen base weights are split across (FSDP / ZeRO-3): a QuantState's
      rows (output features of a linear weight, rows of an embedding table), and the first
      divisible dimension of float arrays with at least ``min_size`` elements. ``()``:
      replicate every weight (pure data parallelism).
    batch: mesh axes the batch (leading) dimension of inputs is split across.
    overrides: ``(regex, PartitionSpec)`` pairs tried in order with ``re.search`` against an
      entry's ``/``-joined path (``"layers/0/attn/q/base/kernel"``); the first match wins.
      For a QuantState the spec is that of the logical tensor (``(out, in)`` for a linear
      weight); dimensions that do not divide (or would cut a quantization block) are left
      whole.
    lora: ``"follow"``: a LoRA adapter is split like its base weight (``lora_b (r, out)``
      along the axes of the base's output features, ``lora_a (in, r)`` along those of its
      input features); ``"replicate"``: adapters on every device.
    min_size: float arrays with fewer elements (norm scales, biases) are replicated.
  """

  fsdp: Any = (FSDP,)
  batch: Any = (DATA, FSDP)
  overrides: Sequence[tuple[str, P]] = ()
  lora: str = "follow"
  min_size: int = 1 << 14

  def __post_init__(self):
    object.__setattr__(self, "fsdp", _axes_tuple("fsdp", self.fsdp))
    object.__setattr__(self, "batch", _axes_tuple("batch", self.batch))
    if self.lora not in _LORA_MODES:
      raise ValueError(f"lora must be one of {_LORA_MODES}, got {self.lora!r}")
    if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 0:
      raise ValueError(f"min_size must be an int >= 0, got {self.min_size!r}")
    overrides = []
    for item in tuple(self.overrides):
      if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
              and isinstance(item[1], P)):
        raise TypeError(f"overrides entries must be (regex str, PartitionSpec) pairs, got "
                        f"{item!r}")
      try:
        re.compile(item[0])
      except re.error as err:
        raise ValueError(f"overrides pattern {item[0]!r} is not a regular expression: "
                         f"{err}") from None
      overrides.append(item)
    object.__setattr__(self, "overrides", tuple(overrides))

  def override(self, name: str) -> P | None:
    """The spec of the first override matching ``name``, else ``None``."""
    for pattern, spec in self.overrides:
      if re.search(pattern, name):
        return spec
    return None


def _entry(axes: tuple[str, ...]) -> Any:
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def normalize_spec(spec: P, ndim: int) -> tuple[Any, ...]:
  """``spec`` as a tuple of exactly ``ndim`` entries (each ``None``, a name or a tuple)."""
  entries = tuple(spec)
  if len(entries) > ndim:
    raise ValueError(f"PartitionSpec {spec} has {len(entries)} entries, more than the "
                     f"array's rank {ndim}")
  return entries + (None,) * (ndim - len(entries))


def _size(mesh: Mesh, entry: Any) -> int:
  return axis_size(mesh, entry)


def fit_spec(mesh: Mesh, spec: P, shape: Sequence[int]) -> P:
  """``spec`` without the axes absent from ``mesh`` and without splits that do not divide
  their dimension of ``shape``."""
  out = []
  for dim, entry in zip(shape, normalize_spec(spec, len(shape))):
    axes = present_axes(mesh, entry)
    out.append(_entry(axes) if axes and dim % axis_size(mesh, axes) == 0 else None)
  return P(*out)


def row_spec(mesh: Mesh, axes: Sequence[str], shape: Sequence[int]) -> P:
  """Split the first dimension of ``shape`` over ``axes`` (a tensor's rows)."""
  if not shape:
    return P()
  return fit_spec(mesh, P(_entry(tuple(axes))), shape)


def array_spec(mesh: Mesh, axes: Sequence[str], shape: Sequence[int], min_size: int) -> P:
  """FSDP default for a float array: split the first dimension that ``axes`` divides, if the
  array has at least ``min_size`` elements; else replicate."""
  n = axis_size(mesh, axes)
  if n == 1 or not shape or math.prod(shape) < max(min_size, 1):
    return P()
  for d, dim in enumerate(shape):
    if dim % n == 0:
      entries = [None] * len(shape)
      entries[d] = _entry(present_axes(mesh, axes))
      return P(*entries)
  return P()


def quant_state_specs(state: QuantState, spec: P, mesh: Mesh) -> tuple[QuantState, list[str]]:
  """The PartitionSpec of each array of ``state`` for its tensor split as ``spec``.

  Args:
    state: any QuantState (arrays may be abstract).
    spec: the split of the logical tensor (``state.shape``), e.g. ``P("fsdp")`` for rows.
    mesh: the mesh (absent axes and non-dividing splits are dropped).

  Returns:
    ``(specs, notes)``: a QuantState whose array fields hold PartitionSpecs (``None`` fields
    stay ``None``), and human-readable notes on what could not be split as asked.
  """
  notes: list[str] = []
  shape = state.shape
  want = normalize_spec(spec, len(shape))
  tensor = normalize_spec(fit_spec(mesh, P(*want), shape), len(shape))
  for d, (w, got) in enumerate(zip(want, tensor)):
    if present_axes(mesh, w) and got is None:
      notes.append(f"dim {d} ({shape[d]}) not divisible by {axis_size(mesh, w)} shards: kept whole")
  first = tensor[0] if tensor else None
  only_first = first is not None and all(t is None for t in tensor[1:])
  if state.quant_type == "int8_rowwise":
    # int8 values of the tensor's shape, one scale per row, flat (prod(shape[:-1]),)
    data = P(*tensor)
    absmax = P(first) if first is None or all(t is None for t in tensor[1:-1]) else P()
  elif blocks_tile_rows(shape, state.blocksize):
    last = len(shape) - 1
    if tensor[last] is not None and (shape[last] // state.blocksize) % _size(mesh, tensor[last]):
      notes.append(f"last dim: {shape[last] // state.blocksize} blocks per row do not split into "
                   f"{_size(mesh, tensor[last])} shards of whole blocks: kept whole")
      tensor = tensor[:last] + (None,)
    data = absmax = P(*tensor)  # data (..., K/2) packed or (..., K) codes; absmax (..., K/bs)
  else:  # flat blocks over the flattened tensor: split only into whole blocks along dim 0
    ok = only_first and state.size % (_size(mesh, first) * state.blocksize) == 0
    if any(t is not None for t in tensor) and not ok:
      notes.append(f"flat blocks of {state.blocksize}: {spec} does not split {shape} into whole "
                   "blocks; scales replicated")
    absmax = P(first) if ok else P()
    if state.quant_type in FOUR_BIT_TYPES:
      data = absmax  # packed flat ((n + 1) // 2,)
    else:
      data = P(*tensor)  # blockwise8 codes keep the tensor's shape
  nested = _nested_spec(state, absmax, mesh, notes) if state.nested else None
  rep = P()
  specs = state.replace(
      data=data, absmax=absmax, code=None if state.code is None else rep,
      nested_absmax=nested, nested_code=None if state.nested_code is None else rep,
      offset=None if state.offset is None else rep)
  return specs, notes


def _nested_spec(state: QuantState, absmax: P, mesh: Mesh, notes: list[str]) -> P:
  entries = tuple(absmax)
  first = entries[0] if entries else None
  if first is None or any(e is not None for e in entries[1:]):
    return P()
  n = _size(mesh, first)
  count = math.prod(state.absmax.shape)
  per_shard = count // n
  if count % n or per_shard % state.nested_blocksize:
    notes.append(f"nested_absmax replicated: {per_shard} absmax per shard is not a multiple of "
                 f"nested_blocksize {state.nested_blocksize}")
    return P()
  return P(first)
