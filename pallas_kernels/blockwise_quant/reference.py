"""Pure-jnp blockwise quantization: the CPU fallback and the oracle of the kernels.

Semantics are those of bitsandbytes' CUDA kernels (``kQuantizeBlockwise``,
``kDequantizeBlockwise``), byte for byte:

* the input is flattened row-major and cut into blocks of ``blocksize`` elements, the last
  one possibly partial; ``absmax[b] = max |x|`` over the block, in float32 (NaN when the block
  holds a NaN);
* each element is scaled as ``float32(x) * (1 / absmax[b])`` (a float32 reciprocal, no clamp;
  an all-zero block gives ``0 * inf = NaN``, which every quantizer maps to code 0);
* 4-bit: NF4 takes the number of NF4 thresholds strictly below the scaled value; FP4 takes a
  sign bit (``x < 0``) and a magnitude code from bitsandbytes' literal thresholds on ``|x|``;
  two codes per byte, the first element in the high nibble, an odd tail padded with the code
  of 0.0;
* 8-bit: the index of the nearest code found by bitsandbytes' 7-step binary search over the
  256 sorted entries, comparing against neighbour midpoints (ties resolved as CUDA does);
* dequantization: ``dtype(float32(code[q]) * absmax[b])``.

All functions take and return flat arrays; the caller owns the layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "block_absmax",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_8bit",
    "dequantize_8bit",
    "decode_nested_absmax",
    "NF4_THRESHOLDS",
    "FP4_THRESHOLDS",
    "FP4_CODE_BY_RANK",
]

# Decision thresholds of bitsandbytes' CUDA 4-bit quantizers (strict ``x > t``).
NF4_THRESHOLDS = (
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
)
FP4_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
FP4_CODE_BY_RANK = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)


def _blocks(x: jax.Array, blocksize: int) -> jax.Array:
  """Flat ``(n,)`` → ``(n_blocks, blocksize)`` float32, zero padded."""
  x = x.reshape(-1).astype(jnp.float32)
  n_blocks = -(-x.size // blocksize)
  return jnp.pad(x, (0, n_blocks * blocksize - x.size)).reshape(n_blocks, blocksize)


def _row_absmax(blocks: jax.Array) -> jax.Array:
  """``max |x|`` over the last axis of float32 ``blocks``; NaN if the row holds a NaN.

  Taken over the bit patterns of ``|x|`` (for non-negative floats the int32 order is the float
  order, and NaNs sort above +inf): a float max reduction propagates NaN on some backends
  and not others (XLA on the CPU drops it depending on its position)."""
  bits = jax.lax.bitcast_convert_type(blocks, jnp.int32) & jnp.int32(0x7FFFFFFF)
  return jax.lax.bitcast_convert_type(jnp.max(bits, axis=-1), jnp.float32)


def block_absmax(x: jax.Array, blocksize: int) -> jax.Array:
  """``max |x|`` per block of ``blocksize`` consecutive elements: ``(ceil(n / bs),)`` f32
  (NaN for a block holding a NaN)."""
  return _row_absmax(_blocks(x, blocksize))


def _scaled_blocks(x: jax.Array, blocksize: int) -> tuple[jax.Array, jax.Array]:
  blocks = _blocks(x, blocksize)
  absmax = _row_absmax(blocks)
  recip = jnp.float32(1.0) / absmax
  return blocks * recip[:, None], absmax


def encode_4bit(scaled: jax.Array, quant_type: str) -> jax.Array:
  """Codes (uint8 in 0..15) of values already scaled to [-1, 1]."""
  if quant_type == "nf4":
    code = jnp.zeros(scaled.shape, jnp.uint8)
    for t in NF4_THRESHOLDS:
      code = code + (scaled > jnp.float32(t)).astype(jnp.uint8)
    return code
  if quant_type == "fp4":
    mag = jnp.abs(scaled)
    rank = jnp.zeros(scaled.shape, jnp.int32)
    for t in FP4_THRESHOLDS:
      rank = rank + (mag > jnp.float32(t)).astype(jnp.int32)
    code = jnp.asarray(np.array(FP4_CODE_BY_RANK, np.uint8))[rank]
    return code | jnp.where(scaled < 0, jnp.uint8(8), jnp.uint8(0))
  raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def quantize_4bit(x: jax.Array, *, blocksize: int, quant_type: str) -> tuple[jax.Array, jax.Array]:
  """Blockwise 4-bit quantization.

  Args:
    x: any shape, float32/float16/bfloat16; ``n = x.size``.
    blocksize: elements per block.
    quant_type: ``"nf4"`` or ``"fp4"``.

  Returns:
    ``(packed, absmax)``: ``uint8 ((n + 1) // 2,)`` and ``float32 (ceil(n / blocksize),)``.
  """
  n = x.size
  scaled, absmax = _scaled_blocks(x, blocksize)
  codes = encode_4bit(scaled, quant_type).reshape(-1)[:n]
  if n % 2:
    pad_code = encode_4bit(jnp.zeros((1,), jnp.float32), quant_type)
    codes = jnp.concatenate([codes, pad_code])
  pairs = codes.reshape(-1, 2)
  return (pairs[:, 0] << 4) | pairs[:, 1], absmax


def unpack_4bit(packed: jax.Array, n: int) -> jax.Array:
  """``uint8 ((n + 1) // 2,)`` packed bytes → ``uint8 (n,)`` codes, high nibble first."""
  packed = packed.reshape(-1)
  codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)
  return codes[:n]


def _expand(values: jax.Array, absmax: jax.Array, blocksize: int, dtype) -> jax.Array:
  """``values (n,)`` f32 times the absmax of their block → ``(n,)`` in ``dtype``."""
  n = values.size
  n_blocks = absmax.size
  padded = jnp.pad(values, (0, n_blocks * blocksize - n)).reshape(n_blocks, blocksize)
  out = padded * absmax.reshape(-1, 1).astype(jnp.float32)
  return out.reshape(-1)[:n].astype(dtype)


def decode_nested_absmax(absmax: jax.Array, nested_absmax: jax.Array, nested_code: jax.Array,
                         offset: jax.Array, *, nested_blocksize: int) -> jax.Array:
  """Double-quantized absmax → float32 ``(n_blocks,)``:
  ``float32(nested_code[q] * nested_absmax[i // nested_blocksize]) + offset``, two roundings.

  ``nextafter(v, v)`` is ``v``; it keeps XLA from contracting the product and the sum into one
  FMA when both land in one fusion (XLA on the CPU does), so the result does not depend on
  how the surrounding program is fused."""
  values = dequantize_8bit(absmax, nested_absmax, nested_code, blocksize=nested_blocksize,
                           dtype=jnp.float32)
  values = jax.lax.nextafter(values, values)
  return values + jnp.asarray(offset, jnp.float32).reshape(())


def dequantize_4bit(
    packed: jax.Array, absmax: jax.Array, code: jax.Array, nested_absmax: jax.Array | None = None,
    nested_code: jax.Array | None = None, offset: jax.Array | None = None, *, blocksize: int,
    n: int, dtype, nested_blocksize: int = 256,
) -> jax.Array:
  """Inverse of :func:`quantize_4bit`.

  Args:
    packed: ``uint8 ((n + 1) // 2,)`` (any shape, read flat).
    absmax: ``float32 (ceil(n / blocksize),)`` (any shape, read flat), or its ``uint8`` double
      quantization when ``nested_absmax`` is given.
    code: ``float32 (16,)`` value of each nibble.
    nested_absmax: ``float32 (ceil(absmax.size / nested_blocksize),)`` or ``None``.
    nested_code: ``float32 (256,)`` code of the absmax bytes (with ``nested_absmax``).
    offset: ``float32 ()`` added to the decoded absmax (with ``nested_absmax``).
    blocksize: elements per block.
    n: number of elements.
    dtype: output dtype.
    nested_blocksize: absmax entries per ``nested_absmax`` value.

  Returns:
    ``(n,)`` array of ``dtype``: ``dtype(code[q] * absmax[i // blocksize])``.
  """
  if nested_absmax is not None:
    absmax = decode_nested_absmax(absmax, nested_absmax, nested_code, offset,
                                  nested_blocksize=nested_blocksize)
  values = code.astype(jnp.float32)[unpack_4bit(packed, n).astype(jnp.int32)]
  return _expand(values, absmax, blocksize, dtype)


def encode_8bit(scaled: jax.Array, code: jax.Array) -> jax.Array:
  """Nearest-code index (uint8) of values scaled to the code's range, as bitsandbytes' CUDA
  ``dQuantize``: a 7-step binary search from index 127, then a midpoint comparison with the
  bracketing neighbours. NaN maps to 0."""
  code = code.astype(jnp.float32)
  x = scaled
  pivot = jnp.full(x.shape, 127, jnp.int32)
  upper_pivot = jnp.full(x.shape, 255, jnp.int32)
  lower_pivot = jnp.zeros(x.shape, jnp.int32)
  upper = jnp.full(x.shape, code[255])
  lower = jnp.full(x.shape, code[0])
  val = code[pivot]
  step = 64
  while step > 0:
    up = x > val
    lower_pivot = jnp.where(up, pivot, lower_pivot)
    lower = jnp.where(up, val, lower)
    upper_pivot = jnp.where(up, upper_pivot, pivot)
    upper = jnp.where(up, upper, val)
    pivot = jnp.where(up, pivot + step, pivot - step)
    val = code[pivot]
    step //= 2
  upper = jnp.where(upper_pivot == 255, code[255], upper)
  lower = jnp.where(lower_pivot == 0, code[0], lower)
  above = x > val
  mid_up = (upper + val) * jnp.float32(0.5)
  mid_down = (lower + val) * jnp.float32(0.5)
  idx = jnp.where(
      above,
      jnp.where(x > mid_up, upper_pivot, pivot),
      jnp.where(x < mid_down, lower_pivot, pivot),
  )
  return idx.astype(jnp.uint8)


def quantize_8bit(x: jax.Array, code: jax.Array, *, blocksize: int) -> tuple[jax.Array, jax.Array]:
  """Blockwise 8-bit quantization into a sorted 256-entry codebook.

  Args:
    x: any shape, float32/float16/bfloat16; ``n = x.size``.
    code: ``float32 (256,)``, sorted ascending.
    blocksize: elements per block.

  Returns:
    ``(codes, absmax)``: ``uint8 (n,)`` and ``float32 (ceil(n / blocksize),)``.
  """
  scaled, absmax = _scaled_blocks(x, blocksize)
  return encode_8bit(scaled, code).reshape(-1)[: x.size], absmax


def dequantize_8bit(codes: jax.Array, absmax: jax.Array, code: jax.Array, *, blocksize: int,
                    dtype) -> jax.Array:
  """Inverse of :func:`quantize_8bit`: ``(n,)`` of ``dtype``, ``dtype(code[q] * absmax[b])``."""
  values = code.astype(jnp.float32)[codes.reshape(-1).astype(jnp.int32)]
  return _expand(values, absmax, blocksize, dtype)
