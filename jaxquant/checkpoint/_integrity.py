"""Checksums of a checkpoint's arrays: corrupted files are refused instead of restored.

Orbax's array format (zarr chunks in an OCDBT database) stores raw bytes without a checksum: a
flipped bit in a data file restores silently to a wrong value. So ``save`` records a CRC-32 of
every array's bytes (C order, the array's own dtype) in the checkpoint's JSON description, and
``restore`` recomputes it from what it read. The CRC needs the whole array on one host: arrays
that are not fully addressable (multi-host sharding) are recorded as ``None`` and not checked.
"""

from __future__ import annotations

import zlib
from typing import Any, Iterable

import jax
import numpy as np

from jaxquant.checkpoint._tree import QS_FIELDS, Entry, is_quant_state, key_data

__all__ = ["array_names", "crc32", "checksums", "verify"]


def array_names(entry: Entry) -> list[tuple[str, str | None]]:
  """(name in messages, QuantState field or None) of every array an entry saves."""
  v = entry.value
  if is_quant_state(v):
    return [(f"{entry.name}/{f}", f) for f in QS_FIELDS if getattr(v, f) is not None]
  return [(entry.name, None)]


def crc32(x: Any) -> int | None:
  """CRC-32 of the bytes of ``x`` (C order); ``None`` for an array this host cannot see
  whole. A PRNG key array's raw data is checked."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  x = key_data(x)
  a = np.ascontiguousarray(np.asarray(x))
  return zlib.crc32(a.reshape(-1).view(np.uint8))


def _field(value: Any, field: str | None) -> Any:
  return value if field is None else getattr(value, field)


def checksums(entries: Iterable[Entry]) -> dict[str, int | None]:
  """``{array name: crc32}`` of every array of ``entries`` (Python scalars are skipped: their
  value is in the JSON description itself)."""
  out: dict[str, int | None] = {}
  for e in entries:
    if not (is_quant_state(e.value) or hasattr(e.value, "shape")) or isinstance(e.value,
                                                                                 np.generic):
      continue
    for name, field in array_names(e):
      out[name] = crc32(_field(e.value, field))
  return out


def verify(stored: dict[str, int | None], entries: Iterable[Entry], where: str) -> None:
  """Compare restored arrays with the checksums recorded at save time.

  Args:
    stored: ``meta["checksums"]`` of the checkpoint (absent in checkpoints without them).
    entries: the restored entries (values are the restored arrays / QuantStates).
    where: the checkpoint, for messages.

  Raises:
    ValueError: an array whose bytes differ from what was saved (named).
  """
  for e in entries:
    if not (is_quant_state(e.value) or hasattr(e.value, "shape")):
      continue
    for name, field in array_names(e):
      want = stored.get(name)
      if want is None:
        continue
      got = crc32(_field(e.value, field))
      if got is not None and got != want:
        raise ValueError(f"entry {name!r} of checkpoint {where} is corrupted: its bytes have "
                         f"CRC-32 {got:#010x}, the save recorded {want:#010x}; restore an "
                         "earlier checkpoint (or pass verify=False to read it anyway)")
