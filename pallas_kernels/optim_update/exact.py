"""Exact nearest-code encoder for bitsandbytes' dynamic 8-bit maps, without a search.

bitsandbytes (and ``blockwise_quant.reference.encode_8bit``) quantizes a scaled value ``x`` by a
binary search over the sorted 256-entry map followed by a comparison with the float32 midpoints
``fl((code[b - 1] + code[b]) * 0.5)``. The result is the number of midpoints below ``x``, a value
exactly on a midpoint taking the even one of its two codes; NaN gives 0. Optimizer states add
bitsandbytes' sign guard: with the signed map a negative value never takes the code of +0.

This module computes the same byte arithmetically, in two steps:

1. **Candidate.** The non-negative half of a map is a sequence of segments -- 0.0, seven
   decades with ``n_i`` uniformly spaced codes each, 1.0 -- and inside the decade segment ``i``
   the coordinate ``u = y * A_i + C_i`` puts code ``base_i + j`` at ``u = base_i + j + 0.5`` and
   the midpoints at the integers, so ``floor(u)`` *is* the code index. The float32 exponent of
   ``y = |x|`` selects an octave; an octave meets at most two segments, split at ``S[o]`` (the
   midpoint between them, from the formula). Four lookups into tables of 32 and 64 entries
   (``tables()``: ``S`` per octave, ``A, C, H`` per octave and side) and one multiply-add give
   ``u``;
   ``floor`` is a float add with the ``1.5 * 2**23`` magic constant (no float-to-int conversion).
2. **Exact tie-break.** The formula's codes differ from the stored map by a few ulp, so a value
   within ``DELTA`` (in units of one code step) of a midpoint, or within ``2**-16`` (relative)
   of a segment split, is decided against the map's own midpoint ``(code[b-1] + code[b]) * 0.5``
   with the reference's rule. Those are the only lanes that read the map (a masked gather, see
   ``midpoint``); everywhere else the candidate is already the reference's byte.

Negative values use the mirrored index of ``|x|`` (the signed map is symmetric but for 1.0),
clamped below the code of 0.0. The formula lands within ``1.3e-5`` code steps of the map's
midpoints and ``1.1e-7`` (relative) of its splits, far inside both bands. The tests check byte
equality with the binary search on every midpoint and its float32 neighbours, every code,
segment splits, powers of two and ten, zeros, subnormals, infinities, NaN and random values.

:func:`encode_fixed` computes the same bytes with half the instructions (for kernels bound by
instruction issue): the tables are indexed by the biased exponent itself (no clip), the constant
``C`` carries ``+256`` so that ``t = y * A + C`` lies in ``[256, 512)``, where a float32 has 15
fraction bits: ``t``'s bits give ``floor(u)`` with one shift and the distance of ``u`` to the
nearest midpoint with one mask (band ``DELTA_FIXED``); segments split at the maps' own
midpoints (``SPLIT_MIDPOINTS``), so no value is near a split; and the tie-break runs through a
``tie_break`` callback that a kernel can skip for tiles holding no value near a midpoint. On
every float32 in ``[0, 1]`` the candidate outside the band is the binary search's code (wrong
candidates lie within ``0.52 * 2**-15`` of a midpoint; the band is ``4 * 2**-15``).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["tables", "encode", "fixed_tables", "encode_fixed", "TABLE_NAMES", "DELTA",
           "DELTA_FIXED", "SPLIT_TOL"]

TABLE_NAMES = ("S", "A", "C", "H")
DELTA = 2.0**-11  # half-width, in code steps, of the band around a midpoint decided exactly
SPLIT_TOL = 2.0**-16  # relative half-width of the band around a segment split
_MAGIC = 12582912.0  # 1.5 * 2**23: x + _MAGIC rounds x (|x| < 2**22) to an integer
_MAGIC_BITS = 0x4B400000
_NO_SPLIT = -1.0  # S of an octave inside one segment: every y >= 0 is "above" it
# Octave o = clip(exponent - _OCTAVE_BIAS, 0, 31) covers [2**(o - 24), 2**(o - 23)); octave 0
# also holds everything smaller (all below the first code's midpoint with 0.0), octaves from 24
# on everything >= 1 (above the last midpoint, code 1.0), inf and NaN included.
_OCTAVE_BIAS = 103
N_OCTAVES = 32
# encode_fixed: t = u + 256 in [256, 512), 15 fraction bits; its bits >> 15 are
# _T_BITS_HIGH + floor(u).
_T_OFFSET = 256.0
_FRACTION_BITS = 15
_T_BITS_HIGH = 0x43800000 >> _FRACTION_BITS
DELTA_FIXED = 2.0**-13  # > 4x the error of t (formula 2**-16.2, C 2**-16, y * A + C 2**-16)
_NEAR_UNITS = int(DELTA_FIXED * 2**_FRACTION_BITS)
# The maps' own float32 midpoints at the segment splits, fl((code[k] + code[k + 1]) * 0.5) of
# bitsandbytes' dynamic maps, as (k, bits): encode_fixed splits segments exactly there (the
# tests check them against jaxquant.codebooks.dynamic_map).
SPLIT_MIDPOINTS = {
    True: ((127, 0x3493A3B7), (128, 0x35FF0382), (130, 0x37734506), (134, 0x39007358),
           (142, 0x3A91D14E), (158, 0x3C2D0E56), (190, 0x3DD28F5C), (254, 0x3F7F199A)),
    False: ((0, 0x342E7BAA), (2, 0x35C29D9E), (6, 0x374D8558), (14, 0x38E94EE4),
            (30, 0x3A8A71DE), (62, 0x3C2872B0), (126, 0x3DCFAE14), (254, 0x3F7F8CCD)),
}


def _segments(signed: bool) -> list[tuple[float, float, float, float]]:
  """Per segment of the non-negative half: ``(start, A, C, H)`` with float64 values."""
  extra = 0 if signed else 1
  zero = 127 if signed else 0
  segs = [(0.0, 0.0, zero + 0.25, zero + 0.25)]
  prev_last = 0.0
  for i in range(7):
    n = 1 << (i + extra)
    base = n + (127 if signed else -1)
    p = 10.0 ** (i - 6)
    first, last = p * (0.1 + 0.45 / n), p * (1.0 - 0.45 / n)
    segs.append(((prev_last + first) / 2, n / (0.9 * p), base - n / 9, base + n - 0.75))
    prev_last = last
  # A tiny (not 0) so that y = inf gives u = inf, clamped to H, instead of inf * 0 = NaN.
  segs.append(((prev_last + 1.0) / 2, 2.0**-100, 255.25, 255.3))
  return segs


@functools.cache
def tables(signed: bool) -> dict[str, np.ndarray]:
  """float32 tables of the encoder: ``S (32,)`` per octave, ``A, C, H (64,)`` at
  ``2 * octave + (y > S)`` (a 128-byte line and two)."""
  split, coef = _coefficients(signed)
  f32 = lambda v: np.ascontiguousarray(v, np.float32)  # noqa: E731
  return {"S": f32(split), "A": f32(coef[0]), "C": f32(coef[1]), "H": f32(coef[2])}


@functools.cache
def fixed_tables(signed: bool) -> dict[str, np.ndarray]:
  """float32 tables of :func:`encode_fixed`: ``S (256,)`` at the biased exponent ``E`` of
  ``y``, ``A, C, H (512,)`` at ``2 * E + (y > S)``; ``C`` and ``H`` carry ``+256``. Only the
  entries of exponents 103..127 (values 2**-24..1) are read in practice: the same few lines
  as :func:`tables`. ``S`` holds the maps' own split midpoints, lowered by one ulp where the
  tie goes up (to the even code ``k + 1``), so ``y > S`` is the reference's decision."""
  split, coef = _coefficients(signed)
  exact_split = split.astype(np.float32)
  for k, bits in SPLIT_MIDPOINTS[signed]:
    mid = np.array([bits], np.uint32).view(np.float32)[0]
    octave = int(np.argmin(np.abs(split - float(mid))))
    if abs(split[octave] - float(mid)) > float(mid) * SPLIT_TOL:
      raise AssertionError(f"split midpoint {mid!r} is not a segment split of the formula")
    exact_split[octave] = np.nextafter(mid, np.float32(0)) if k % 2 else mid
  octave = np.clip(np.arange(256) - _OCTAVE_BIAS, 0, N_OCTAVES - 1)
  rows = (2 * octave[:, None] + np.arange(2)).reshape(-1)
  f32 = lambda v: np.ascontiguousarray(v, np.float32)  # noqa: E731
  return {"S": f32(exact_split[octave]), "A": f32(coef[0][rows]),
          "C": f32(coef[1][rows] + _T_OFFSET), "H": f32(coef[2][rows] + _T_OFFSET)}


