"""Shared pieces of the 4-bit matmul kernels: operand layout and in-kernel decoding.

The packed weight ``(N, K/2)`` uint8 is viewed as ``(N, K/g, g/2)`` with ``g = min(block_k,
blocksize)``, so one kernel step loads a ``(rows, nb, g/2)`` tile (``nb = block_k / g``) whose
middle index selects an absmax block: the scale broadcasts along the last axis and no
in-kernel reshape is needed to apply it. Each byte holds two consecutive elements, the first
in the high nibble; a tile decodes to ``hi`` (even ``k``) and ``lo`` (odd ``k``) halves.

For bfloat16/float16 activations the code lookup runs in registers (:mod:`._lut`); for float32
it is a gather from the 16-entry code and the arithmetic is the reference's, exactly.

Double-quantized absmax is decoded per tile in registers:
``absmax = nested_code[q] * nested_absmax[block // nested_blocksize] + offset`` (float32), the
block index being the row-major position of the absmax, as bitsandbytes stores it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.fourbit_matmul import _lut

__all__ = ["Layout", "WeightRefs", "Decoder", "operands", "split_refs", "load_absmax",
           "load_absmax_raw", "absmax_values",
           "masked_load", "dot_precision", "launch", "reduce_partials"]


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static description of a packed ``(n, k)`` weight as one kernel sees it.

  Attributes:
    n: output features (rows of the weight).
    k: input features; a multiple of ``blocksize`` and of ``block_k``.
    blocksize: elements per absmax.
    nested_blocksize: absmax codes per nested scale, or ``None`` without double quant.
    block_k: columns per kernel step.
  """
  n: int
  k: int
  blocksize: int
  nested_blocksize: int | None
  block_k: int

  @property
  def group(self) -> int:
    """Columns per tile sub-block sharing one absmax."""
    return min(self.block_k, self.blocksize)

  @property
  def sub_blocks(self) -> int:
    """Sub-blocks per step (``nb``)."""
    return self.block_k // self.group

  @property
  def blocks_per_row(self) -> int:
    return self.k // self.blocksize


class WeightRefs(NamedTuple):
  """Refs of the weight operands; the nested ones are ``None`` without double quant."""
  packed: Any
  absmax: Any
  code: Any
  tables: Any
  nested_code: Any = None
  nested_absmax: Any = None
  offset: Any = None


def split_refs(refs, nested: bool) -> tuple[WeightRefs, list[Any]]:
  """The weight refs at the head of ``refs`` (as :func:`operands` orders them), and the rest."""
  count = 7 if nested else 4
  return WeightRefs(*refs[:count]), list(refs[count:])


