"""8-bit optimizer state: one blockwise-quantized QuantState per moment and parameter.

A moment of a parameter of shape ``S`` is a ``blockwise8`` :class:`~jaxquant.QuantState` with
``data`` uint8 of shape ``S``, a float32 absmax per block of ``blocksize`` consecutive elements
(shape ``S[:-1] + (S[-1] // blocksize,)`` when the blocks tile the last dimension, else flat) and
the dynamic map as ``code`` (signed for moments of the gradient, unsigned for sums of squares),
exactly bitsandbytes' optimizer state (``state1``/``state2``, ``absmax1``/``absmax2``,
``qmap1``/``qmap2``). Being a pytree of arrays, it goes through ``jit``, Orbax and
``device_put`` with a sharding; its data shards like the parameter.

The update runs on the *blocked view*: ``(..., blocksize)`` arrays whose leading dimensions are
the parameter's (when the blocks tile rows) or ``(n_blocks,)`` (flat, zero padded).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import codebooks
from jaxquant.functional import _layout
from jaxquant.quant_state import QuantState

__all__ = ["zeros_8bit", "full_8bit", "dequantize", "to_blocks", "from_blocks", "is_quant_state",
           "state_nbytes", "code_for"]


def is_quant_state(x: Any) -> bool:
  return isinstance(x, QuantState)


def code_for(signed: bool) -> jax.Array:
  """The dynamic map, float32 ``(256,)``: signed or unsigned."""
  return jnp.asarray(codebooks.dynamic_map(signed))


def full_8bit(param: Any, value: float, signed: bool, blocksize: int) -> QuantState:
  """A quantized moment equal to ``value`` everywhere, for a parameter like ``param``.

  ``value == 0`` gives all codes of 0.0 and absmax 0 (bitsandbytes zero-initialises the bytes
  and absmax; those decode to zero too). A positive value is stored exactly: every code is 1.0
  (index 255) and each absmax is ``value``. ``value`` may be a traced scalar (e.g. injected by
  ``optax.inject_hyperparams`` into a jitted ``init``).
  """
  shape = tuple(param.shape)
  absmax_shape = _layout.absmax_shape(shape, blocksize)
  index = jnp.where(jnp.asarray(value) == 0, 127 if signed else 0, 255).astype(jnp.uint8)
  data = jnp.full(shape, index, jnp.uint8)
  absmax = jnp.full(absmax_shape, value, jnp.float32)
  return QuantState(data=data, absmax=absmax, code=code_for(signed), nested_absmax=None,
                    nested_code=None, offset=None, shape=shape, dtype=jnp.float32,
                    blocksize=blocksize, quant_type="blockwise8")


def zeros_8bit(param: Any, signed: bool, blocksize: int) -> QuantState:
  return full_8bit(param, 0.0, signed, blocksize)


def _pad_amount(shape: tuple[int, ...], blocksize: int) -> int:
  n = math.prod(shape)
  return -(-n // blocksize) * blocksize - n


def to_blocks(x: jax.Array, blocksize: int) -> jax.Array:
  """``x`` in the blocked view ``(..., blocksize)`` (zero padded when flat and ragged)."""
  shape = tuple(x.shape)
  if _layout.blocks_tile_rows(shape, blocksize):
    return x.reshape(*shape[:-1], shape[-1] // blocksize, blocksize)
  flat = x.reshape(-1)
  pad = _pad_amount(shape, blocksize)
  if pad:
    flat = jnp.pad(flat, (0, pad))
  return flat.reshape(-1, blocksize)


def from_blocks(xb: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`to_blocks`."""
  n = math.prod(shape)
  if xb.size == n:
    return xb.reshape(shape)
  return xb.reshape(-1)[:n].reshape(shape)


def dequantize(state: QuantState) -> jax.Array:
  """A moment as float32 of the parameter's shape."""
  blocks = to_blocks(state.data, state.blocksize)
  values = state.code.astype(jnp.float32)[blocks.astype(jnp.int32)]
  values = values * state.absmax.reshape(blocks.shape[:-1])[..., None]
  return from_blocks(values, state.shape)


def state_nbytes(tree: Any) -> int:
  """Bytes of every array in ``tree`` (QuantState codes, absmax and maps included)."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      total += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  return total
