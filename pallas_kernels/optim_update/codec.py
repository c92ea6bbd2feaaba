"""Arithmetic encoder/decoder for bitsandbytes' dynamic 8-bit maps, without table lookups.

The signed dynamic map holds 0, 1.0 and, for each decade ``i = 0..6``, ``n_i = 2**i`` values
``P_i * (0.1 + 0.9 * (j + 0.5) / n_i)`` (``P_i = 10**(i - 6)``, ``j < n_i``) and their
negatives; the unsigned map has ``n_i = 2**(i + 1)`` values per decade. Sorted, the codes of one
decade are consecutive, so a code index is ``base_i + j`` with ``base_i`` the index of the
decade's first code, and the codes of successive decades follow each other without gaps
(0.0 sits just below decade 0, 1.0 just above decade 6).

A gather from a 256-entry table costs several L1 wavefronts per warp on a GPU; a fused optimizer
update doing four of them per element (decode and encode of two states) is bound by them, not by
memory. These functions compute the same codes with a few dozen ALU operations and no gather:

* decode: ``i`` from the index with a count-leading-zeros, ``j`` by subtraction, then the
  formula. Values agree with the stored tables to within 2 ulp (the tables were built with
  ``torch.linspace`` rounding); dequantized states therefore differ from a table lookup by at
  most ``2**-22`` relative.
* encode: the decade from ``log10(|x|)``, the fractional position ``t`` inside the decade's
  uniform grid, then ``j = floor(t + 0.5)``; the nearest code lies in the neighbouring decade
  exactly when ``t < -0.3`` (midpoint to the previous decade's last code, the same for every
  decade but the first) or, in the top decade, ``t > n - 0.75`` (midpoint to 1.0). An
  inaccurate ``log10`` near a decade boundary is harmless: both candidate decades give the
  same index there. The result is the nearest code except within float rounding of a midpoint,
  where it may be the other neighbour (one code step).

Negative values use the mirrored index of ``|x|`` and never round to +0 (bitsandbytes' sign
guard: a tiny negative becomes the smallest negative code, so Lion's sign survives).

Everything here is ``jnp`` on int32/float32 that Pallas' Triton lowering accepts (no gather,
no ``round``, shifts on int32), and runs as well under XLA.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["decode", "encode", "ZERO_INDEX"]

_LOG10_2 = math.log10(2.0)
_LOG2_10 = math.log2(10.0)
# Index of 0.0 in each map.
ZERO_INDEX = {True: 127, False: 0}


def _pow10(k: jax.Array) -> jax.Array:
  """``10.0 ** k`` for an int32 ``k`` in [-6, 6] (float32, within 2 ulp)."""
  return jnp.exp2(k.astype(jnp.float32) * jnp.float32(_LOG2_10))


def _inv_pow2(i: jax.Array) -> jax.Array:
  """``2.0 ** -i`` for an int32 ``i`` in [0, 30], exactly, by building the float's bits."""
  return jax.lax.bitcast_convert_type((127 - i) << 23, jnp.float32)


def _clz(v: jax.Array) -> jax.Array:
  return jax.lax.clz(v)


def decode(q: jax.Array, signed: bool) -> jax.Array:
  """Values of codes ``q`` (uint8 or int32, any shape) of the dynamic map, float32."""
  k = q.astype(jnp.int32)
  if signed:
    # Positive codes 128..254 -> rank r = k - 127 (1..127); negatives mirror: r = 127 - k.
    r = jnp.where(k >= 127, k - 127, 127 - k)
    extra = 0
  else:
    r = k + 1  # codes 1..254 -> 2..255
    extra = 1
  r = jnp.maximum(r, 1)
  top = 31 - _clz(r)  # floor(log2(r)): the decade is top - extra
  i = top - extra
  j = r - (1 << top)
  inv_n = _inv_pow2(top)
  frac = jnp.float32(0.1) + jnp.float32(0.9) * (j.astype(jnp.float32) + 0.5) * inv_n
  value = _pow10(i - 6) * frac
  if signed:
    value = jnp.where(k == 127, 0.0, value)
    value = jnp.where(k == 255, 1.0, value)
    value = jnp.where(k < 127, -value, value)
  else:
    value = jnp.where(k == 0, 0.0, value)
    value = jnp.where(k == 255, 1.0, value)
  return value