def operands(packed: jax.Array, absmax: jax.Array, code: jax.Array, nested: Any,
             layout: Layout, dtype) -> tuple[jax.Array, ...]:
  """The weight arrays in kernel layout: packed ``(n, k/g, g/2)`` uint8, absmax
  ``(n, k/blocksize)``, code ``(16,)`` f32, the register tables of :mod:`._lut` ``(8,)``
  uint32, then nested code ``(256,)``, nested absmax and offset ``(1,)`` (f32) when double
  quantized."""
  g = layout.group
  table_dtype = dtype if jnp.dtype(dtype) in _lut.FAST_DTYPES else jnp.bfloat16
  arrays = (packed.reshape(layout.n, layout.k // g, g // 2),
            absmax.reshape(layout.n, layout.blocks_per_row),
            code.reshape(16).astype(jnp.float32),
            _lut.code_tables(code, table_dtype))
  if nested is not None:
    arrays += (nested.nested_code.reshape(-1).astype(jnp.float32),
               nested.nested_absmax.reshape(-1).astype(jnp.float32),
               jnp.reshape(nested.offset, (1,)).astype(jnp.float32))
  return arrays


def masked_load(ref, mask, other=0):
  """``ref[...]`` where ``mask`` holds (``other`` elsewhere); a plain load when ``mask`` is
  ``None`` (the tile is known to be in bounds)."""
  if mask is None:
    return ref[...]
  return pltriton.load(ref, mask=mask, other=jnp.asarray(other, ref.dtype))


def load_absmax_raw(refs: WeightRefs, layout: Layout, r0, rows: int, step, row_mask):
  """The stored absmax ``(rows, nb)`` (float, or uint8 codes when double quantized) of
  weight rows ``r0 .. r0 + rows`` for the sub-blocks of step ``step``; see
  :func:`absmax_values`. Split from it so that a kernel can load one step ahead."""
  nb = layout.sub_blocks
  col0 = (step * layout.block_k) // layout.blocksize
  tile = refs.absmax.at[pl.ds(r0, rows), pl.ds(col0, nb)]
  return masked_load(tile, None if row_mask is None else row_mask[:, None])


def absmax_values(refs: WeightRefs, layout: Layout, raw, r0, rows: int, step, row_mask):
  """Float32 absmax ``(rows, nb)`` from :func:`load_absmax_raw`'s tile (masked rows get 0):
  the double quantization decoded in registers."""
  if refs.nested_code is None:
    return raw.astype(jnp.float32)
  nb = layout.sub_blocks
  col0 = (step * layout.block_k) // layout.blocksize
  row = r0 + jax.lax.broadcasted_iota(jnp.int32, (rows, nb), 0)
  col = col0 + jax.lax.broadcasted_iota(jnp.int32, (rows, nb), 1)
  last = layout.n * layout.blocks_per_row - 1
  block = jnp.minimum(row * layout.blocks_per_row + col, last)
  scale = refs.nested_absmax[block // layout.nested_blocksize]
  absmax = refs.nested_code[raw.astype(jnp.int32)] * scale + refs.offset[0]
  return absmax if row_mask is None else jnp.where(row_mask[:, None], absmax, 0.0)


def load_absmax(refs: WeightRefs, layout: Layout, r0, rows: int, step, row_mask):
  """Float32 absmax ``(rows, nb)`` of weight rows ``r0 .. r0 + rows`` for the sub-blocks of
  step ``step`` (masked rows get 0)."""
  raw = load_absmax_raw(refs, layout, r0, rows, step, row_mask)
  return absmax_values(refs, layout, raw, r0, rows, step, row_mask)


class Decoder(NamedTuple):
  """Decodes weight tiles inside a kernel.

  Attributes:
    refs: the weight refs.
    layout: their layout.
    dtype: the activation dtype the tiles are decoded to.
    interpret: the kernel runs in the Pallas interpreter.
    tables: the code's register tables as scalars (bf16/fp16 on the GPU), else ``None``.
  """
  refs: WeightRefs
  layout: Layout
  dtype: Any
  interpret: bool
  tables: Any

  @classmethod
  def create(cls, refs: WeightRefs, layout: Layout, dtype, interpret: bool) -> "Decoder":
    """Call before the kernel's loop, so the tables are loaded once."""
    tables = None
    if jnp.dtype(dtype) in _lut.FAST_DTYPES and not interpret:
      tables = [refs.tables[i] for i in range(8)]
    return cls(refs, layout, dtype, interpret, tables)

  def raw(self, r0, rows: int, step, row_mask) -> tuple[jax.Array, jax.Array]:
    """Packed bytes ``(rows, nb, g / 2)`` uint8 and float32 absmax ``(rows, nb)`` of weight
    rows ``r0 .. r0 + rows``, columns of step ``step`` (masked rows: zero bytes and absmax)."""
    refs, layout = self.refs, self.layout
    nb = layout.sub_blocks
    tile = refs.packed.at[pl.ds(r0, rows), pl.ds(step * nb, nb), :]
    p = masked_load(tile, None if row_mask is None else row_mask[:, None, None])
    return p, load_absmax(refs, layout, r0, rows, step, row_mask)

  def values(self, r0, rows: int, step, row_mask) -> jax.Array:
    """Weight rows ``r0 .. r0 + rows``, columns of step ``step``: ``(rows, nb, g)`` in
    ``dtype`` (masked rows decode to zero)."""
    refs, layout = self.refs, self.layout
    p, scale = self.raw(r0, rows, step, row_mask)
    nb = layout.sub_blocks
    if jnp.dtype(self.dtype) in _lut.FAST_DTYPES:
      return _lut.decode(p, scale, self.tables, refs.code, self.dtype, self.interpret)
    hi = refs.code[(p >> 4).astype(jnp.int32)] * scale[:, :, None]
    lo = refs.code[(p & 0xF).astype(jnp.int32)] * scale[:, :, None]
    w = jnp.stack([hi, lo], axis=-1).reshape(rows, nb, layout.group)
    return w.astype(self.dtype)

  def tile(self, r0, rows: int, step, row_mask) -> jax.Array:
    """The same weights as a ``(rows, block_k)`` matrix."""
    return self.values(r0, rows, step, row_mask).reshape(rows, self.layout.block_k)


def dot_precision(dtype):
  """Full float32 products for float32 operands (Triton would use tf32 otherwise)."""
  if jnp.dtype(dtype) == jnp.float32:
    return jax.lax.Precision.HIGHEST
  return None


def launch(kernel, out: jax.ShapeDtypeStruct, grid: tuple[int, ...], args: tuple[Any, ...], *,
           name: str, num_warps: int, num_stages: int, interpret: bool, poison: bool):
  """Run ``kernel`` over ``grid`` as a Triton ``pallas_call`` named ``name``.

  With ``poison`` the output buffer is first filled with NaN (-1 for integers) and aliased
  to the kernel's output, so an element the kernel does not write stays poisoned (tests);
  the kernel then receives that buffer as one more input ref, before its output ref.
  """
  aliases = {}
  if poison:
    fill = jnp.nan if jnp.issubdtype(out.dtype, jnp.floating) else -1
    args = (*args, jnp.full(out.shape, fill, out.dtype))
    aliases = {len(args) - 1: 0}
  return pl.pallas_call(
      kernel,
      out_shape=out,
      grid=grid,
      input_output_aliases=aliases,
      interpret=interpret,
      name=name,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
  )(*args)


def reduce_partials(partials: jax.Array, bias: jax.Array | None, dtype) -> jax.Array:
  """Split-K epilogue: ``(s, m, n)`` float32 partial sums → ``(m, n)`` in ``dtype``, + bias."""
  y = partials.sum(axis=0)
  if bias is not None:
    y = y + bias.astype(jnp.float32)[None, :]
  return y.astype(dtype)
