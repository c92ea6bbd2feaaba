"""The fused 8-bit optimizer kernel against its reference (``pallas_kernels.optim_update``).

On CPU the kernel runs in Pallas interpret mode; ``@pytest.mark.gpu`` tests compile it with
Triton. The oracle is ``reference.update_8bit`` (table lookups and bitsandbytes' binary-search
quantizer); the kernel decodes and encodes the dynamic maps arithmetically, so codes may differ
by one step where a value lies within float rounding of a midpoint, and updates agree to float
rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import codebooks
from pallas_kernels.blockwise_quant.reference import encode_8bit
from pallas_kernels.optim_update import api, codec, families, kernel, reference

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


# -- the arithmetic codec -----------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_codec_decode_matches_tables(signed):
  table = codebooks.dynamic_map(signed)
  dec = {k: jnp.asarray(v) for k, v in codec.decode_tables(signed).items()}
  for values in (codec.decode(jnp.arange(256), signed),
                 codec.decode_segments(jnp.arange(256, dtype=jnp.uint8), signed,
                                       lambda n, i: dec[n][i])):
    values = np.asarray(values)
    np.testing.assert_allclose(values, table, rtol=5e-7, atol=0)
    assert values[codec.ZERO_INDEX[signed]] == 0.0 and values[255] == 1.0


@pytest.mark.parametrize("signed", [True, False])
def test_codec_encode_is_nearest_code(signed):
  table = codebooks.dynamic_map(signed)
  rng = np.random.default_rng(1)
  x = np.concatenate([rng.uniform(-1, 1, 50_000),
                      np.sign(rng.uniform(-1, 1, 50_000)) * 10 ** rng.uniform(-8, 0, 50_000),
                      table, (table[1:] + table[:-1]) / 2, [0.0, 1.0, -1.0, 1e-30, -1e-30]])
  x = x.astype(np.float32)
  if not signed:
    x = np.abs(x)
  got = np.asarray(codec.encode(jnp.asarray(x), signed))
  want = np.asarray(encode_8bit(jnp.asarray(x), jnp.asarray(table))).astype(np.int32)
  if signed:  # bitsandbytes' sign guard: negatives never take the code of +0
    want = np.where((x < 0) & (table[want] >= 0), want - 1, want)
  assert got.min() >= 0 and got.max() <= 255
  diff = np.abs(got - want)
  assert diff.max() <= 1
  # Off by one only within float rounding of a midpoint: the two codes are equally near.
  off = diff > 0
  assert off[:100_000].mean() < 1e-4  # random values: (near-)ties are rare
  dist_got = np.abs(table[got[off]] - x[off])
  dist_want = np.abs(table[want[off]] - x[off])
  assert np.all(np.abs(dist_got - dist_want) <= 4 * np.spacing(np.abs(x[off])) + 1e-12)
  if signed:
    assert np.all(table[got[x < 0]] < 0)


@pytest.mark.parametrize("signed", [True, False])
def test_segment_encoder_is_nearest_code(signed):
  table = codebooks.dynamic_map(signed)
  tables = {k: jnp.asarray(v) for k, v in codec.encode_tables(signed).items()}
  rng = np.random.default_rng(2)
  mids = (table[1:] + table[:-1]) / 2
  x = np.concatenate([rng.uniform(-1, 1, 50_000),
                      np.sign(rng.uniform(-1, 1, 50_000)) * 10 ** rng.uniform(-8, 0, 50_000),
                      table, np.nextafter(mids, 2), np.nextafter(mids, -2),
                      [0.0, 1.0, -1.0, 1e-30, 1.0000001]]).astype(np.float32)
  if not signed:
    x = np.abs(x)
  got = np.asarray(codec.encode_segments(jnp.asarray(x), signed, lambda n, i: tables[n][i]))
  want = np.asarray(encode_8bit(jnp.asarray(x), jnp.asarray(table))).astype(np.int32)
  if signed:
    want = np.where((x < 0) & (table[want] >= 0), want - 1, want)
  diff = np.abs(got - want)
  assert diff.max() <= 1 and diff[:100_000].mean() < 1e-3
  off = diff > 0  # only within a few ulp of a midpoint: equally near codes
  gap = np.abs(np.abs(table[got[off]] - x[off]) - np.abs(table[want[off]] - x[off]))
  assert np.all(gap <= 8 * np.spacing(np.abs(x[off])) + 1e-12)


# -- kernel (interpret mode) vs reference ------------------------------------------------


@functools.cache
def _interpret_fn(case, write, has_p, max_rows=8, encode="segments", decode="table"):
  flags = CASES[case][0]
  cfg = kernel.KernelConfig(max_rows=max_rows, num_warps=4, encode=encode, decode=decode)
  return jax.jit(functools.partial(api.update_8bit_interpret, family=_family(case), flags=flags,
                                   write=write, config=cfg))


@pytest.mark.parametrize("case", sorted(CASES))
def test_interpret_matches_reference(case):
  g, p, codes, absmax, maps = _inputs(case, n_blocks=16)
  hp = _hparams(case)
  write = "param" if case == "adam" else "update"
  decode = "segments" if case in ("ademamix", "momentum") else "table"
  got = _interpret_fn(case, write, True, decode=decode)(g, p, codes, absmax, maps, hp)
  want = reference.update_8bit(g, p, codes, absmax, maps, hp, family=_family(case),
                               flags=CASES[case][0], write=write)
  _compare(case, got, want, _exact_states(case, g, codes, absmax, maps, hp))


def test_interpret_without_params_bf16_and_odd_block_count():
  # 7 blocks (rows per program falls to 1), bfloat16 gradient, no parameter input, the
  # arithmetic encoder.
  g, _, codes, absmax, maps = _inputs("lion", n_blocks=7, dtype=jnp.bfloat16)
  hp = _hparams("lion", wd=0.0)
  got = _interpret_fn("lion", "update", False, encode="arith")(g, None, codes, absmax, maps, hp)
  want = reference.update_8bit(g, None, codes, absmax, maps, hp, family="lion")
  assert got[0].dtype == jnp.bfloat16
  _compare("lion", got, want, _exact_states("lion", g, codes, absmax, maps, hp))


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


def test_rows_per_program():
  assert kernel.rows_per_program(262144, 16) == 16
  assert kernel.rows_per_program(24, 16) == 8
  assert kernel.rows_per_program(7, 16) == 1


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
@pytest.mark.parametrize("decode", ["arith", "table", "segments"])
@pytest.mark.parametrize("encode, fast_log", [("segments", True), ("arith", True),
                                              ("arith", False)])
def test_gpu_kernel_configs(decode, encode, fast_log):
  g, p, codes, absmax, maps = _inputs("ademamix", n_blocks=1000, seed=3)
  hp = _hparams("ademamix")
  want = reference.update_8bit(g, p, codes, absmax, maps, hp, family="ademamix", write="param")
  for rows, warps in ((1, 1), (8, 4), (32, 8)):
    cfg = kernel.KernelConfig(max_rows=rows, num_warps=warps, decode=decode, encode=encode,
                              fast_log=fast_log)
    got = jax.jit(functools.partial(api.update_8bit_pallas, family="ademamix", write="param",
                                    config=cfg))(g, p, codes, absmax, maps, hp)
    _compare("ademamix", got, want, _exact_states("ademamix", g, codes, absmax, maps, hp))