def _coefficients(signed: bool) -> tuple[np.ndarray, np.ndarray]:
  """float64 ``S (32,)`` and ``A, C, H`` as ``(3, 64)``, see :func:`tables`."""
  segs = _segments(signed)
  starts = [s[0] for s in segs]
  split = np.full(N_OCTAVES, _NO_SPLIT)
  coef = np.zeros((3, 2 * N_OCTAVES))
  for e in range(N_OCTAVES):
    low = 0.0 if e == 0 else 2.0 ** (e - 24)
    high = 2.0 ** (e - 23) if e < N_OCTAVES - 1 else np.inf
    seg = max(k for k, s in enumerate(starts) if s <= low)
    inside = [k for k, s in enumerate(starts) if low < s < high]
    if len(inside) > 1:
      raise AssertionError(f"octave {e} meets more than two segments")
    upper = inside[0] if inside else seg
    if inside:
      split[e] = starts[upper]
    coef[:, 2 * e] = segs[seg][1:]
    coef[:, 2 * e + 1] = segs[upper][1:]
  return split, coef


Lookup = Callable[[str, jax.Array], jax.Array]
Midpoint = Callable[[jax.Array, jax.Array], jax.Array]


def encode(x: jax.Array, signed: bool, lookup: Lookup, midpoint: Midpoint) -> jax.Array:
  """The reference's code (int32 in 0..255) of ``x`` (float32, any shape).

  Args:
    x: values scaled to the map's range (any float32, including inf and NaN).
    signed: signed map (with the sign guard) or unsigned.
    lookup: ``lookup(name, index)`` reads table ``name`` of :func:`tables` at an int32 array.
    midpoint: ``midpoint(b, mask)`` returns ``(code[b - 1] + code[b]) * 0.5`` in float32
      where ``mask`` holds (``b`` in 1..255), anything elsewhere: a masked gather from the map
      inside a kernel, a plain one under XLA.
  """
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  y_bits = bits & 0x7FFFFFFF
  y = jax.lax.bitcast_convert_type(y_bits, jnp.float32)
  e = jnp.clip((y_bits >> 23) - _OCTAVE_BIAS, 0, N_OCTAVES - 1)
  split = lookup("S", e)
  above = y > split
  s = e * 2 + above.astype(jnp.int32)
  h = lookup("H", s)
  u = jnp.minimum(y * lookup("A", s) + lookup("C", s), h)
  t = u + jnp.float32(_MAGIC)
  rounded = t - jnp.float32(_MAGIC)
  b = jax.lax.bitcast_convert_type(t, jnp.int32) - _MAGIC_BITS
  idx = b - (u < rounded).astype(jnp.int32)
  near = (jnp.abs(u - rounded) < jnp.float32(DELTA)) | _near_split(y, split)
  # Clamped below a split, u sits at H = (next segment's base) - 0.75: the midpoint is one up.
  b = jnp.clip(b + (u >= h).astype(jnp.int32), 1, 255)
  idx = _decide_ties(y, b, near, idx, midpoint)
  return _apply_sign(idx, bits, y_bits, signed)


