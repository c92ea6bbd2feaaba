"""Helpers shared by the blockwise quantization kernels (Pallas, Triton lowering on the GPU).

Every kernel of this family works on a flat array cut into *tiles* of ``rows`` quantization
blocks (``rows * blocksize`` consecutive elements, a power of two); a program processes
``tiles`` consecutive tiles, and the last program may overhang the array, in which case its
loads and stores are masked. Inside a tile the elements are reshaped to ``(rows, blocksize)``
so that a block's absmax is a row reduction.

Bit-exactness with ``reference.py`` needs IEEE float32 arithmetic where Triton would otherwise
approximate or fuse: :func:`reciprocal` and :func:`mul_rn` use PTX ``rcp.rn`` / ``mul.rn`` on the
GPU (Triton lowers ``1 / x`` to the approximate ``div.full.f32`` and may contract a multiply
into a following add), and plain ``jnp`` arithmetic in interpret mode, where XLA already is
exact.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

__all__ = ["KernelConfig", "Program", "Tile", "launch", "compiler_params", "reciprocal",
           "mul_rn", "clamp_unit", "rounded", "row_absmax", "load_tile", "store_tile",
           "silence_triton_deprecation", "is_power_of_two", "INDEX_LIMIT"]

# Element offsets are int32 inside the kernels.
INDEX_LIMIT = 2**31 - 2**20


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Launch parameters of one kernel (static).

  Attributes:
    elems_per_program: elements of one tile (power of two); a tile covers
      ``max(1, elems_per_program // blocksize)`` quantization blocks.
    tiles_per_program: tiles one program processes in a loop; the next tile's loads are issued
      before the current tile is processed, so memory latency overlaps the arithmetic.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.
    encoder: 4-bit quantize only: ``"clamp"`` (a polynomial of the clamped value picks the
      code up to one, one threshold lookup decides; any input; the clamp is two PTX min/max),
      ``"clamp_select"`` (the same clamp in four compare/selects), ``"poly"`` (no clamp, for
      programs whose absmax are all normal, else ``"compare"``), ``"table"`` (two lookups,
      same condition) or ``"compare"`` (one comparison per threshold); see ``_encode4.py``.
    pairs: 4-bit only, how the two nibbles of a byte are split from / joined into the
      element stream: ``"split"`` (Triton's split / join of a trailing axis of two, in
      registers) or ``"reduce"`` (a shifted sum over that axis / a broadcast and shift).
    layout: 4-bit only: ``"rows"`` (tiles held as 16-byte vector rows, see ``_rows.py``,
      when the size allows; else flat) or ``"flat"`` (``(blocks, blocksize)`` tiles).
    eviction_policy: cache eviction hint for the streamed input (``None`` or Triton's
      ``"evict_first"`` / ``"evict_last"``).
  """
  elems_per_program: int = 8192
  tiles_per_program: int = 1
  num_warps: int = 4
  num_stages: int = 1
  encoder: str = "clamp"
  pairs: str = "split"
  layout: str = "rows"
  eviction_policy: str | None = None


def is_power_of_two(v: int) -> bool:
  return isinstance(v, int) and v > 0 and v & (v - 1) == 0


class Tile(NamedTuple):
  """A tile of a program: ``local`` index among its tiles, global ``index`` in the array."""
  local: Any
  index: Any


