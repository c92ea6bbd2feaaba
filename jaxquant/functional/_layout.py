"""Array shapes of a QuantState: multi-dimensional where the blocks tile the last dimension
(so a row sharding of the tensor shards its state the same way), flat otherwise."""

from __future__ import annotations

import math


def blocks_tile_rows(shape: tuple[int, ...], blocksize: int) -> bool:
  """True when every block lies inside one row (last-dim slice) of ``shape``."""
  return len(shape) >= 2 and shape[-1] % blocksize == 0


def absmax_shape(shape: tuple[int, ...], blocksize: int) -> tuple[int, ...]:
  if blocks_tile_rows(shape, blocksize):
    return (*shape[:-1], shape[-1] // blocksize)
  return (-(-math.prod(shape) // blocksize),)


def packed_shape(shape: tuple[int, ...], blocksize: int) -> tuple[int, ...]:
  """Shape of the uint8 array holding two 4-bit codes per byte."""
  if blocks_tile_rows(shape, blocksize):
    return (*shape[:-1], shape[-1] // 2)
  return ((math.prod(shape) + 1) // 2,)
