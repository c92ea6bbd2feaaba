"""Helpers shared by the blockwise quantization kernels (Pallas, Triton lowering on the GPU).

Every kernel of this family works on a flat array cut into *programs* of ``rows`` quantization
blocks (``rows * blocksize`` consecutive elements, a power of two); the last program may overhang
the array, in which case its loads and stores are masked. Inside a program the elements are
reshaped to ``(rows, blocksize)`` so that a block's absmax is a row reduction.

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
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

__all__ = ["KernelConfig", "Program", "launch", "compiler_params", "reciprocal", "mul_rn", "rounded", "row_absmax",
           "load_flat", "store_flat", "silence_triton_deprecation", "is_power_of_two",
           "INDEX_LIMIT"]

# Element offsets are int32 inside the kernels.
INDEX_LIMIT = 2**31 - 2**20


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Launch parameters of one kernel (static).

  Attributes:
    elems_per_program: elements handled by one program (power of two); a program covers
      ``max(1, elems_per_program // blocksize)`` quantization blocks.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.
    encoder: 4-bit quantize only: ``"table"`` (bin lookup, see ``_encode4.py``) or
      ``"compare"`` (one comparison per threshold).
  """
  elems_per_program: int = 8192
  num_warps: int = 4
  num_stages: int = 1
  encoder: str = "table"


def is_power_of_two(v: int) -> bool:
  return isinstance(v, int) and v > 0 and v & (v - 1) == 0


@dataclasses.dataclass(frozen=True)
class Program:
  """Static geometry of a launch over ``n`` elements in blocks of ``blocksize``.

  Attributes:
    n: elements in the (flat) array.
    blocksize: elements per quantization block.
    rows: blocks per program.
  """
  n: int
  blocksize: int
  rows: int

  @classmethod
  def make(cls, n: int, blocksize: int, config: KernelConfig) -> "Program":
    return cls(n=n, blocksize=blocksize, rows=max(1, config.elems_per_program // blocksize))

  @property
  def elems(self) -> int:
    return self.rows * self.blocksize

  @property
  def n_blocks(self) -> int:
    return -(-self.n // self.blocksize)

  @property
  def grid(self) -> tuple[int]:
    return (-(-self.n // self.elems),)

  @property
  def ragged(self) -> bool:
    """True when the last program overhangs the array (its accesses need masks)."""
    return self.n % self.elems != 0

  def element_index(self) -> jax.Array:
    """Global element indices of this program, ``int32 (rows, blocksize)``."""
    base = pl.program_id(0) * self.elems
    return base + jax.lax.broadcasted_iota(jnp.int32, (self.rows, self.blocksize), 0) * \
        self.blocksize + jax.lax.broadcasted_iota(jnp.int32, (self.rows, self.blocksize), 1)

  def block_index(self) -> jax.Array:
    """Global block (row) indices of this program, ``int32 (rows,)``."""
    return pl.program_id(0) * self.rows + jax.lax.broadcasted_iota(jnp.int32, (self.rows,), 0)


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


def row_absmax(x: jax.Array) -> jax.Array:
  """``max |x|`` over the last axis of float32 ``x (rows, bs)`` → ``(rows,)``, NaN-propagating.

  Computed on the bit patterns: for non-negative floats the int32 order is the float order and
  every NaN sorts above +inf, so a NaN anywhere gives a NaN absmax as ``jnp.max`` does (the
  Triton lowering of a float max would drop NaNs).
  """
  bits = jax.lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(0x7FFFFFFF)
  return jax.lax.bitcast_convert_type(jnp.max(bits, axis=1), jnp.float32)


def load_flat(ref, prog: Program, size: int, limit: int, other=0):
  """Load this program's ``size`` consecutive values of a blocked flat ``ref``; values at
  global positions ``>= limit`` read as ``other`` when the program overhangs."""
  if prog.ragged or limit % size:
    start = pl.program_id(0) * size
    mask = start + jax.lax.broadcasted_iota(jnp.int32, (size,), 0) < limit
    return pltriton.load(ref, mask=mask, other=other)
  return ref[...]


def store_flat(ref, value: jax.Array, prog: Program, limit: int) -> None:
  """Store ``value (size,)`` into this program's block of a flat ``ref``, skipping global
  positions ``>= limit``."""
  size = value.shape[0]
  if prog.ragged or limit % size:
    start = pl.program_id(0) * size
    mask = start + jax.lax.broadcasted_iota(jnp.int32, (size,), 0) < limit
    pltriton.store(ref, value, mask=mask)
  else:
    ref[...] = value


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