def _log2_fast(y: jax.Array) -> jax.Array:
  """``log2(y)`` for ``y > 0`` within 0.008, from the float's exponent and a quadratic in the
  mantissa (no transcendental call)."""
  bits = jax.lax.bitcast_convert_type(y, jnp.int32)
  exponent = ((bits >> 23) & 0xFF) - 127
  m = jax.lax.bitcast_convert_type((bits & 0x7FFFFF) | 0x3F800000, jnp.float32) - 1.0
  return exponent.astype(jnp.float32) + m + jnp.float32(0.346607) * m * (1.0 - m)


def encode(x: jax.Array, signed: bool, fast_log: bool = False) -> jax.Array:
  """Nearest dynamic-map code (int32 in 0..255) of ``x`` already scaled to [-1, 1].

  ``x`` must be finite; callers scale by ``1 / absmax`` with all-zero blocks mapped to 0.
  With ``fast_log`` the decade comes from :func:`_log2_fast`: its error (< 0.0023 decades)
  only matters within 0.6% of a power of ten, where both candidate decades give the same code:
  the nearest code there is the last one of the lower decade (its midpoint to the next decade
  lies at least 1.4% above the power of ten, its midpoint to its own predecessor at least 0.7%
  below).
  """
  extra = 0 if signed else 1
  y = jnp.maximum(jnp.abs(x), jnp.float32(1e-12))
  log2 = _log2_fast(y) if fast_log else jnp.log2(y)
  l10 = log2 * jnp.float32(_LOG10_2)
  i = jnp.clip(jnp.floor(l10).astype(jnp.int32) + 7, 0, 6)
  n_log2 = i + extra
  n = (1 << n_log2).astype(jnp.float32)
  t = (y * _pow10(6 - i) - jnp.float32(0.1)) * (n * jnp.float32(1.0 / 0.9)) - 0.5
  # First index of decade i: signed 128 + 2**i - 1, unsigned 1 + 2**(i+1) - 2.
  base = (1 << n_log2) + (127 if signed else -1)
  # Below the midpoint to the previous code (t = -0.3 in every decade but the first, where the
  # previous code is 0.0) the nearest code is the one before the decade: j = -1.
  thr = jnp.where(i == 0, jnp.float32(_low0(signed)), jnp.float32(-0.3))
  j = jnp.floor(jnp.maximum(t, -1.0) + 0.5).astype(jnp.int32)
  j = jnp.where(t < thr, -1, j)
  cap = (1 << n_log2) - 1
  over_top = (i == 6) & (t > n - 0.75)
  j = jnp.where(over_top, cap + 1, jnp.minimum(j, cap))
  idx = base + j
  if signed:
    neg = jnp.clip(254 - idx, 0, 126)
    idx = jnp.where(x < 0, neg, idx)
  return idx


def _low0(signed: bool) -> float:
  """``t`` of the midpoint between 0.0 and the first code of decade 0."""
  n = 1 if signed else 2
  first = 1e-6 * (0.1 + 0.45 / n)
  t_mid = ((first / 2) * 1e6 - 0.1) * (n / 0.9) - 0.5
  return float(np.float32(t_mid))


# -- segment-table encoder ---------------------------------------------------------------------
#
# The positive half of a map splits into segments: [0, M_0) -> 0.0, [M_i, M_i+1) -> decade i
# (i = 0..6), [M_7, inf) -> 1.0, where M_i are the midpoints between neighbouring decades. In
# segment s the nearest code is ``min(trunc(y * A[s] + C[s]), H[s])``. A power-of-two octave
# of y meets at most two segments, so the segment is ``LO[o] + (y >= S[o])`` for the octave
# ``o`` read from the float's exponent bits. Every table has 32 float32 entries (one 128-byte
# line): a lookup costs about as much as a coalesced load, unlike a gather into a 256-entry map.

_OCTAVE_BIAS = 24  # octave 0 holds y in [2**-24, 2**-23) (and everything smaller)
N_TABLE = 32


def _positive_codes(signed: bool) -> tuple[np.ndarray, int, list[tuple[int, int]]]:
  """Codes (float64) of the non-negative half by index, the index of 0.0, and per decade
  ``(first index, count)``."""
  extra = 0 if signed else 1
  zero = ZERO_INDEX[signed]
  values = np.zeros(256)
  decades = []
  for i in range(7):
    n = 1 << (i + extra)
    base = (1 << (i + extra)) + (127 if signed else -1)
    j = np.arange(n)
    values[base:base + n] = np.float32(10.0 ** (i - 6)) * np.float32(0.1 + 0.9 * (j + 0.5) / n)
    decades.append((base, n))
  values[255] = 1.0
  return values, zero, decades


