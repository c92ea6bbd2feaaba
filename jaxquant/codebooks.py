"""Code tables (codebooks) for k-bit quantization, value-identical to bitsandbytes.

Every table is a float32 NumPy array. The 4-bit tables have 16 entries indexed by the
nibble value; the 8-bit maps have 256 sorted entries indexed by the byte value.

The generators reproduce bitsandbytes' float32 arithmetic exactly, including the way
``torch.linspace`` evaluates its points on the CPU (one rounding of ``start + step * i``,
as a fused multiply-add) so the tables are bit-for-bit those bitsandbytes writes into
checkpoints.
"""

from __future__ import annotations

import functools
import statistics

import numpy as np

__all__ = [
    "NF4",
    "FP4",
    "NF4_THRESHOLDS",
    "FP4_THRESHOLDS",
    "FP4_CODE_BY_RANK",
    "create_dynamic_map",
    "create_linear_map",
    "create_normal_map",
    "dynamic_map",
    "get_codebook",
    "CODEBOOK_NAMES",
]

# NF4 (QLoRA appendix E), ascending; index = nibble value.
NF4 = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)
NF4.setflags(write=False)

# bitsandbytes' FP4 (not OCP E2M1), normalised to [-1, 1], in bit-pattern order: bit 3 is the
# sign, the low three bits index the magnitude.
_FP4_MAGNITUDE = np.array(
    [0.0, 0.0625 / 12, 8 / 12, 12 / 12, 4 / 12, 6 / 12, 2 / 12, 3 / 12], dtype=np.float32
)
FP4 = np.concatenate([_FP4_MAGNITUDE, -_FP4_MAGNITUDE]).astype(np.float32)
FP4[8] = 0.0  # bitsandbytes stores +0.0 for the negative zero pattern 0b1000
FP4.setflags(write=False)

# Decision thresholds of bitsandbytes' CUDA quantizers (strict ``x > t`` moves up).
NF4_THRESHOLDS = np.array(
    [
        -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
        -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
        0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
        0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
    ],
    dtype=np.float32,
)
NF4_THRESHOLDS.setflags(write=False)
# FP4 thresholds on |x|: bitsandbytes' literal constants (not exact midpoints).
FP4_THRESHOLDS = np.array(
    [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333],
    dtype=np.float32,
)
FP4_THRESHOLDS.setflags(write=False)
# Magnitude code (low three bits) by rank of |x| among FP4_THRESHOLDS.
FP4_CODE_BY_RANK = np.array([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011], np.uint8)
FP4_CODE_BY_RANK.setflags(write=False)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """``torch.linspace(start, end, steps, dtype=torch.float32)`` on the CPU, bit for bit.

  torch computes ``step = (end - start) / (steps - 1)`` in float32, then point ``i`` as
  ``start + step * i`` for the first half and ``end - step * (steps - 1 - i)`` for the second,
  each with a single rounding (a fused multiply-add). float64 holds these products and sums
  exactly, so one float64 evaluation followed by one rounding to float32 reproduces it.
  """
  start32, end32 = np.float32(start), np.float32(end)
  if steps == 1:
    return np.array([start32], np.float32)
  step = np.float32((end32 - start32) / np.float32(steps - 1))
  i = np.arange(steps, dtype=np.float64)
  half = steps // 2
  head = np.float64(start32) + np.float64(step) * i
  tail = np.float64(end32) - np.float64(step) * (steps - 1 - i)
  return np.where(i < half, head, tail).astype(np.float32)


