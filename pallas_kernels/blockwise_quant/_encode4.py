"""In-kernel 4-bit encoders: scaled float32 values → NF4 / FP4 codes, exactly as ``reference.py``.

Three encoders give the same bytes:

* ``compare``: one comparison per decision threshold (15 for NF4, 7 on ``|s|`` for FP4), the
  reference's own formula; exact for every input including ``±inf`` and NaN.
* ``table``: a bin lookup. ``b(v) = round_half_even(16 * v)`` is computed with one float add of
  a magic constant (``16 * v`` is exact, so fused or not the result is the same), and is
  monotone in ``v``. For a threshold ``t``, ``b(s) > b(t)`` implies ``s > t`` and
  ``b(s) < b(t)`` implies ``s < t``; only when ``b(s) == b(t)`` must ``s`` be compared with
  ``t``. Bins are 1/16 wide and the thresholds at least 0.08 apart, so a bin holds at most one
  threshold: two small tables give, per bin, that threshold (float32, or +inf) and the codes
  below and above it (one byte); they span 33 entries, a cache line or two, so a gather of a
  warp is one or two L1 wavefronts. Two gathers and one comparison replace fifteen
  comparisons. Valid while
  ``|s| <= 1.01`` and ``s`` is not NaN, which holds whenever the block's absmax is a finite normal
  float32 (the kernels fall back to ``compare`` for a program where it is not).
* ``poly``: one lookup instead of two. A polynomial ``p`` (cubic in ``s`` for NF4, quadratic
  in ``|s|`` for FP4, Horner form, the rounding folded into the last step by the same magic
  constant) gives ``b = round(p(s))``, which is the code of ``s`` or one less; one lookup of the
  threshold ``t_b`` and ``b + (s > t_b)`` is the code. ``b`` may be either neighbour as long as
  ``t_{b-1} < s <= t_{b+1}``, so ``p`` only has to keep every threshold inside its own unit
  bin: its coefficients come from a linear program maximizing that margin, and over *every*
  float32 ``|s| <= 1.0001`` the exact ``p(s)`` stays 0.034 (NF4) / 0.37 (FP4) of a bin away
  from a wrong bin, far above any float32 rounding of the evaluation (fused or not). Valid
  under the same condition as ``table`` (a finite normal absmax gives ``|s| <= 1 + 2**-22``);
  with the polynomial's input clamped to [-1, 1] (NaN sent to -1, two PTX ``max``/``min`` on
  the GPU) it is valid for every input and needs no per-program check (the kernels' default).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.blockwise_quant import reference

__all__ = ["encode_compare", "encode_table", "encode_poly", "poly_bin", "clamp_select",
           "encoder_tables", "poly_table", "pad_code", "TABLE_SIZE", "POLY_TABLE_SIZE"]

TABLE_SIZE = 64
_SCALE = np.float32(16.0)
# 1.5 * 2**23 + 16: adding it rounds to an integer and puts b(v) + 16 in the low mantissa bits.
_MAGIC = np.float32(12582912.0 + 16.0)
# poly encoder: (coefficients of s, s**2, ...; the constant term, an integer). Found by a linear
# program (maximize the distance of p to a wrong bin) and checked over every float32 in
# [-1.0001, 1.0001]: the margin is 0.0344 bin for NF4 and 0.367 bin for FP4.
_POLY = {
    "nf4": ((np.float32(11.727485), np.float32(-0.44033533), np.float32(-4.7524505)), 7),
    "fp4": ((np.float32(11.2), np.float32(-4.6079993)), 0),
}
POLY_TABLE_SIZE = 16


def _thresholds(quant_type: str) -> np.ndarray:
  if quant_type == "nf4":
    return np.array(reference.NF4_THRESHOLDS, np.float32)
  if quant_type == "fp4":
    return np.array(reference.FP4_THRESHOLDS, np.float32)
  raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def _bin_numpy(v: np.ndarray) -> np.ndarray:
  """Host twin of the in-kernel bin index (same float32 operations)."""
  y = (v.astype(np.float32) * _SCALE).astype(np.float32) + _MAGIC
  return y.astype(np.float32).view(np.int32) & (TABLE_SIZE - 1)


def _fp4_code_of_rank(rank):
  """bitsandbytes' FP4 magnitude code of a rank 0..7: ``(0,1,6,7,4,5,2,3)[rank]``."""
  return rank ^ ((rank & 2) << 1)


