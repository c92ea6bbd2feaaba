"""The part of a sharded QuantState that one device holds, as a QuantState of its own.

With the layout of :func:`jaxquant.sharding.quant_state_specs` a device's rows of ``data`` and
``absmax`` describe its rows of the tensor. When ``nested_absmax`` is split too, the local
nested scales go with them; when it is replicated (the shard does not hold whole nested
blocks), the local absmax is decoded with the shard's global block indices.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.quant_state import FOUR_BIT_TYPES, QuantState

__all__ = ["local_quant_state"]


def _shard(a: jax.Array, device: jax.Device) -> jax.Shard:
  for s in a.addressable_shards:
    if s.device == device:
      return s
  raise ValueError(f"device {device} holds no shard of this array; addressable devices: "
                   f"{sorted(str(s.device) for s in a.addressable_shards)}")


def _local_shape(state: QuantState, data: jax.Shard) -> tuple[int, ...]:
  local = tuple(data.data.shape)
  if len(local) == len(state.shape):
    if state.quant_type in FOUR_BIT_TYPES:
      return local[:-1] + (local[-1] * 2,)
    return local
  if state.quant_type in FOUR_BIT_TYPES:  # flat packed, whole blocks (even count)
    return (local[0] * 2,)
  return local


def local_quant_state(state: QuantState, device: jax.Device) -> QuantState:
  """The QuantState of the slice of ``state``'s tensor that ``device`` holds.

  Args:
    state: a QuantState of ``jax.Array`` s laid out by :func:`jaxquant.sharding.shard_state`
      (data and absmax split along the same tensor dimensions).
    device: one of the devices holding a shard.

  Returns:
    A QuantState of the local tensor slice (shape: the local rows, or a flat run of whole
    blocks), whose arrays are that device's shards: dequantizing it gives exactly the
    device's slice of ``dequantize(state)``. Nested states keep their nested arrays when those
    are split; otherwise the absmax comes back decoded (float32, not nested).

  Raises:
    ValueError: ``device`` holds no shard, or ``data`` and ``absmax`` are not split
      consistently (a layout made by hand, or a flat ``blockwise8`` state whose codes follow
      their tensor while its scales, not splitting into whole blocks, are replicated).
  """
  if not isinstance(state, QuantState):
    raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
  data, absmax = _shard(state.data, device), _shard(state.absmax, device)
  shape = _local_shape(state, data)
  n_local = math.prod(shape)
  if state.quant_type != "int8_rowwise" and -(-n_local // state.blocksize) != absmax.data.size:
    raise ValueError(f"data and absmax are not split consistently on {device}: {n_local} "
                     f"elements but {absmax.data.size} scales of blocksize {state.blocksize}")
  code = None if state.code is None else _shard(state.code, device).data
  fields = dict(data=data.data, absmax=absmax.data, code=code, nested_absmax=None,
                nested_code=None, offset=None, nested_blocksize=None)
  if state.nested:
    nested = _shard(state.nested_absmax, device)
    if nested.data.size < state.nested_absmax.size:  # split with the rows: whole nested blocks
      fields.update(nested_absmax=nested.data,
                    nested_code=_shard(state.nested_code, device).data,
                    offset=_shard(state.offset, device).data,
                    nested_blocksize=state.nested_blocksize)
    else:
      fields["absmax"] = _decode(state, absmax)
  out = QuantState(shape=shape, dtype=state.dtype, blocksize=state.blocksize,
                   quant_type=state.quant_type, **fields)
  out.check()
  return out


def _decode(state: QuantState, absmax: jax.Shard) -> jax.Array:
  """float32 absmax of one shard from the replicated nested scales, by global block index."""
  index = np.arange(state.absmax.size).reshape(state.absmax.shape)[absmax.index]
  nested_index = jnp.asarray(index // state.nested_blocksize, jnp.int32)
  device = absmax.device
  nested_index = jax.device_put(nested_index, device)
  codes = absmax.data.astype(jnp.int32)
  table = _shard(state.nested_code, device).data
  scales = _shard(state.nested_absmax, device).data[nested_index]
  offset = _shard(state.offset, device).data
  return (table[codes] * scales + offset).astype(jnp.float32)
