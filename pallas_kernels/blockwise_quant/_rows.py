"""The "vector rows" view of a flat array, in which the 4-bit kernels keep one register layout.

A flat array of ``n`` elements is viewed as ``(n // vec, vec)``, ``vec`` being the elements of
one 16-byte vector (8 for 2-byte floats, 4 for float32), and a tile of ``rows * blocksize``
elements as ``(rows * blocksize // vec, vec)``. Triton gives such a 2-D block one row per
thread (the row is the thread's 16-byte load or store), and gives the same thread-per-row
layout to every tensor of that shape it reads by index (the code-table lookups), to the packed
bytes ``(.., vec // 2)`` and to the decoded values: a kernel written on this view moves no data
between threads except for the block absmax (a few shuffles), where a flat ``(rows,
blocksize)`` tile makes the Triton compiler shuffle whole tiles through shared memory around
every lookup (``convert_layout``).

Every function takes the tile's :class:`~pallas_kernels.blockwise_quant._common.Program`; the
last tile may overhang the array, and then its loads and stores are masked by row (``n`` is a
multiple of ``vec`` on this view, see :func:`supported`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.blockwise_quant._common import Program, Tile

__all__ = ["vector_width", "supported", "spec", "load_rows", "store_rows", "per_row",
           "block_absmax"]


def vector_width(dtype) -> int:
  """Elements of ``dtype`` in one 16-byte vector."""
  return 16 // jnp.dtype(dtype).itemsize


def supported(n: int, blocksize: int, vec: int) -> bool:
  """Whether ``n`` elements in blocks of ``blocksize`` have a ``(n // vec, vec)`` view whose
  rows never straddle two blocks."""
  return n % vec == 0 and blocksize % vec == 0


def spec(prog: Program, rows: int, width: int) -> pl.BlockSpec:
  """Block spec of a ``(.., width)`` view holding ``rows`` rows per tile."""
  return pl.BlockSpec((rows * prog.tiles, width), lambda i: (i, 0))


def _row_mask(prog: Program, t: Tile, rows: int, width: int, limit: int):
  index = t.index * rows + jax.lax.broadcasted_iota(jnp.int32, (rows, width), 0)
  return index < limit


def _needs_mask(prog: Program, rows: int, limit: int) -> bool:
  return prog.ragged or limit % (rows * prog.tiles) != 0


def load_rows(ref, prog: Program, t: Tile, rows: int, limit: int,
              eviction_policy: str | None = None) -> jax.Array:
  """Rows of tile ``t`` (``rows`` of them) of this program's block of a ``(limit, width)``
  view; rows past ``limit`` read as 0."""
  width = ref.shape[1]
  view = ref.at[pl.ds(t.local * rows, rows), :] if prog.tiles > 1 else ref
  if _needs_mask(prog, rows, limit):
    return pltriton.load(view, mask=_row_mask(prog, t, rows, width, limit), other=0,
                         eviction_policy=eviction_policy)
  if eviction_policy is not None:
    return pltriton.load(view, eviction_policy=eviction_policy)
  return view[...]


def store_rows(ref, value: jax.Array, prog: Program, t: Tile, limit: int) -> None:
  """Store ``value (rows, width)`` as tile ``t`` of a ``(limit, width)`` view (rows past
  ``limit`` are not written)."""
  rows, width = value.shape
  view = ref.at[pl.ds(t.local * rows, rows), :] if prog.tiles > 1 else ref
  if _needs_mask(prog, rows, limit):
    pltriton.store(view, value, mask=_row_mask(prog, t, rows, width, limit))
  else:
    view[...] = value


def per_row(per_block: jax.Array, group: int) -> jax.Array:
  """``(blocks,)`` → ``(blocks * group,)``: each block's value on each of its ``group`` rows."""
  blocks = per_block.shape[0]
  return jnp.broadcast_to(per_block[:, None], (blocks, group)).reshape(blocks * group)


def block_absmax(x: jax.Array, group: int) -> jax.Array:
  """float32 ``x (blocks * group, vec)`` → ``max |x|`` per block of ``group`` rows,
  ``(blocks,)``, NaN-propagating (over the bit patterns, see ``_common.row_absmax``)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(0x7FFFFFFF)
  per_row_max = jnp.max(bits, axis=1)
  blocks = x.shape[0] // group
  return jax.lax.bitcast_convert_type(
      jnp.max(per_row_max.reshape(blocks, group), axis=1), jnp.float32)