@functools.cache
def encoder_tables(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
  """``(threshold float32 (64,), codes uint8 (64,))`` of the ``table`` encoder.

  NF4 bins are of ``s`` and ``codes[j]`` is the code of a value in bin ``j`` at or below the
  bin's threshold (above it, one more). FP4 bins are of ``|s|`` and ``codes[j] = low | high
  << 4``, the magnitude codes at or below and above the threshold (the sign is added after).
  """
  thresholds = _thresholds(quant_type)
  bins = _bin_numpy(thresholds)
  if len(set(bins.tolist())) != len(bins):
    raise AssertionError(f"two {quant_type} thresholds share a bin: {bins}")
  # Bin index → signed bin b: indices are b + 16 for b in [-16, 16].
  signed = np.arange(TABLE_SIZE) - 16
  threshold_bin = bins.astype(np.int64) - 16
  thr = np.full(TABLE_SIZE, np.inf, np.float32)
  codes = np.zeros(TABLE_SIZE, np.uint8)
  for j in range(TABLE_SIZE):
    below = int(np.sum(threshold_bin < signed[j]))
    inside = np.flatnonzero(threshold_bin == signed[j])
    low, high = below, below + len(inside)
    if len(inside):
      thr[j] = thresholds[inside[0]]
    if quant_type == "fp4":
      codes[j] = _fp4_code_of_rank(low) | (_fp4_code_of_rank(high) << 4)
    else:
      codes[j] = low  # the code above the threshold is low + 1
  thr.setflags(write=False)
  codes.setflags(write=False)
  return thr, codes


@functools.cache
def pad_code(quant_type: str) -> int:
  """Code of 0.0: bitsandbytes pads an odd-length tail's last nibble with it."""
  rank = int(np.sum(np.float32(0.0) > _thresholds(quant_type)))
  return rank if quant_type == "nf4" else _fp4_code_of_rank(rank)


@functools.cache
def poly_table(quant_type: str) -> np.ndarray:
  """Thresholds of the ``poly`` encoder, float32 ``(16,)``: ``t_b`` at index ``b``, ``+inf``
  past the last threshold."""
  thresholds = _thresholds(quant_type)
  thr = np.full(POLY_TABLE_SIZE, np.inf, np.float32)
  thr[:thresholds.size] = thresholds
  thr.setflags(write=False)
  return thr


def poly_bin(key, quant_type: str, xp=jnp):
  """``round(p(key))`` of the ``poly`` encoder, int32, with ``xp`` = ``jnp`` (kernels) or
  ``np`` (host checks); ``key`` is ``s`` (NF4) or ``|s|`` (FP4), float32."""
  coefs, constant = _POLY[quant_type]
  acc = key * coefs[-1] + coefs[-2]
  for c in reversed(coefs[:-2]):
    acc = acc * key + c
  y = acc * key + np.float32(12582912.0 + constant)
  bits = (jax.lax.bitcast_convert_type(y, jnp.int32) if xp is jnp
          else np.asarray(y, np.float32).view(np.int32))
  return bits & (POLY_TABLE_SIZE - 1 if quant_type == "nf4" else 7)


def encode_poly(s: jax.Array, thr_ref, quant_type: str, clamp: Callable | None = None
                ) -> jax.Array:
  """int32 codes of float32 ``s`` by the ``poly`` encoder (``thr_ref``: :func:`poly_table`).

  Without ``clamp`` only for ``|s| <= 1.0001`` and no NaN (see the module docstring). With
  ``clamp(key, low)`` (``_common.clamp_unit`` or :func:`clamp_select`: ``key`` clamped to
  [``low``, 1], NaN sent to ``low``) valid for every float32: the polynomial reads the clamped
  value, the comparison ``s`` itself; past ±1 the code is the extreme one, which the bin of ±1
  gives, and a NaN compares false with the low bin's threshold, so it gets the code of "no
  threshold below", as the reference's count does."""
  key = s if quant_type == "nf4" else jnp.abs(s)
  low = -1.0 if quant_type == "nf4" else 0.0
  b = poly_bin(key if clamp is None else clamp(key, low), quant_type)
  rank = b + (key > thr_ref[b]).astype(jnp.int32)
  if quant_type == "nf4":
    return rank
  return _fp4_code_of_rank(rank) | jnp.where(s < 0, 8, 0)


def clamp_select(key: jax.Array, low: float) -> jax.Array:
  """``key`` clamped to [``low``, 1] by two selects, NaN → ``low`` (any backend)."""
  return jnp.where(key > low, jnp.where(key < 1.0, key, 1.0), jnp.float32(low))


def encode_compare(s: jax.Array, quant_type: str) -> jax.Array:
  """int32 codes of float32 ``s`` (any shape) by one comparison per threshold."""
  thresholds = _thresholds(quant_type)
  if quant_type == "nf4":
    code = jnp.zeros(s.shape, jnp.int32)
    for t in thresholds:
      code = code + (s > t).astype(jnp.int32)
    return code
  mag = jnp.abs(s)
  rank = jnp.zeros(s.shape, jnp.int32)
  for t in thresholds:
    rank = rank + (mag > t).astype(jnp.int32)
  return _fp4_code_of_rank(rank) | jnp.where(s < 0, 8, 0)


def encode_table(s: jax.Array, thr_ref, codes_ref, quant_type: str) -> jax.Array:
  """int32 codes of float32 ``s`` by bin lookup in :func:`encoder_tables` (given as refs).

  Only for ``|s| <= 1.01`` and no NaN (see the module docstring)."""
  key = s if quant_type == "nf4" else jnp.abs(s)
  y = key * _SCALE + _MAGIC
  idx = jax.lax.bitcast_convert_type(y, jnp.int32) & (TABLE_SIZE - 1)
  thr = thr_ref[idx]
  codes = codes_ref[idx].astype(jnp.int32)
  if quant_type == "nf4":
    return codes + (key > thr).astype(jnp.int32)
  return ((codes >> jnp.where(key > thr, 4, 0)) & 15) | jnp.where(s < 0, 8, 0)