def encode_tables(signed: bool) -> dict[str, np.ndarray]:
  """``LO, S`` (per octave) and ``A, C, H`` (per segment) as float32 ``(32,)`` arrays."""
  values, zero, decades = _positive_codes(signed)
  # Segment 0 is 0.0, 1..7 the decades, 8 is 1.0; starts[s] is where segment s begins.
  starts = [0.0]
  a, c, h = [0.0], [zero + 0.5], [float(zero)]
  prev_last = 0.0
  for i, (base, n) in enumerate(decades):
    starts.append((prev_last + values[base]) / 2)
    a.append(10.0 ** (6 - i) * n / 0.9)
    c.append(base - 0.1 * n / 0.9)
    h.append(float(base + n - 1))
    prev_last = values[base + n - 1]
  starts.append((prev_last + 1.0) / 2)
  a.append(0.0)
  c.append(255.5)
  h.append(255.0)
  lo = np.zeros(N_TABLE)
  split = np.full(N_TABLE, np.inf)
  for o in range(N_TABLE):
    low, high = 2.0 ** (o - _OCTAVE_BIAS), 2.0 ** (o - _OCTAVE_BIAS + 1)
    seg = 0 if o == 0 else max(s for s in range(len(starts)) if starts[s] <= low)
    inside = [s for s in range(len(starts)) if low < starts[s] < high]
    if len(inside) > 1:
      raise AssertionError(f"octave {o} meets more than two segments")
    lo[o] = seg
    if inside:
      split[o] = np.float32(starts[inside[0]])
  pad = lambda v: np.pad(np.asarray(v, np.float64), (0, N_TABLE - len(v)))  # noqa: E731
  f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
  split = np.where(np.isinf(split), np.float32(3e38), split)
  return {"LO": f32(lo), "S": f32(split), "A": f32(pad(a)), "C": f32(pad(c)), "H": f32(pad(h))}


TABLE_NAMES = ("LO", "S", "A", "C", "H")


def encode_segments(x: jax.Array, signed: bool, lookup) -> jax.Array:
  """:func:`encode` by segment tables. ``lookup(name, index)`` reads table ``name`` (see
  :func:`encode_tables`) at an int32 index array: ``tables[name][index]`` under XLA, a ref
  read inside a kernel."""
  y = jnp.abs(x)
  bits = jax.lax.bitcast_convert_type(y, jnp.int32)
  octave = jnp.clip(((bits >> 23) & 0xFF) - (127 - _OCTAVE_BIAS), 0, N_TABLE - 1)
  seg = lookup("LO", octave) + jnp.where(y >= lookup("S", octave), 1.0, 0.0)
  seg = seg.astype(jnp.int32)
  pos = jnp.minimum(y * lookup("A", seg) + lookup("C", seg), lookup("H", seg))
  idx = pos.astype(jnp.int32)
  if signed:
    idx = jnp.where(x < 0, jnp.clip(254 - idx, 0, 126), idx)
  return idx


def decode_tables(signed: bool) -> dict[str, np.ndarray]:
  """Per power of two ``top`` of the code's rank: the value of its first code ``A`` and the
  step ``B`` between codes (float32 ``(32,)``), for :func:`decode_segments`."""
  extra = 0 if signed else 1
  a = np.zeros(N_TABLE)
  b = np.zeros(N_TABLE)
  for top in range(extra, 7 + extra):
    i, n = top - extra, 1 << top
    p10 = np.float32(10.0 ** (i - 6))
    a[top], b[top] = p10 * (0.1 + 0.45 / n), p10 * 0.9 / n
  a[7 + extra] = 1.0  # the code 1.0 (rank 128 signed, 256 unsigned)
  return {"DA": a.astype(np.float32), "DB": b.astype(np.float32)}


DECODE_TABLE_NAMES = ("DA", "DB")


def decode_segments(q: jax.Array, signed: bool, lookup) -> jax.Array:
  """:func:`decode` with two lookups into 32-entry tables (see :func:`decode_tables`)."""
  k = q.astype(jnp.int32)
  if signed:
    r = jnp.where(k >= 127, k - 127, 127 - k)
  else:
    r = k + 1
  top = 31 - jax.lax.clz(jnp.maximum(r, 1))
  j = (r - (1 << top)).astype(jnp.float32)
  value = lookup("DA", top) + lookup("DB", top) * j
  if signed:
    value = jnp.where(k == 127, 0.0, value)
    value = jnp.where(k < 127, -value, value)
  else:
    value = jnp.where(k == 0, 0.0, value)
  return value