TieBreak = Callable[[jax.Array, Callable[[], jax.Array], jax.Array], jax.Array]


def encode_fixed(x: jax.Array, signed: bool, lookup: Lookup, midpoint: Midpoint,
                 tie_break: TieBreak) -> jax.Array:
  """:func:`encode`'s result (int32 in 0..255) with the fixed-point candidate (module doc).

  Args:
    x, signed, midpoint: as :func:`encode`.
    lookup: ``lookup(name, index)`` reads table ``name`` of :func:`fixed_tables`.
    tie_break: ``tie_break(near, exact, candidate)`` returns ``exact()`` (the candidate with
      every ``near`` lane decided against the map) or, where no lane is ``near``, may return
      ``candidate`` without calling ``exact``.
  """
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  y_bits = bits & 0x7FFFFFFF
  y = jax.lax.bitcast_convert_type(y_bits, jnp.float32)
  e = y_bits >> 23
  split = lookup("S", e)
  s = e * 2 + (y > split).astype(jnp.int32)
  h = lookup("H", s)
  t = jnp.minimum(y * lookup("A", s) + lookup("C", s), h)
  t_bits = jax.lax.bitcast_convert_type(t, jnp.int32)
  idx = (t_bits >> _FRACTION_BITS) - _T_BITS_HIGH
  fraction_mask = (1 << _FRACTION_BITS) - 1
  # The split is exact (fixed_tables), and a clamped t sits at a quarter: only midpoints
  # inside a segment can be near.
  near = ((t_bits + _NEAR_UNITS) & fraction_mask) < 2 * _NEAR_UNITS

  def exact():
    b = ((t_bits + (1 << (_FRACTION_BITS - 1))) >> _FRACTION_BITS) - _T_BITS_HIGH  # round(u)
    return _decide_ties(y, jnp.clip(b, 1, 255), near, idx, midpoint)

  return _apply_sign(tie_break(near, exact, idx), bits, y_bits, signed)