def create_dynamic_map(
    signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
) -> np.ndarray:
  """The dynamic-tree 8-bit map of bitsandbytes (optimizer states, nested absmax).

  Args:
    signed: signed map (127 negative, 0, 127 positive values and 1.0) or unsigned.
    max_exponent_bits: number of decades covered (``10**-(max_exponent_bits-1)`` to 1).
    total_bits: bits per code; the result always has 256 entries (zero padded).

  Returns:
    float32 array of shape ``(256,)``, sorted ascending.
  """
  if total_bits < 2 or total_bits > 8:
    raise ValueError(f"total_bits must be in 2..8, got {total_bits!r}")
  if max_exponent_bits < 1 or max_exponent_bits > total_bits - 1:
    raise ValueError(
        f"max_exponent_bits must be in 1..total_bits-1={total_bits - 1}, got {max_exponent_bits!r}"
    )
  data: list[float] = []
  non_sign_bits = total_bits - 1
  additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
  i = 0
  for i in range(max_exponent_bits):
    fraction_items = (
        2 ** (i + non_sign_bits - max_exponent_bits) + 1
        if signed
        else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
    )
    data += _decade_means(fraction_items, 10 ** (-(max_exponent_bits - 1) + i), signed)
  if additional_items > 0:
    data += _decade_means(additional_items + 1, 10 ** (-(max_exponent_bits - 1) + i), signed)
  data.append(0.0)
  data.append(1.0)
  data += [0.0] * (256 - len(data))
  data.sort()
  return np.array(data, dtype=np.float32)


def _decade_means(items: int, scale: float, signed: bool) -> list[float]:
  boundaries = _torch_linspace_f32(0.1, 1.0, items)
  means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
  pos = (np.float32(scale) * means).astype(np.float32)
  out = pos.tolist()
  if signed:
    out += (np.float32(-scale) * means).astype(np.float32).tolist()
  return out


def create_linear_map(signed: bool = True, total_bits: int = 8, add_zero: bool = True) -> np.ndarray:
  """A uniform map on [-1, 1] (signed) or [0, 1], zero padded in the middle to 256 entries.

  Returns:
    float32 array of shape ``(256,)``.
  """
  if total_bits < 1 or total_bits > 8:
    raise ValueError(f"total_bits must be in 1..8, got {total_bits!r}")
  sign = -1.0 if signed else 0.0
  total_values = 2**total_bits
  if add_zero or total_bits < 8:
    total_values = 2**total_bits if not signed else 2**total_bits - 1
  values = _torch_linspace_f32(sign, 1.0, total_values)
  gap = 256 - values.size
  if gap == 0:
    return values
  half = values.size // 2
  return np.concatenate([values[:half], np.zeros(gap, np.float32), values[half:]])


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> np.ndarray:
  """The NormalFloat map (NF4 when ``use_extra_value``), zero padded to 256 entries.

  Quantiles of the standard normal distribution, normalised to [-1, 1]; with
  ``use_extra_value`` there are 8 positive and 7 negative values and one zero.

  Returns:
    float32 array of shape ``(256,)``, sorted ascending.
  """
  if not 0.5 < offset < 1.0:
    raise ValueError(f"offset must lie in (0.5, 1), got {offset!r}")
  ppf = statistics.NormalDist().inv_cdf
  n_pos = 9 if use_extra_value else 8
  v1 = [ppf(float(p)) for p in _torch_linspace_f32(offset, 0.5, n_pos)[:-1]]
  v3 = [-ppf(float(p)) for p in _torch_linspace_f32(offset, 0.5, 8)[:-1]]
  v2 = [0.0] * (256 - len(v1) - len(v3))
  values = np.sort(np.array(v1 + v2 + v3, dtype=np.float32))
  return (values / values.max()).astype(np.float32)


@functools.cache
def dynamic_map(signed: bool = True) -> np.ndarray:
  """The default signed/unsigned dynamic 8-bit map (cached, read-only), shape ``(256,)``."""
  table = create_dynamic_map(signed=signed)
  table.setflags(write=False)
  return table


CODEBOOK_NAMES = ("nf4", "fp4", "dynamic", "dynamic_unsigned", "linear")


def get_codebook(name: str) -> np.ndarray:
  """Look a codebook up by name: one of :data:`CODEBOOK_NAMES`."""
  if name == "nf4":
    return NF4
  if name == "fp4":
    return FP4
  if name == "dynamic":
    return dynamic_map(True)
  if name == "dynamic_unsigned":
    return dynamic_map(False)
  if name == "linear":
    return create_linear_map()
  raise ValueError(f"codebook name must be one of {CODEBOOK_NAMES}, got {name!r}")
