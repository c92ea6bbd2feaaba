"""The fused 8-bit optimizer kernel against its reference (``pallas_kernels.optim_update``).

On CPU the kernel runs in Pallas interpret mode; ``@pytest.mark.gpu`` tests compile it with
Triton. The oracle is ``reference.update_8bit`` (table lookups and bitsandbytes' binary-search
quantizer). The kernel's encoder (``exact.py``) gives the search's byte for every float32, which
the encoder tests check on edge values and the strict kernel tests check end to end (states
computed without rounding choices). In general the two programs may round the state math
differently (a fused multiply-add in one, not in the other), so a new state can differ by an
ulp; its code then differs by at most one step and only at a tie, which ``_compare`` checks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import codebooks
from pallas_kernels.blockwise_quant.reference import encode_8bit
from pallas_kernels.optim_update import api, exact, families, kernel, reference

SIGNED = jnp.asarray(codebooks.dynamic_map(True))
UNSIGNED = jnp.asarray(codebooks.dynamic_map(False))

# (family, flags, hyperparameters besides lr/wd/gscale)
_ADAM = dict(b1=0.9, b2=0.999, omb1=0.1, omb2=0.001, eps=1e-8, eps_root=0.0,
             c1=1 / (1 - 0.9**3), c2=1 / (1 - 0.999**3), c1_next=1 / (1 - 0.9**4))
CASES = {
    "adam": ((), _ADAM),
    "adam_nesterov": ((("nesterov", True),), _ADAM),
    "lion": ((), dict(b1=0.9, b2=0.99, omb1=0.1, omb2=0.01)),
    "momentum": ((("nesterov", True),), dict(beta=0.9)),
    "ademamix": ((), dict(b1=0.9, b2=0.999, b3=0.9999, omb1=0.1, omb2=0.001, omb3=1e-4,
                          alpha=5.0, eps=1e-8, eps_root=0.0, c1=1 / (1 - 0.9**3),
                          c2=1 / (1 - 0.999**3))),
    "rmsprop": ((("eps_in_sqrt", False),), dict(decay=0.9, omdecay=0.1, eps=1e-8, c=1.0)),
    "adagrad": ((), dict(eps=1e-7)),
}


def _family(case: str) -> str:
  return case.split("_")[0]


def _hparams(case: str, lr=1e-3, wd=1e-2, gscale=0.7) -> jax.Array:
  fam = families.FAMILIES[_family(case)]
  hp = np.zeros(families.HP_SIZE, np.float32)
  for name, value in dict(lr=lr, wd=wd, gscale=gscale, **CASES[case][1]).items():
    hp[families.hparam_index(fam, name)] = value
  return jnp.asarray(hp)


def _inputs(case: str, n_blocks: int, dtype=jnp.float32, seed: int = 0):
  """Gradient, parameter and quantized states that look like a few steps into training."""
  fam = families.FAMILIES[_family(case)]
  rng = np.random.default_rng(seed)
  g = rng.normal(0, 1e-2, (n_blocks, 256)).astype(np.float32)
  g[0, :5] = 0.0  # exact zeros
  p = rng.normal(0, 0.05, (n_blocks, 256)).astype(np.float32)
  codes, absmax, maps = [], [], []
  for k, signed in enumerate(fam.signed):
    scale = np.exp(rng.normal(0, 2, (n_blocks, 1))) * 1e-3
    if signed:
      s = rng.normal(0, 1, (n_blocks, 256)) * scale
    else:
      s = rng.random((n_blocks, 256)) ** 4 * scale
    if k == 0:
      s[1] = 0.0  # an all-zero block
    table = SIGNED if signed else UNSIGNED
    q, a = reference.quantize_state(jnp.asarray(s, jnp.float32), table, signed)
    codes.append(q)
    absmax.append(a)
    maps.append(table)
  return (jnp.asarray(g, dtype), jnp.asarray(p, dtype), tuple(codes), tuple(absmax), tuple(maps))


def _exact_states(case, g, codes, absmax, maps, hp):
  """The new states in float32 before re-quantization (the reference's decode and math)."""
  fam = families.FAMILIES[_family(case)]
  h = fam.unpack(lambda i: hp[i])
  states = tuple(reference.dequantize_state(q, a, m) for q, a, m in zip(codes, absmax, maps))
  gf = g.astype(jnp.float32) * h["gscale"]
  _, new = fam.step(gf, states, h, families.flag_dict(fam, CASES[case][0]))
  return [np.asarray(s) for s in new]


def _compare(case, got, want, exact):
  """Outputs close; absmax equal to rounding; codes within one step of the reference's, and a
  differing code no farther from the exact new state than the reference's (a tie)."""
  out_k, codes_k, absmax_k = got
  out_r, codes_r, absmax_r = want
  # bfloat16 outputs: the float32 results may round to neighbouring bfloat16 values.
  rtol = 8e-3 if out_r.dtype == jnp.bfloat16 else 2e-5
  out_k, out_r = np.asarray(out_k, np.float32), np.asarray(out_r, np.float32)
  np.testing.assert_allclose(out_k, out_r, rtol=rtol, atol=1e-7 * np.abs(out_r).max())
  fam = families.FAMILIES[_family(case)]
  for k, (qk, qr, ak, ar) in enumerate(zip(codes_k, codes_r, absmax_k, absmax_r)):
    np.testing.assert_allclose(np.asarray(ak), np.asarray(ar), rtol=2e-6, atol=0)
    qk, qr = np.asarray(qk, np.int32), np.asarray(qr, np.int32)
    diff = np.abs(qk - qr)
    assert diff.max() <= 1, f"{case}: codes differ by {diff.max()} steps"
    assert diff.mean() < 0.02, f"{case}: {diff.mean():.2%} of codes differ"
    table = np.asarray(SIGNED if fam.signed[k] else UNSIGNED)
    a = np.asarray(ar)[:, None]
    off = diff > 0
    err_k = np.abs(table[qk] * a - exact[k])[off]
    err_r = np.abs(table[qr] * a - exact[k])[off]
    assert np.all(err_k <= err_r + 1e-5 * np.broadcast_to(a, qk.shape)[off]), case


# -- the exact encoder -------------------------------------------------------------------


def _search_codes(x: np.ndarray, table: np.ndarray, signed: bool) -> np.ndarray:
  """The reference: bitsandbytes' binary search, plus the sign guard for signed maps."""
  want = np.asarray(jax.jit(encode_8bit)(jnp.asarray(x), jnp.asarray(table))).astype(np.int32)
  if signed:
    want = np.where((x < 0) & (table[want] >= 0), want - 1, want)
  return want


def _ulps(values: np.ndarray, steps) -> list[np.ndarray]:
  bits = np.asarray(values, np.float32).view(np.int32)
  return [(bits + k).view(np.float32) for k in steps]


def _edge_values(table: np.ndarray) -> np.ndarray:
  """Every code and midpoint with float32 neighbours, values across the band decided
  exactly, segment splits, powers of two and ten, zeros, subnormals, inf, NaN, randoms."""
  mids = (table[1:] + table[:-1]) * np.float32(0.5)
  rng = np.random.default_rng(7)
  pows = np.array([2.0**k for k in range(-149, 128)] + [10.0**k for k in range(-45, 39)])
  pows = np.concatenate([pows, -pows]).astype(np.float32)
  splits = exact.tables(True)["S"], exact.tables(False)["S"]
  splits = np.concatenate(splits)[np.concatenate(splits) > 0]
  band = rng.integers(-3000, 3000, (mids.size, 64)).astype(np.int32)
  special = np.array([0.0, -0.0, np.inf, -np.inf, 1.0, -1.0, 3.4028235e38, -3.4028235e38,
                      1e-45, -1e-45, 1.1754942e-38, -1.1754942e-38, 1.17549435e-38],
                     np.float32)
  nans = np.array([0x7FC00000, 0x7F800001, 0xFFC00000, 0xFFFFFFFF], np.uint32).view(np.float32)
  parts = [table, special, nans, (mids.view(np.int32)[:, None] + band).reshape(-1).view(
      np.float32)]
  parts += _ulps(table, range(-4, 5)) + _ulps(mids, range(-8, 9))
  parts += _ulps(splits, range(-4, 5)) + _ulps(pows, range(-2, 3))
  parts += [rng.uniform(-1.01, 1.01, 100_000).astype(np.float32),
            (np.sign(rng.uniform(-1, 1, 100_000)) * 10 ** rng.uniform(-12, 0.1, 100_000))]
  x = np.concatenate([np.asarray(v, np.float32).ravel() for v in parts])
  return np.concatenate([x, -x])


@pytest.mark.parametrize("encode", [exact.xla_encode, exact.xla_encode_fixed])
@pytest.mark.parametrize("signed", [True, False])
def test_exact_encoder_equals_binary_search(signed, encode):
  table = codebooks.dynamic_map(signed)
  x = _edge_values(table)
  got = np.asarray(jax.jit(functools.partial(encode, signed=signed))(
      jnp.asarray(x), jnp.asarray(table)))
  want = _search_codes(x, table, signed)
  bad = np.nonzero(got != want)[0]
  assert bad.size == 0, (x[bad[:8]], got[bad[:8]], want[bad[:8]])
  assert got.min() >= 0 and got.max() <= 255


@pytest.mark.parametrize("signed", [True, False])
def test_exact_encoder_margins(signed):
  """The formula's coordinate of every midpoint of the map is within a tiny fraction of the
  band that is decided exactly (so the candidate is right outside the band)."""
  table = codebooks.dynamic_map(signed).astype(np.float64)
  tabs = exact.tables(signed)
  mids = ((table[1:] + table[:-1]) * 0.5).astype(np.float32)
  b = np.arange(1, 256)[mids > 0]
  y = mids[mids > 0]
  e = np.clip((y.view(np.int32) >> 23) - exact._OCTAVE_BIAS, 0, exact.N_OCTAVES - 1)
  split = tabs["S"][e].astype(np.float64)
  s = 2 * e + (y > split)
  u = np.minimum(y * tabs["A"][s].astype(np.float64) + tabs["C"][s], tabs["H"][s])
  at_split = np.abs(y - split) <= split * exact.SPLIT_TOL
  assert at_split.sum() == 8  # 0.0 | seven decades | 1.0
  assert np.abs(u - b)[~at_split].max() < exact.DELTA / 20
  assert (np.abs(y - split) / split)[at_split].max() < exact.SPLIT_TOL / 20


def test_fixed_encoder_split_midpoints_are_the_maps():
  for signed in (True, False):
    table = codebooks.dynamic_map(signed)
    for k, bits in exact.SPLIT_MIDPOINTS[signed]:
      mid = (table[k] + table[k + 1]) * np.float32(0.5)
      assert int(np.float32(mid).view(np.uint32)) == bits, (signed, k)


def _fixed_candidates(y: np.ndarray, signed: bool):
  """``encode_fixed``'s candidate for ``y >= 0`` with ``t`` in float64 (within 2**-40 of
  exact): ``(candidate, distance of t to the nearest integer)``."""
  tabs = {k: v.astype(np.float64) for k, v in exact.fixed_tables(signed).items()}
  e = y.view(np.int32) >> 23
  s = 2 * e + (y > tabs["S"][e])
  t = np.minimum(y.astype(np.float64) * tabs["A"][s] + tabs["C"][s], tabs["H"][s])
  floor = np.floor(t)
  return floor.astype(np.int64) - 256, np.minimum(t - floor, floor + 1 - t)


@pytest.mark.parametrize("signed", [True, False])
def test_fixed_encoder_candidate_outside_band(signed):
  """Outside the band decided exactly, the fixed-point candidate is the reference's code even
  after the kernel's float32 rounding of ``t`` (at most one unit of 2**-15): checked on every
  float32 in [0, 1] with stride 509 (every float with JAXQUANT_EXHAUSTIVE=1, ~1 minute),
  plus every midpoint of the map and its 256 float32 neighbours on either side."""
  import os
  table = codebooks.dynamic_map(signed)
  mids = (table[1:] + table[:-1]) * np.float32(0.5)
  stride = 1 if os.environ.get("JAXQUANT_EXHAUSTIVE") else 509
  top = int(np.float32(1.0 + 2**-10).view(np.int32))
  near_mids = (mids[mids > 0].view(np.int32)[:, None] + np.arange(-256, 257)).reshape(-1)
  margin = exact.DELTA_FIXED - 2.0**-15
  for start in range(0, top + 1, 1 << 24):
    bits = np.arange(start, min(start + (1 << 24), top + 1), stride, dtype=np.int32)
    if start == 0:
      bits = np.concatenate([bits, near_mids.astype(np.int32)])
    y = bits.view(np.float32)
    k = np.searchsorted(mids, y, side="left")  # midpoints below y; on one, the even code
    on = (k < mids.size) & (mids[np.minimum(k, mids.size - 1)] == y)
    want = np.where(on & (k % 2 == 1), k + 1, k)
    got, dist = _fixed_candidates(y, signed)
    wrong = got != want
    assert not np.any(wrong & (dist >= margin)), y[wrong & (dist >= margin)][:8]
    if wrong.any():  # every wrong candidate is far inside the band
      assert dist[wrong].max() < exact.DELTA_FIXED / 4


# -- kernel (interpret mode) vs reference ------------------------------------------------


@functools.cache
def _interpret_fn(case, write, rows=4, tiles=2):
  cfg = kernel.KernelConfig(rows=rows, tiles_per_program=tiles)
  return jax.jit(functools.partial(api.update_8bit_interpret, family=_family(case),
                                   flags=CASES[case][0], write=write, config=cfg))


@pytest.mark.parametrize("case", sorted(CASES))
def test_interpret_matches_reference(case):
  g, p, codes, absmax, maps = _inputs(case, n_blocks=16)
  hp = _hparams(case)
  write = "param" if case == "adam" else "update"
  got = _interpret_fn(case, write)(g, p, codes, absmax, maps, hp)
  want = reference.update_8bit(g, p, codes, absmax, maps, hp, family=_family(case),
                               flags=CASES[case][0], write=write)
  _compare(case, got, want, _exact_states(case, g, codes, absmax, maps, hp))


def test_interpret_without_params_bf16_and_odd_block_count():
  # 7 blocks: one block per program (no larger power of two divides 7); bfloat16 gradient,
  # no parameter input.
  g, _, codes, absmax, maps = _inputs("lion", n_blocks=7, dtype=jnp.bfloat16)
  hp = _hparams("lion", wd=0.0)
  got = _interpret_fn("lion", "update")(g, None, codes, absmax, maps, hp)
  want = reference.update_8bit(g, None, codes, absmax, maps, hp, family="lion")
  assert got[0].dtype == jnp.bfloat16
  _compare("lion", got, want, _exact_states("lion", g, codes, absmax, maps, hp))


def _strict_inputs(n_blocks: int, seed: int = 0):
  """Gradients whose new Adam/momentum states are computed exactly (``b1 = b2 = beta = 0``:
  ``m = g``, ``v = g * g``, one rounding): each block holds +-1.0 (so the state scales by 1)
  and signed-map midpoints, codes and their float32 neighbours, or random values."""
  signed = codebooks.dynamic_map(True)
  mids = (signed[1:] + signed[:-1]) * np.float32(0.5)
  edges = np.concatenate([signed, *_ulps(mids, range(-3, 4))])
  rng = np.random.default_rng(seed)
  g = rng.normal(0, 0.3, n_blocks * 256).astype(np.float32)
  g[:edges.size] = edges[:g.size]
  g = g.reshape(n_blocks, 256)
  g[:, 7] = np.where(np.arange(n_blocks) % 2, 1.0, -1.0)
  g = np.clip(g, -1, 1)
  g[-1] = 0.0  # an all-zero block
  return jnp.asarray(g)


def _strict_case(family):
  if family == "adam":
    hp = dict(b1=0.0, b2=0.0, omb1=1.0, omb2=1.0, eps=1e-8, eps_root=0.0, c1=1.0, c2=1.0,
              c1_next=1.0)
  else:
    hp = dict(beta=0.0)
  fam = families.FAMILIES[family]
  vec = np.zeros(families.HP_SIZE, np.float32)
  for name, value in dict(lr=1e-3, wd=0.0, gscale=1.0, **hp).items():
    vec[families.hparam_index(fam, name)] = value
  return fam, jnp.asarray(vec)


def _assert_same_bytes(got, want):
  for qk, qr in zip(got[1], want[1]):
    np.testing.assert_array_equal(np.asarray(qk), np.asarray(qr))
  for ak, ar in zip(got[2], want[2]):
    np.testing.assert_array_equal(np.asarray(ak), np.asarray(ar))


def _strict_run(family, n_blocks, fn):
  fam, hp = _strict_case(family)
  g = _strict_inputs(n_blocks)
  codes = tuple(jnp.full(g.shape, 127 if s else 0, jnp.uint8) for s in fam.signed)
  absmax = tuple(jnp.zeros(n_blocks, jnp.float32) for _ in fam.signed)
  maps = tuple(SIGNED if s else UNSIGNED for s in fam.signed)
  got = fn(family)(g, None, codes, absmax, maps, hp)
  want = reference.update_8bit(g, None, codes, absmax, maps, hp, family=family)
  _assert_same_bytes(got, want)
  # The edge values did reach the encoder: many codes of the signed state are used.
  assert np.unique(np.asarray(got[1][0])).size > 200


@pytest.mark.parametrize("family, encoder", [("adam", "masked"), ("momentum", "masked"),
                                             ("adam", "fixed"), ("momentum", "fixed")])
def test_interpret_codes_are_reference_bytes(family, encoder):
  cfg = kernel.KernelConfig(rows=4, tiles_per_program=2, encoder=encoder)
  _strict_run(family, 16, lambda f: jax.jit(functools.partial(
      api.update_8bit_interpret, family=f, config=cfg)))


def test_supports_routes_to_reference():
  g, p, codes, absmax, maps = _inputs("adam", n_blocks=4)
  hp = _hparams("adam")
  assert api.supports(g, p, codes, absmax, maps, hp, family="adam")
  assert not api.supports(g, p, codes, absmax, maps, hp, family="adam", max_unorm=1.0)
  assert not api.supports(g[:, :128], p[:, :128], tuple(c[:, :128] for c in codes), absmax,
                          maps, hp, family="adam")
  assert not api.supports(g, p, codes, absmax, maps, hp, family="adam", codebook="linear")
  with pytest.raises(NotImplementedError, match="max_unorm"):
    kernel.update_8bit(g, p, codes, absmax, maps, hp, family="adam", max_unorm=1.0,
                       interpret=True)
  with pytest.raises(ValueError, match="write"):
    reference.update_8bit(g, p, codes, absmax, maps, hp, family="adam", write="params")


def test_kernel_config_and_geometry():
  with pytest.raises(ValueError, match="rows"):
    kernel.KernelConfig(rows=3)
  with pytest.raises(ValueError, match="tiles_per_program"):
    kernel.KernelConfig(tiles_per_program=0)
  with pytest.raises(ValueError, match="encoder must be one of"):
    kernel.KernelConfig(encoder="search")
  cfg = kernel.KernelConfig(rows=4, tiles_per_program=8)
  assert kernel.geometry(262144, cfg) == (4, 8)
  assert kernel.geometry(24, cfg) == (4, 2)  # 8 blocks per program
  assert kernel.geometry(7, cfg) == (1, 1)


# -- compiled on the GPU ----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_kernel_matches_reference(case, dtype):
  g, p, codes, absmax, maps = _inputs(case, n_blocks=4096 + 24, dtype=dtype, seed=2)
  hp = _hparams(case)
  write = "param" if _family(case) in ("adam", "momentum") else "update"
  fn = jax.jit(functools.partial(api.update_8bit_pallas, family=_family(case),
                                 flags=CASES[case][0], write=write))
  got = fn(g, p, codes, absmax, maps, hp)
  want = jax.jit(functools.partial(reference.update_8bit, family=_family(case),
                                   flags=CASES[case][0], write=write))(g, p, codes, absmax, maps,
                                                                      hp)
  _compare(case, got, want, _exact_states(case, g, codes, absmax, maps, hp))


@pytest.mark.gpu
@pytest.mark.parametrize("encoder", sorted(kernel.ENCODERS))
@pytest.mark.parametrize("family", ["adam", "momentum"])
@pytest.mark.parametrize("rows, tiles, warps", [(1, 1, 1), (4, 4, 4), (16, 2, 8)])
def test_gpu_codes_are_reference_bytes(family, rows, tiles, warps, encoder):
  cfg = kernel.KernelConfig(rows=rows, tiles_per_program=tiles, num_warps=warps,
                            encoder=encoder)
  _strict_run(family, 1000, lambda f: jax.jit(functools.partial(
      api.update_8bit_pallas, family=f, config=cfg)))


@pytest.mark.gpu
@pytest.mark.parametrize("encoder", sorted(kernel.ENCODERS))
@pytest.mark.parametrize("rows, tiles, warps", [(1, 1, 1), (4, 4, 4), (16, 2, 8)])
def test_gpu_kernel_configs(rows, tiles, warps, encoder):
  g, p, codes, absmax, maps = _inputs("ademamix", n_blocks=1000, seed=3)
  hp = _hparams("ademamix")
  want = reference.update_8bit(g, p, codes, absmax, maps, hp, family="ademamix", write="param")
  cfg = kernel.KernelConfig(rows=rows, tiles_per_program=tiles, num_warps=warps,
                            encoder=encoder)
  got = jax.jit(functools.partial(api.update_8bit_pallas, family="ademamix", write="param",
                                  config=cfg))(g, p, codes, absmax, maps, hp)
  _compare("ademamix", got, want, _exact_states("ademamix", g, codes, absmax, maps, hp))