def _near_split(y: jax.Array, split: jax.Array) -> jax.Array:
  return jnp.abs(y - split) <= split * jnp.float32(SPLIT_TOL)


def _decide_ties(y, b, near, idx, midpoint: Midpoint) -> jax.Array:
  """``idx`` with each ``near`` lane replaced by the reference's choice between codes
  ``b - 1`` and ``b``: below their float32 midpoint, or on it with ``b`` odd, takes ``b - 1``."""
  mid = midpoint(b, near)
  below = (y < mid) | ((y == mid) & ((b & 1) == 1))
  return jnp.where(near, b - below.astype(jnp.int32), idx)


def _apply_sign(idx, bits, y_bits, signed: bool) -> jax.Array:
  """The code of ``x`` from the index ``idx`` of ``|x|``. Signs and NaN come from the bits
  (IEEE semantics whatever the platform's subnormal mode): -0.0 is not negative, a negative
  subnormal is; NaN takes code 0."""
  negative = (bits < 0) & (y_bits != 0)
  if signed:
    idx = jnp.where(negative, jnp.maximum(254 - jnp.maximum(idx, 128), 0), idx)
  else:
    idx = jnp.where(negative, 0, idx)
  return jnp.where(y_bits > 0x7F800000, 0, idx)


def _xla_callbacks(code: jax.Array, tabs: dict[str, np.ndarray]) -> tuple[Lookup, Midpoint]:
  """``(lookup, midpoint)`` as XLA gathers from the constant tables and from ``code``."""
  consts = {k: jnp.asarray(v) for k, v in tabs.items()}
  code = code.astype(jnp.float32)

  def midpoint(b, mask):
    del mask
    return (code[b - 1] + code[b]) * jnp.float32(0.5)

  return (lambda name, i: consts[name][i]), midpoint


def xla_encode(x: jax.Array, code: jax.Array, signed: bool) -> jax.Array:
  """:func:`encode` with XLA gathers (tables as constants, midpoints from ``code``)."""
  return encode(x, signed, *_xla_callbacks(code, tables(signed)))


def xla_encode_fixed(x: jax.Array, code: jax.Array, signed: bool) -> jax.Array:
  """:func:`encode_fixed` with XLA gathers (every lane decided, no branch)."""
  return encode_fixed(x, signed, *_xla_callbacks(code, fixed_tables(signed)),
                      lambda near, exact, candidate: exact())
