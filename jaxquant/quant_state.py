"""QuantState: a quantized tensor as a JAX pytree.

The arrays (packed data, scales, codebooks) are pytree children, so a QuantState goes through
``jax.jit``, ``jax.grad`` (as a constant), ``jax.device_put`` with a sharding, ``jax.tree.map``,
Orbax and ``flax.serialization`` (``to_bytes`` / ``from_bytes``) unchanged. Everything else
(logical shape, original dtype, blocksize, quant type) is static metadata.

Byte layout is bitsandbytes': the tensor is flattened row-major and cut into blocks of
``blocksize`` consecutive elements; 4-bit codes are packed two per byte, the first element in
the high nibble. Where the last dimension is a multiple of the blocksize the arrays stay
multi-dimensional with the leading dimensions of the tensor (for a weight in torch layout
``(out_features, in_features)``: rows are output features), so sharding the rows of the
weight shards its state the same way. Otherwise they are flat. The bytes are the same either
way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

__all__ = ["QuantState", "QUANT_TYPES", "FOUR_BIT_TYPES", "ARRAY_FIELDS"]

FOUR_BIT_TYPES = ("nf4", "fp4")
# blockwise8: 8-bit codes into a 256-entry codebook, per-block absmax.
# int8_rowwise: LLM.int8() weights, int8 values and one float32 absmax per row (CB / SCB).
QUANT_TYPES = FOUR_BIT_TYPES + ("blockwise8", "int8_rowwise")


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "shape") and hasattr(x, "dtype")


def _nbytes(x: Any) -> int:
  if x is None or not _is_array(x):
    return 0
  return int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class QuantState:
  """A quantized tensor: arrays as pytree children, metadata static.

  Attributes:
    data: the codes. ``uint8`` packed nibbles for nf4/fp4 (``shape[:-1] + (shape[-1] // 2,)``
      when ``shape[-1] % blocksize == 0``, else flat ``((n + 1) // 2,)``); ``uint8`` codes of
      the tensor's shape for blockwise8; ``int8`` of the tensor's shape for int8_rowwise.
    absmax: per-block scales. ``float32``, or ``uint8`` codes when double quantized
      (``nested_absmax is not None``); shape ``shape[:-1] + (shape[-1] // blocksize,)`` or
      flat ``(ceil(n / blocksize),)``; ``(prod(shape[:-1]),)`` row scales for int8_rowwise.
    code: ``float32`` codebook, ``(16,)`` for 4-bit, ``(256,)`` for blockwise8; ``None`` for
      int8_rowwise.
    nested_absmax: ``float32 (ceil(n_blocks / nested_blocksize),)`` scales of the
      double-quantized absmax, else ``None``.
    nested_code: ``float32 (256,)`` codebook of the double-quantized absmax, else ``None``.
    offset: ``float32 ()`` mean subtracted from absmax before double quantization, else
      ``None``.
    shape: logical shape of the original tensor.
    dtype: dtype of the original tensor (the default dequantization dtype).
    blocksize: elements per absmax entry.
    quant_type: one of :data:`QUANT_TYPES`.
    nested_blocksize: blocksize of the double quantization, else ``None``.
  """

  data: jax.Array
  absmax: jax.Array
  code: jax.Array | None
  nested_absmax: jax.Array | None
  nested_code: jax.Array | None
  offset: jax.Array | None
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(metadata=dict(static=True))
  blocksize: int = dataclasses.field(metadata=dict(static=True))
  quant_type: str = dataclasses.field(metadata=dict(static=True))
  nested_blocksize: int | None = dataclasses.field(default=None, metadata=dict(static=True))

  def __post_init__(self):
    object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    if self.quant_type not in QUANT_TYPES:
      raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
    # JAX rebuilds pytrees with placeholder leaves (None, shardings, specs) when it maps over
    # them (jit in_shardings, shard_map specs): only a state of arrays is checked.
    if _is_array(self.data) and (self.nested_absmax is None) != (self.nested_blocksize is None):
      raise ValueError(
          "nested_absmax and nested_blocksize must be given together, got "
          f"nested_absmax={'None' if self.nested_absmax is None else 'array'} and "
          f"nested_blocksize={self.nested_blocksize!r}"
      )

  # -- array-like metadata ---------------------------------------------------------------
  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(math.prod(self.shape))

  @property
  def nested(self) -> bool:
    """True when the absmax is itself quantized (double quantization)."""
    return self.nested_blocksize is not None

  @property
  def bits(self) -> int:
    return 4 if self.quant_type in FOUR_BIT_TYPES else 8

  @property
  def nbytes(self) -> int:
    """Bytes held by the arrays of this state (codes, scales and codebooks)."""
    return sum(
        _nbytes(a)
        for a in (self.data, self.absmax, self.code, self.nested_absmax, self.nested_code,
                  self.offset)
    )

  @property
  def num_blocks(self) -> int:
    return -(-self.size // self.blocksize)

  def check(self) -> None:
    """Verify the arrays against the metadata; skips leaves that are not arrays.

    Raises:
      ValueError: naming the field whose shape or dtype disagrees with the metadata.
    """
    n = self.size
    if self.quant_type in FOUR_BIT_TYPES:
      expect = [("data", (n + 1) // 2, (jnp.uint8,)), ("code", 16, (jnp.float32,))]
    elif self.quant_type == "blockwise8":
      expect = [("data", n, (jnp.uint8,)), ("code", 256, (jnp.float32,))]
    else:
      expect = [("data", n, (jnp.int8,))]
    absmax_dtypes = (jnp.uint8,) if self.nested else (jnp.float32,)
    n_scales = (n // self.shape[-1]) if self.quant_type == "int8_rowwise" else self.num_blocks
    expect.append(("absmax", n_scales, absmax_dtypes))
    if self.nested:
      expect.append(("nested_absmax", -(-n_scales // self.nested_blocksize), (jnp.float32,)))
      expect.append(("nested_code", 256, (jnp.float32,)))
      expect.append(("offset", 1, (jnp.float32,)))
    for name, count, dtypes in expect:
      arr = getattr(self, name)
      if not _is_array(arr):
        continue
      got = int(math.prod(arr.shape))
      if got != count or jnp.dtype(arr.dtype) not in [jnp.dtype(d) for d in dtypes]:
        raise ValueError(
            f"QuantState.{name} has shape {tuple(arr.shape)} and dtype {arr.dtype}; a "
            f"{self.quant_type} state of shape {self.shape} with blocksize {self.blocksize} "
            f"needs {count} elements of dtype {jnp.dtype(dtypes[0]).name}"
        )

  def replace(self, **changes: Any) -> "QuantState":
    return dataclasses.replace(self, **changes)

  def __repr__(self) -> str:
    parts = [
        f"shape={self.shape}",
        f"dtype={self.dtype.name}",
        f"quant_type={self.quant_type!r}",
        f"blocksize={self.blocksize}",
    ]
    if self.nested:
      parts.append(f"nested_blocksize={self.nested_blocksize}")
    dense = self.size * self.dtype.itemsize
    parts.append(f"bytes={self.nbytes:,}")
    if dense and self.nbytes:
      parts.append(f"({self.nbytes / dense:.3f}x of {self.dtype.name})")
    return f"QuantState({', '.join(parts)})"


#: The array (pytree child) fields of a QuantState, in order.
ARRAY_FIELDS = ("data", "absmax", "code", "nested_absmax", "nested_code", "offset")

jax.tree_util.register_dataclass(
    QuantState,
    data_fields=list(ARRAY_FIELDS),
    meta_fields=["shape", "dtype", "blocksize", "quant_type", "nested_blocksize"],
)


def _to_state_dict(state: QuantState) -> dict[str, Any]:
  """``flax.serialization`` form: the arrays that are present, by field name."""
  return {f: serialization.to_state_dict(getattr(state, f)) for f in ARRAY_FIELDS
          if getattr(state, f) is not None}


def _from_state_dict(target: QuantState, state: dict[str, Any]) -> QuantState:
  """Restore the arrays into ``target`` (whose static metadata they must fit).

  Raises:
    ValueError: a field present in one of ``target`` and ``state`` but not the other, or
      arrays that disagree with the target's shape, dtype, blocksize or quant type.
  """
  want = {f for f in ARRAY_FIELDS if getattr(target, f) is not None}
  if set(state) != want:
    raise ValueError(f"a serialized {target.quant_type} QuantState of shape {target.shape} must "
                     f"hold the arrays {sorted(want)}, got {sorted(state)}")
  restored = target.replace(**{
      f: serialization.from_state_dict(getattr(target, f), state[f], name=f) for f in want})
  restored.check()
  return restored


serialization.register_serialization_state(QuantState, _to_state_dict, _from_state_dict)