@dataclasses.dataclass(frozen=True)
class Program:
  """Static geometry of a launch over ``n`` elements in blocks of ``blocksize``.

  A program processes ``tiles`` consecutive tiles of ``rows`` blocks each.

  Attributes:
    n: elements in the (flat) array.
    blocksize: elements per quantization block.
    rows: blocks per tile.
    tiles: tiles per program.
  """
  n: int
  blocksize: int
  rows: int
  tiles: int = 1

  @classmethod
  def make(cls, n: int, blocksize: int, config: KernelConfig) -> "Program":
    rows = max(1, config.elems_per_program // blocksize)
    # No more tiles per program than the array has.
    tiles = max(1, min(config.tiles_per_program, -(-n // (rows * blocksize))))
    return cls(n=n, blocksize=blocksize, rows=rows, tiles=tiles)

  @property
  def elems(self) -> int:
    """Elements per tile."""
    return self.rows * self.blocksize

  @property
  def n_blocks(self) -> int:
    return -(-self.n // self.blocksize)

  @property
  def grid(self) -> tuple[int]:
    return (-(-self.n // (self.elems * self.tiles)),)

  @property
  def ragged(self) -> bool:
    """True when the last program overhangs the array (its accesses need masks)."""
    return self.n % (self.elems * self.tiles) != 0

  def element_index(self, t: Tile) -> jax.Array:
    """Global element indices of tile ``t``, ``int32 (rows, blocksize)``."""
    shape = (self.rows, self.blocksize)
    return t.index * self.elems + jax.lax.broadcasted_iota(jnp.int32, shape, 0) * \
        self.blocksize + jax.lax.broadcasted_iota(jnp.int32, shape, 1)

  def block_index(self, t: Tile) -> jax.Array:
    """Global block (row) indices of tile ``t``, ``int32 (rows,)``."""
    return t.index * self.rows + jax.lax.broadcasted_iota(jnp.int32, (self.rows,), 0)

  def spec(self, per_tile: int) -> pl.BlockSpec:
    """Block spec of a flat array holding ``per_tile`` entries per tile."""
    return pl.BlockSpec((per_tile * self.tiles,), lambda i: (i,))

  def for_each_tile(self, loads: Sequence[Callable[[Tile], jax.Array]],
                    process: Callable[..., None]) -> None:
    """``process(t, *[load(t) for load in loads])`` for each :class:`Tile` ``t`` of this
    program; with several tiles the loads of the next tile are issued before a tile is
    processed."""
    first = pl.program_id(0) * self.tiles  # outside the loop: the interpreter needs it there
    if self.tiles == 1:
      tile = Tile(0, first)
      process(tile, *[load(tile) for load in loads])
      return

    def body(t, current):
      following = jnp.minimum(t + 1, self.tiles - 1)
      upcoming = tuple(load(Tile(following, first + following)) for load in loads)
      process(Tile(t, first + t), *current)
      return upcoming

    jax.lax.fori_loop(0, self.tiles, body, tuple(load(Tile(0, first)) for load in loads))


def compiler_params(config: KernelConfig) -> pltriton.CompilerParams:
  """Always explicit: ``compiler_params=None`` picks a backend by jax version."""
  return pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


@functools.cache
def silence_triton_deprecation() -> None:
  """Hide jax >= 0.11's per-lowering deprecation notice of the Triton backend of Pallas (only
  that message; every other DeprecationWarning still shows)."""
  warnings.filterwarnings("ignore", message=r"(?s).*Triton backend.*deprecated",
                          category=DeprecationWarning)


def reciprocal(x: jax.Array, interpret: bool) -> jax.Array:
  """``float32(1 / x)`` correctly rounded (round to nearest even), as XLA computes it."""
  if interpret:
    return jnp.float32(1.0) / x
  [out] = pltriton.elementwise_inline_asm(
      "rcp.rn.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
  return out


def rounded(v: jax.Array) -> jax.Array:
  """``v`` itself, as a value a following add cannot be fused with: XLA on the CPU contracts
  ``a * b + c`` into an FMA (one rounding instead of two) even across an optimization
  barrier, but not across ``nextafter(v, v)``, which is ``v``."""
  return jax.lax.nextafter(v, v)


def mul_rn(a: jax.Array, b: jax.Array, interpret: bool) -> jax.Array:
  """``a * b`` in float32, rounded once and never fused with a following add."""
  if interpret:
    return rounded(a * b)
  [out] = pltriton.elementwise_inline_asm(
      "mul.rn.f32 $0, $1, $2;", args=[a, b], constraints="=f,f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])
  return out


def clamp_unit(x: jax.Array, low: float) -> jax.Array:
  """float32 ``x`` clamped to ``[low, 1]`` (``low`` is -1 or 0), NaN sent to ``low``: two PTX
  instructions, ``max.f32`` then ``min.f32``, whose NaN rule (the other operand wins) sends NaN
  to ``low`` (GPU only; ``_encode4.clamp_select`` is the same function in selects)."""
  low_bits = {-1.0: "0fBF800000", 0.0: "0f00000000"}[float(low)]
  [out] = pltriton.elementwise_inline_asm(
      f"max.f32 $0, $1, {low_bits};\n\tmin.f32 $0, $0, 0f3F800000;", args=[x],
      constraints="=f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
  return out


def row_absmax(x: jax.Array) -> jax.Array:
  """``max |x|`` over the last axis of float32 ``x (rows, bs)`` → ``(rows,)``, NaN-propagating.

  Computed on the bit patterns: for non-negative floats the int32 order is the float order and
  every NaN sorts above +inf, so a NaN anywhere gives a NaN absmax, as in ``reference.py``
  (the Triton lowering of a float max drops NaNs).
  """
  bits = jax.lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(0x7FFFFFFF)
  return jax.lax.bitcast_convert_type(jnp.max(bits, axis=1), jnp.float32)


def _tile_mask(t: Tile, size: int, limit: int):
  start = t.index * size
  return start + jax.lax.broadcasted_iota(jnp.int32, (size,), 0) < limit


def _needs_mask(prog: Program, size: int, limit: int) -> bool:
  return prog.ragged or limit % (size * prog.tiles) != 0


def load_tile(ref, prog: Program, t: Tile, size: int, limit: int, other=0,
              eviction_policy: str | None = None) -> jax.Array:
  """Load tile ``t`` (``size`` consecutive entries) of this program's block of a flat ``ref``
  holding ``limit`` entries; entries past ``limit`` read as ``other``."""
  view = ref.at[pl.ds(t.local * size, size)] if prog.tiles > 1 else ref
  if _needs_mask(prog, size, limit):
    return pltriton.load(view, mask=_tile_mask(t, size, limit), other=other,
                         eviction_policy=eviction_policy)
  if eviction_policy is not None:
    return pltriton.load(view, eviction_policy=eviction_policy)
  return view[...]


def store_tile(ref, value: jax.Array, prog: Program, t: Tile, limit: int) -> None:
  """Store ``value (size,)`` as tile ``t`` of this program's block of a flat ``ref`` holding
  ``limit`` entries (entries past ``limit`` are not written)."""
  size = value.shape[0]
  view = ref.at[pl.ds(t.local * size, size)] if prog.tiles > 1 else ref
  if _needs_mask(prog, size, limit):
    pltriton.store(view, value, mask=_tile_mask(t, size, limit))
  else:
    view[...] = value

def launch(kernel: Callable[..., None], *, prog: Program, operands: Sequence[jax.Array],
           in_specs: Sequence[pl.BlockSpec], out_specs: Sequence[pl.BlockSpec],
           out_shape: Sequence[jax.ShapeDtypeStruct], config: KernelConfig, interpret: bool,
           name: str, initial_outputs: Sequence[jax.Array] | None = None) -> list[Any]:
  """``pl.pallas_call`` over ``prog.grid`` with the family's conventions.

  Args:
    kernel: body taking the input refs then the output refs.
    prog: launch geometry.
    operands, in_specs: kernel inputs and their block specs.
    out_specs, out_shape: outputs and their block specs.
    config: launch parameters.
    interpret: run in the Pallas interpreter.
    name: the ``pallas_call``'s name (it appears in the lowered program).
    initial_outputs: for tests: arrays the outputs start from (aliased to them), e.g. filled
      with NaN / 0xFF so an element the kernel fails to write keeps its poison.

  Returns:
    The outputs, a list.
  """
  silence_triton_deprecation()
  operands, in_specs = list(operands), list(in_specs)
  aliases = {}
  if initial_outputs is not None:
    if [(o.shape, o.dtype) for o in initial_outputs] != [(o.shape, o.dtype) for o in out_shape]:
      raise ValueError(f"initial_outputs must match the outputs {list(out_shape)}, got "
                       f"{[(o.shape, o.dtype) for o in initial_outputs]}")
    aliases = {len(operands) + i: i for i in range(len(out_shape))}
    operands += list(initial_outputs)
    in_specs += list(out_specs)
  n_in = len(operands) - len(aliases)

  def body(*refs):
    kernel(*refs[:n_in], *refs[len(operands):])

  return pl.pallas_call(
      body,
      grid=prog.grid,
      in_specs=in_specs,
      out_specs=list(out_specs),
      out_shape=list(out_shape),
      input_output_aliases=aliases,
      compiler_params=compiler_params(config),
      interpret=interpret,
      name=name,
  )(*operands)
