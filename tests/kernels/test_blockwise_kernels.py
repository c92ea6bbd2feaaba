"""Blockwise quantize/dequantize kernels (4-bit NF4/FP4, 8-bit any code) against the reference.

Every comparison is exact: the kernels must write the reference's bytes, absmax and values.
On CPU the kernels run in the Pallas interpreter through ``jaxquant``'s dispatch
(``backend="interpret"``); the ``gpu`` tests run them compiled with Triton, with outputs
poisoned beforehand (0xFF bytes, NaN floats) so an unwritten tile fails, and check that
``backend=None`` puts the kernel's ``pallas_call`` in the program (a silent fallback to the
reference fails them). Inputs are fresh random draws, with all-zero blocks, signed zeros, NaN,
±inf and float32 subnormals mixed in; the seed is in every failure message.

The oracle is the reference run by XLA on the CPU (the one checked against bitsandbytes'
golden files). XLA on the CPU flushes float32 subnormals to zero while the Triton kernels keep
them (IEEE, as bitsandbytes' CUDA kernels do): the compiled kernels are checked on subnormal
blocks against a NumPy float32 (IEEE) twin of the reference instead. (XLA on the GPU is no
oracle: its run of the 8-bit reference differs from the CPU's in ~3e-5 of the codes on the W3
weights, see ``benchmarks/results/blockwise_quant_8bit.json``.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
import pallas_kernels
from jaxquant import _dispatch, codebooks
from pallas_kernels.blockwise_quant import _encode4, api, reference
from pallas_kernels.blockwise_quant._common import KernelConfig
from tests.helpers import count_pallas_calls

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


@dataclasses.dataclass(frozen=True)
class Case4:
  quant_type: str
  blocksize: int
  dtype: object
  shape: tuple[int, ...]
  nested: bool


# Covering subset for CPU: each code, blocksize 64/128/256, dtype, nesting; flat ragged sizes
# (odd, not a multiple of the blocksize) and 2-D ones; the 8192-element programs overhang.
CASES_4BIT = [
    Case4("nf4", 64, BF16, (40, 256), True),
    Case4("fp4", 64, F32, (7, 320), False),
    Case4("nf4", 128, F16, (3001,), False),
    Case4("fp4", 128, BF16, (24, 384), True),
    Case4("nf4", 256, F32, (12, 512), False),
    Case4("fp4", 256, F16, (2049,), True),
]
GPU_CASES_4BIT = CASES_4BIT + [
    Case4(qt, bs, dt, shape, nested)
    for qt in ("nf4", "fp4") for bs, dt, shape in ((32, BF16, (33, 96)), (512, F16, (70001,)),
                                                   (1024, F32, (9, 2048)), (4096, BF16, (5, 8192)))
    for nested in (False, True)
]


def _seed() -> int:
  return int(np.random.SeedSequence().entropy % 2**31)


def _weights(shape, dtype, seed: int, *, specials: bool, subnormals: bool = True) -> np.ndarray:
  """N(0, s^2) values (s drawn from 0.02, 1, 30); with ``specials`` the first blocks hold an
  all-zero run, signed zeros, a NaN, ±inf and (``subnormals``) float32-subnormal magnitudes."""
  rng = np.random.default_rng(seed)
  flat = (rng.standard_normal(int(np.prod(shape))) * rng.choice([0.02, 1.0, 30.0])).astype(
      np.float32)
  if specials:
    flat[:300] = 0.0
    flat[300:310] = -0.0
    flat[700] = np.nan
    flat[1100], flat[1101] = np.inf, -np.inf
    if subnormals and jnp.dtype(dtype) != jnp.dtype(F16):
      flat[1500:1800] *= np.float32(1e-40)
  return np.asarray(jnp.asarray(flat, dtype)).reshape(shape)


def _equal(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


def _assert_states_equal(got: jq.QuantState, want: jq.QuantState, msg: str) -> None:
  for field in ("data", "absmax", "nested_absmax", "offset"):
    g, w = getattr(got, field), getattr(want, field)
    assert (g is None) == (w is None), (field, msg)
    if g is not None:
      assert _equal(g, w), f"{field} differs: {msg}"


def _roundtrip_4bit(case: Case4, backend):
  def f(x):
    state = jq.quantize_4bit(x, case.blocksize, case.nested, case.quant_type, backend=backend)
    return state, jq.dequantize_4bit(state, backend=backend)
  return jax.jit(f)


@pytest.mark.parametrize("case", CASES_4BIT, ids=str)
def test_4bit_interpret_equals_reference(case):
  seed = _seed()
  x = jnp.asarray(_weights(case.shape, case.dtype, seed, specials=not case.nested))
  got_state, got = _roundtrip_4bit(case, "interpret")(x)
  want_state, want = _roundtrip_4bit(case, "xla")(x)
  msg = f"{case}, seed={seed}"
  _assert_states_equal(got_state, want_state, msg)
  assert _equal(got, want), f"dequantized values differ: {msg}"


@pytest.mark.parametrize("signed,blocksize,dtype,shape", [
    (True, 64, BF16, (33, 320)),
    (False, 256, F32, (4099,)),
])
def test_8bit_interpret_equals_reference(signed, blocksize, dtype, shape):
  seed = _seed()
  x = _weights(shape, dtype, seed, specials=True)
  if not signed:
    x = np.abs(x)
  code = jnp.asarray(codebooks.dynamic_map(signed))

  def f(x, backend):
    state = jq.quantize_blockwise(x, code, blocksize, backend=backend)
    return state, jq.dequantize_blockwise(state, backend=backend)

  got_state, got = jax.jit(f, static_argnums=1)(jnp.asarray(x), "interpret")
  want_state, want = jax.jit(f, static_argnums=1)(jnp.asarray(x), "xla")
  msg = f"signed={signed}, blocksize={blocksize}, {shape}, seed={seed}"
  _assert_states_equal(got_state, want_state, msg)
  assert _equal(got, want), f"dequantized values differ: {msg}"


@pytest.mark.parametrize("impl,tiles,n", [
    ("interpret", 3, 64 * 297 + 3), ("interpret", 3, 64 * 297 + 8),
    pytest.param("pallas", 1, 64 * 297 + 3, marks=pytest.mark.gpu),
    pytest.param("pallas", 3, 64 * 297 + 3, marks=pytest.mark.gpu),
    pytest.param("pallas", 1, 64 * 297 + 8, marks=pytest.mark.gpu),
    pytest.param("pallas", 3, 64 * 297 + 8, marks=pytest.mark.gpu)])
def test_many_programs_with_ragged_tail(impl, tiles, n):
  """Small tiles (8 blocks of 64), ``tiles`` per program, the last program partial (and its
  last tile too, and its last block); an odd element count (flat tiles) or a multiple of 8
  (vector rows, masked by row)."""
  seed = _seed()
  x = jnp.asarray(_weights((n,), BF16, seed, specials=True))
  config = KernelConfig(elems_per_program=512, tiles_per_program=tiles)
  quantize = pallas_kernels.get("quantize_4bit", impl).fn
  packed, absmax = quantize(x, blocksize=64, quant_type="nf4", config=config)
  want_packed, want_absmax = jax.jit(
      lambda v: reference.quantize_4bit(v, blocksize=64, quant_type="nf4"))(x)
  assert _equal(packed, want_packed) and _equal(absmax, want_absmax), f"seed={seed}"

  finite = jnp.where(jnp.isfinite(want_absmax), want_absmax, 1.0)
  offset = jnp.mean(finite)
  nested_code = jnp.asarray(codebooks.dynamic_map(True))
  q_absmax, nested_absmax = reference.quantize_8bit(finite - offset, nested_code, blocksize=256)
  args = (want_packed, q_absmax, jnp.asarray(codebooks.NF4), nested_absmax, nested_code, offset)
  dequantize = pallas_kernels.get("dequantize_4bit", impl).fn
  got = dequantize(*args, blocksize=64, n=n, dtype=F16, config=config)
  want = jax.jit(lambda *a: reference.dequantize_4bit(*a, blocksize=64, n=n, dtype=F16))(*args)
  assert _equal(got, want), f"seed={seed}"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_table_encoder_equals_thresholds(quant_type):
  """The bin-lookup encoder agrees with the threshold count on every bin edge and threshold
  neighbourhood of [-1.01, 1.01] (pure jnp; the kernels use the same function)."""
  thresholds = np.array(getattr(reference, f"{quant_type.upper()}_THRESHOLDS"), np.float32)
  near = np.concatenate([thresholds, -thresholds])
  near = np.concatenate([near, np.nextafter(near, np.float32(2)),
                         np.nextafter(near, np.float32(-2))])
  edges = (np.arange(-17, 18, dtype=np.float32) + np.float32(0.5)) / np.float32(16)
  grid = np.linspace(-1.01, 1.01, 200_001, dtype=np.float32)
  s = jnp.asarray(np.concatenate([grid, near, edges, np.nextafter(edges, np.float32(2)),
                                  np.float32([0.0, -0.0, 1.0, -1.0, 1e-38, -1e-38])]))
  thr, codes = (jnp.asarray(t) for t in _encode4.encoder_tables(quant_type))
  got = _encode4.encode_table(s, thr, codes, quant_type)
  assert _equal(got, reference.encode_4bit(s, quant_type).astype(jnp.int32))
  assert _equal(_encode4.encode_compare(s, quant_type), got)
  poly_thr = jnp.asarray(_encode4.poly_table(quant_type))
  within = s[jnp.abs(s) <= 1.0001]
  poly = _encode4.encode_poly(within, poly_thr, quant_type)
  assert _equal(poly, reference.encode_4bit(within, quant_type).astype(jnp.int32))
  # Clamped: any float32, NaN and ±inf included.
  wide = jnp.concatenate([s, jnp.float32([np.nan, -np.nan, np.inf, -np.inf, 1.5, -1.5, 3e38,
                                          -3e38, 1.0001, -1.0001, 1e-45, -1e-45])])
  clamped = _encode4.encode_poly(wide, poly_thr, quant_type, clamp=_encode4.clamp_select)
  assert _equal(clamped, reference.encode_4bit(wide, quant_type).astype(jnp.int32))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_poly_encoder_bins_keep_every_threshold_inside(quant_type):
  """The ``poly`` encoder's bin ``b`` of ``s`` satisfies ``t_{b-1} < s <= t_{b+1}`` with room:
  on a dense grid of [-1.0001, 1.0001] (and next to every threshold) the exact polynomial stays
  at least 0.03 bin away from a bin that would give a wrong code, so float32 rounding of its
  evaluation (fused or not) cannot change a code."""
  thresholds = np.array(getattr(reference, f"{quant_type.upper()}_THRESHOLDS"), np.float32)
  coefs, constant = _encode4._POLY[quant_type]
  lo = 0.0 if quant_type == "fp4" else -1.0001
  key = np.concatenate([np.linspace(lo, 1.0001, 400_001, dtype=np.float32), thresholds,
                        np.nextafter(thresholds, np.float32(2)), np.float32([0.0, 1.0])])
  p = float(constant) + sum(float(c) * key.astype(np.float64) ** (k + 1)
                            for k, c in enumerate(coefs))
  code = np.searchsorted(thresholds, key, side="left")
  lowest = np.maximum(code - 1, 0) - 0.5
  highest = np.minimum(code, thresholds.size) + 0.5
  assert min((p - lowest).min(), (highest - p).min()) > 0.03
  b = _encode4.poly_bin(key, quant_type, xp=np)
  assert np.all((b >= code - 1) & (b <= code)), quant_type


def test_unsupported_arguments_fall_back_to_reference():
  x = jnp.zeros((4, 64), F32)
  code = jnp.asarray(codebooks.dynamic_map(True))
  assert _dispatch.select("quantize_8bit", "interpret", x, code, blocksize=48) == "xla"
  assert _dispatch.select("quantize_8bit", "interpret", x, code, blocksize=64) == "interpret"
  assert _dispatch.select("quantize_4bit", "interpret", x.astype(jnp.int32), blocksize=64,
                          quant_type="nf4") == "xla"
  packed = jnp.zeros((128,), jnp.uint8)
  nf4 = jnp.asarray(codebooks.NF4)
  assert _dispatch.select("dequantize_4bit", "interpret", packed, jnp.ones((4,), F32), nf4,
                          blocksize=64, n=256, dtype=BF16) == "interpret"
  # float16 absmax (not what quantize writes), or a wrong number of them: reference.
  assert _dispatch.select("dequantize_4bit", "interpret", packed, jnp.ones((4,), F16), nf4,
                          blocksize=64, n=256, dtype=BF16) == "xla"
  assert _dispatch.select("dequantize_4bit", "interpret", packed, jnp.ones((3,), F32), nf4,
                          blocksize=64, n=256, dtype=BF16) == "xla"


def test_kernels_reject_unsupported_arguments_directly():
  impl = pallas_kernels.get("quantize_4bit", "interpret").fn
  with pytest.raises(ValueError, match="blocksize=48"):
    impl(jnp.zeros((96,), F32), blocksize=48, quant_type="nf4")


# ------------------------------------------------------------------------------------------
# Compiled on the GPU.

def _reference(fn, *args):
  """``fn`` (a reference function) run by XLA on the CPU, as numpy."""
  cpu = jax.devices("cpu")[0]
  with jax.default_device(cpu):
    return jax.device_get(jax.jit(fn)(*jax.device_put(args, cpu)))


def _ieee_quantize_4bit(x: np.ndarray, blocksize: int, quant_type: str):
  """``reference.quantize_4bit`` in NumPy float32 (IEEE: subnormals kept)."""
  flat = x.astype(np.float32).ravel()
  n_blocks = -(-flat.size // blocksize)
  blocks = np.zeros(n_blocks * blocksize, np.float32)
  blocks[:flat.size] = flat
  blocks = blocks.reshape(n_blocks, blocksize)
  absmax = np.abs(blocks).max(axis=1)
  with np.errstate(all="ignore"):
    s = blocks * (np.float32(1.0) / absmax)[:, None]
  if quant_type == "nf4":
    codes = sum((s > t).astype(np.uint8) for t in np.float32(reference.NF4_THRESHOLDS))
  else:
    rank = sum((np.abs(s) > t).astype(np.int64) for t in np.float32(reference.FP4_THRESHOLDS))
    codes = np.array(reference.FP4_CODE_BY_RANK, np.uint8)[rank] | np.where(s < 0, 8, 0)
  codes = codes.astype(np.uint8).ravel()[:flat.size]
  if flat.size % 2:
    codes = np.append(codes, np.uint8(_encode4.pad_code(quant_type)))
  return (codes[0::2] << 4) | codes[1::2], absmax


def _poison(shape_dtype):
  if jnp.dtype(shape_dtype.dtype) == jnp.dtype(jnp.uint8):
    return jnp.full(shape_dtype.shape, 0xFF, jnp.uint8)
  return jnp.full(shape_dtype.shape, jnp.nan, shape_dtype.dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES_4BIT, ids=str)
def test_4bit_compiled_equals_reference(case):
  seed = _seed()
  x = _weights(case.shape, case.dtype, seed, specials=not case.nested, subnormals=False)
  msg = f"{case}, seed={seed}"
  n = x.size
  kw = dict(blocksize=case.blocksize, quant_type=case.quant_type)
  want_packed, want_absmax = _reference(lambda v: reference.quantize_4bit(v, **kw), x)
  quantize = pallas_kernels.get("quantize_4bit", "pallas").fn
  poison = [_poison(jax.ShapeDtypeStruct(a.shape, a.dtype)) for a in (want_packed, want_absmax)]
  packed, absmax = jax.jit(lambda v, p: quantize(v, initial_outputs=p, **kw))(x, poison)
  assert _equal(packed, want_packed) and _equal(absmax, want_absmax), msg

  code = codebooks.get_codebook(case.quant_type)
  args = (want_packed, want_absmax, code)
  if case.nested:
    finite = np.where(np.isfinite(want_absmax), want_absmax, 1.0).astype(np.float32)
    offset = np.float32(finite.mean())
    nested_code = codebooks.dynamic_map(True)
    q_absmax, nested_absmax = _reference(
        lambda a, c: reference.quantize_8bit(a - offset, c, blocksize=256), finite, nested_code)
    args = (want_packed, q_absmax, code, nested_absmax, nested_code, offset)
  dkw = dict(blocksize=case.blocksize, n=n, dtype=case.dtype)
  want = _reference(lambda *a: reference.dequantize_4bit(*a, **dkw), *args)
  dequantize = pallas_kernels.get("dequantize_4bit", "pallas").fn
  got = jax.jit(lambda p, *a: dequantize(*a, initial_output=p, **dkw))(
      _poison(jax.ShapeDtypeStruct((n,), case.dtype)), *args)
  assert _equal(got, want), msg

  # The public op runs the kernels on the GPU (no silent fallback).
  def public(v):
    state = jq.quantize_4bit(v, case.blocksize, case.nested, case.quant_type)
    return jq.dequantize_4bit(state)
  x_finite = np.nan_to_num(x, posinf=1.0, neginf=-1.0)
  for op in ("quantize_4bit", "dequantize_4bit") + (("quantize_8bit",) if case.nested else ()):
    assert count_pallas_calls(public, x_finite, name=api.KERNEL_NAMES[op]) >= 1, (op, msg)


@pytest.mark.gpu
@pytest.mark.parametrize("code_name,blocksize,dtype,shape", [
    ("dynamic", 64, BF16, (33, 320)),
    ("dynamic_unsigned", 256, F32, (4099,)),
    ("linear", 128, F16, (70001,)),
    ("dynamic", 4096, F32, (3, 4096)),
])
def test_8bit_compiled_equals_reference(code_name, blocksize, dtype, shape):
  seed = _seed()
  x = _weights(shape, dtype, seed, specials=True, subnormals=False)
  if code_name == "dynamic_unsigned":
    x = np.abs(x)
  code = codebooks.get_codebook(code_name)
  msg = f"{code_name}, blocksize={blocksize}, {shape}, seed={seed}"
  want_q, want_absmax = _reference(lambda v, c: reference.quantize_8bit(v, c, blocksize=blocksize),
                                x, code)
  quantize = pallas_kernels.get("quantize_8bit", "pallas").fn
  poison = [_poison(jax.ShapeDtypeStruct(a.shape, a.dtype)) for a in (want_q, want_absmax)]
  q, absmax = jax.jit(lambda v, c, p: quantize(v, c, blocksize=blocksize, initial_outputs=p))(
      x, code, poison)
  assert _equal(q, want_q) and _equal(absmax, want_absmax), msg

  dkw = dict(blocksize=blocksize, dtype=dtype)
  want = _reference(lambda *a: reference.dequantize_8bit(*a, **dkw), want_q, want_absmax, code)
  dequantize = pallas_kernels.get("dequantize_8bit", "pallas").fn
  got = jax.jit(lambda p, *a: dequantize(*a, initial_output=p, **dkw))(
      _poison(jax.ShapeDtypeStruct((x.size,), dtype)), want_q, want_absmax, code)
  assert _equal(got, want), msg

  def public(v):
    return jq.dequantize_blockwise(jq.quantize_blockwise(v, code, blocksize))
  for op in ("quantize_8bit", "dequantize_8bit"):
    assert count_pallas_calls(public, np.nan_to_num(x), name=api.KERNEL_NAMES[op]) >= 1, msg


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type,dtype", [("nf4", F32), ("fp4", BF16)])
def test_4bit_compiled_subnormal_blocks_follow_ieee(quant_type, dtype):
  """Blocks of float32-subnormal values (absmax below 2**-126, reciprocal up to inf) and
  normal blocks holding subnormal elements, against the NumPy float32 twin of the reference."""
  seed = _seed()
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((16, 256)).astype(np.float32)
  x[:4] *= np.float32(1e-40)  # whole blocks subnormal
  x[4:8, ::7] *= np.float32(1e-41)  # subnormal elements in normal blocks
  x = np.asarray(jnp.asarray(x, dtype))
  quantize = pallas_kernels.get("quantize_4bit", "pallas").fn
  packed, absmax = quantize(jnp.asarray(x), blocksize=64, quant_type=quant_type)
  want_packed, want_absmax = _ieee_quantize_4bit(x, 64, quant_type)
  msg = f"{quant_type}, {dtype}, seed={seed}"
  assert _equal(absmax, want_absmax), msg
  assert _equal(packed, want_packed), msg
