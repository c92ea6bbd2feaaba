"""Helpers shared by the int8 kernels: Triton compiler parameters, masked tile access,
round-half-to-even without ``jnp.rint`` (not lowered by Pallas Triton), the tile order.

Every kernel of this family takes whole arrays (no ``BlockSpec``) and addresses its tiles with
``pl.ds``: edges of ragged shapes are loaded with a mask and ``other=0`` and stored with a mask,
so a partial tile never reads or writes outside its array, on the GPU and in interpret mode.
Masks are only built for the dimensions that are ragged, so the common aligned shapes compile
to plain vectorized loads.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

__all__ = ["compiler_params", "pallas_call", "load_tile", "store_tile", "rint", "swizzle",
           "int8_to_float", "is_pow2", "pow2_at_least", "cdiv"]

def is_pow2(v: int) -> bool:
  return v > 0 and v & (v - 1) == 0


def pow2_at_least(v: int) -> int:
  return 1 << max(0, (int(v) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def compiler_params(num_warps: int, num_stages: int) -> Any:
  """Triton compiler parameters (always explicit: see the project's Pallas pitfalls)."""
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def pallas_call(kernel, *, out_shape, grid, name: str, num_warps: int, num_stages: int,
                interpret: bool):
  """``pl.pallas_call`` with whole-array refs and Triton parameters.

  The Triton lowering is deprecated from jax 0.11 and warns when it lowers; only that warning
  is silenced, and only around this call (a jitted caller lowers later, so the pytest
  configuration filters the same message).
  """
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*[Tt]riton.*", category=DeprecationWarning)
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, name=name,
                          compiler_params=compiler_params(num_warps, num_stages),
                          interpret=interpret)


def _edge_mask(starts, sizes, limits, ragged):
  mask = None
  for axis, (start, size, limit, is_ragged) in enumerate(zip(starts, sizes, limits, ragged)):
    if not is_ragged:
      continue
    idx = start + jnp.arange(size, dtype=jnp.int32)
    shape = [1] * len(sizes)
    shape[axis] = size
    m = (idx < limit).reshape(shape)
    mask = m if mask is None else mask & m
  if mask is not None:
    mask = jnp.broadcast_to(mask, tuple(sizes))
  return mask


def load_tile(ref, starts, sizes, ragged):
  """Load ``ref[starts : starts + sizes]``; out-of-range elements of the ragged axes are 0.

  Args:
    ref: a whole-array ref.
    starts: the (traced) start of the tile along each axis.
    sizes: the static tile shape (powers of two).
    ragged: per axis, whether the tile may run past the array's end there.
  """
  view = ref.at[tuple(pl.ds(s, n) for s, n in zip(starts, sizes))]
  mask = _edge_mask(starts, sizes, ref.shape, ragged)
  if mask is None:
    return view[...]
  return pltriton.load(view, mask=mask, other=jnp.zeros((), ref.dtype))


def store_tile(ref, starts, value, ragged):
  """Store ``value`` at ``ref[starts : starts + value.shape]``, skipping what lies outside."""
  view = ref.at[tuple(pl.ds(s, n) for s, n in zip(starts, value.shape))]
  mask = _edge_mask(starts, value.shape, ref.shape, ragged)
  value = value.astype(ref.dtype)
  if mask is None:
    view[...] = value
  else:
    pltriton.store(view, value, mask=mask)


def rint(v: jax.Array) -> jax.Array:
  """Round float32 ``v`` to the nearest integer, ties to even, as ``jnp.rint``.

  Built from ``floor`` and exact subtractions: the Triton lowering has no ``round``, and the
  ``(v + 1.5 * 2**23) - 1.5 * 2**23`` trick is simplified away by XLA in interpret mode.
  """
  r = jnp.floor(v)
  frac = v - r  # exact
  half = jnp.float32(0.5)
  odd = jnp.floor(r * half) * 2.0 != r
  up = (frac > half) | ((frac == half) & odd)
  return jnp.where(up, r + 1.0, r)


def swizzle(pid, num_m: int, num_n: int, group_m: int):
  """Program ``pid`` of a 1-D grid -> ``(pid_m, pid_n)`` walking groups of ``group_m`` tile
  rows column by column, so programs running together share operand tiles in L2."""
  group_m = max(1, min(group_m, num_m))
  per_group = group_m * num_n
  group = pid // per_group
  first_m = group * group_m
  rows = jnp.minimum(num_m - first_m, group_m)
  local = pid % per_group
  return first_m + local % rows, local // rows


def int8_to_float(w: jax.Array, dtype) -> jax.Array:
  """Exact int8 -> float16/bfloat16/float32 with integer and bit operations only.

  The GPU converts integers to floats at a quarter of its integer rate; decoding a weight
  tile that way costs as much as reading it. Instead ``w + 128`` is placed in the significand
  of a float with a fixed exponent (``2**10`` in float16, ``2**23`` in float32), the offset is
  subtracted (exact), and bfloat16 is the upper half of the float32 bits (exact: at most 8
  significant bits).
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float16:
    bits = w.astype(jnp.int16) + jnp.int16(0x6400 + 128)
    return jax.lax.bitcast_convert_type(bits, jnp.float16) - jnp.float16(1024 + 128)
  bits = w.astype(jnp.int32) + jnp.int32(0x4B000000 + 128)
  f = jax.lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(2**23 + 128)
  if dtype == jnp.float32:
    return f
  if dtype == jnp.bfloat16:
    hi = jax.lax.shift_right_logical(jax.lax.bitcast_convert_type(f, jnp.int32), jnp.int32(16))
    return jax.lax.bitcast_convert_type(hi.astype(jnp.int16), jnp.bfloat16)
  raise ValueError(f"int8_to_float: dtype must be float16, bfloat16 or float32, got {dtype}")
