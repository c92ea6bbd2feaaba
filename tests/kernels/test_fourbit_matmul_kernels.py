"""4-bit matmul kernels (forward GEMV / GEMM, backward to the input) against the reference.

On CPU the kernels run in the Pallas interpreter; the ``gpu`` tests run the same cases
compiled with Triton, with the outputs poisoned (NaN) beforehand, and check that the kernel's
``pallas_call`` is in the program, so a silent fallback to the reference fails them.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import _dispatch
from jaxquant.functional._fourbit import nested_of
from pallas_kernels.fourbit_matmul import _decode, _dequant, _tuning, api, reference
from pallas_kernels.fourbit_matmul._tuning import Config
from tests.helpers import count_pallas_calls

TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.float16): 2e-3,
       jnp.dtype(jnp.bfloat16): 1.6e-2}


@dataclasses.dataclass(frozen=True)
class Case:
  lead: tuple[int, ...]  # leading dims of x; their product is M
  n: int
  k: int
  blocksize: int
  quant_type: str
  nested: bool
  dtype: object
  bias: bool
  forward: Config
  backward: Config


# A covering subset: every M, blocksize, code, dtype and nesting appears, and every kernel
# (gemv and gemm with and without split-K, gemm with either operand order, dequantize-then-dot
# both ways, each with the generic and the even/odd pair decode, with and without prefetch);
# N and K are not multiples of the tiles where the kernels mask; block_k below, at and above
# the blocksize.
CASES = [
    Case((1,), 200, 320, 64, "nf4", True, jnp.bfloat16, True,
         Config("gemv", block_n=64, block_k=64, num_stages=1),
         Config("gemm", block_m=16, block_n=64, block_k=64)),
    Case((3,), 96, 256, 128, "fp4", False, jnp.float32, False,
         Config("gemv", block_n=32, block_k=64, split_k=2),
         Config("gemm", block_m=16, block_n=32, block_k=128, w_lhs=True)),
    Case((2, 8), 200, 384, 128, "nf4", True, jnp.float16, True,
         Config("gemm", block_m=16, block_n=64, block_k=128, w_lhs=True),
         Config("gemm", block_m=16, block_n=64, block_k=64)),
    Case((4, 25), 130, 256, 256, "fp4", True, jnp.bfloat16, True,
         Config("gemm", block_m=32, block_n=32, block_k=64, split_k=2),
         Config("gemm", block_m=64, block_n=32, block_k=128, w_lhs=True)),
    Case((512,), 64, 128, 64, "nf4", False, jnp.float32, False,
         Config("dq_dot", block_n=32, block_k=128),
         Config("gemm", block_m=128, block_n=16, block_k=64, group_m=2)),
    Case((16,), 72, 512, 256, "nf4", True, jnp.bfloat16, False,
         Config("gemv", block_n=16, block_k=512),
         Config("dq_dot", block_n=16, block_k=256)),
    # dequantize-then-dot in 16 bits with a bias (float32 product + bias, one rounding); a
    # long float16 K without (the dot returns x.dtype: the GEMM must still accumulate in float32)
    Case((5,), 96, 128, 64, "nf4", True, jnp.bfloat16, True,
         Config("dq_dot", block_n=32, block_k=64),
         Config("dq_dot", block_n=32, block_k=128)),
    Case((8,), 32, 4096, 64, "fp4", False, jnp.float16, False,
         Config("dq_dot", block_n=32, block_k=512),
         Config("dq_dot", block_n=32, block_k=512)),
    # even/odd pair decode (_pairs): fused GEMV (one and several rows, split-K) and tiles
    Case((1,), 200, 320, 64, "nf4", True, jnp.bfloat16, True,
         Config("gemv", block_n=64, block_k=64, pairs=True, x_reuse=True),
         Config("gemm", block_m=16, block_n=32, block_k=64)),
    Case((2, 3), 130, 512, 128, "fp4", False, jnp.float16, True,
         Config("gemv", block_n=32, block_k=128, split_k=2, pairs=True, prefetch=True),
         Config("gemm", block_m=16, block_n=32, block_k=128, w_lhs=True)),
    Case((16,), 72, 512, 64, "nf4", True, jnp.bfloat16, False,
         Config("gemm", block_m=16, block_n=32, block_k=128, split_k=2, pairs=True),
         Config("gemm", block_m=16, block_n=32, block_k=64)),
    Case((4, 25), 130, 256, 256, "fp4", True, jnp.float16, True,
         Config("gemm", block_m=32, block_n=32, block_k=64, w_lhs=True, pairs=True,
                prefetch=True),
         Config("gemm", block_m=32, block_n=32, block_k=64)),
]
IDS = [f"M{int(np.prod(c.lead))}-{c.n}x{c.k}-bs{c.blocksize}-{c.quant_type}"
       f"{'-dq' if c.nested else ''}-{jnp.dtype(c.dtype).name}"
       f"{'-pairs' if c.forward.pairs else ''}"
       f"{'-prefetch' if c.forward.prefetch else ''}"
       for c in CASES]


def _inputs(case: Case, seed: int):
  rng = np.random.default_rng(seed)
  w = (rng.standard_normal((case.n, case.k)) / np.sqrt(case.k)).astype(np.float32)
  state = jq.quantize_4bit(w, case.blocksize, case.nested, case.quant_type, backend="xla")
  x = jnp.asarray(rng.standard_normal((*case.lead, case.k)), case.dtype)
  g = jnp.asarray(rng.standard_normal((*case.lead, case.n)), case.dtype)
  bias = jnp.asarray(rng.standard_normal((case.n,)), case.dtype) if case.bias else None
  return state, x, g, bias


def _weight(state):
  return (state.data, state.absmax, state.code), dict(shape=state.shape,
                                                      blocksize=state.blocksize,
                                                      nested=nested_of(state))


def _assert_close(out, ref, dtype):
  out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  assert out.shape == ref.shape
  assert np.isfinite(out).all(), "unwritten (poisoned) or non-finite output elements"
  tol = TOL[jnp.dtype(dtype)]
  np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * np.abs(ref).max())


@jax.default_matmul_precision("highest")  # the float32 reference, also on a GPU (not tf32)
def _check_case(case: Case, seed: int, **kw):
  state, x, g, bias = _inputs(case, seed)
  arrays, wkw = _weight(state)
  y = api.matmul_4bit(x, *arrays, bias, config=case.forward, **wkw, **kw)
  assert y.dtype == case.dtype and y.shape == (*case.lead, case.n)
  _assert_close(y, reference.matmul_4bit(x, *arrays, bias, **wkw), case.dtype)
  dx = api.matmul_4bit_grad_input(g, *arrays, config=case.backward, **wkw, **kw)
  assert dx.dtype == case.dtype and dx.shape == (*case.lead, case.k)
  _assert_close(dx, reference.matmul_4bit_grad_input(g, *arrays, **wkw), case.dtype)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernels_match_reference_interpret(case):
  _check_case(case, seed=hash(IDS[CASES.index(case)]) % 2**31, interpret=True)


def _grads(x, state, bias, ct, backend):
  def loss(x, bias):
    y = jq.matmul_4bit(x, state, bias, backend=backend)
    return jnp.sum(y.astype(jnp.float32) * ct)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, bias)


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=[IDS[1], IDS[3]])
@jax.default_matmul_precision("highest")
def test_gradients_through_matmul_4bit_interpret(case):
  case = dataclasses.replace(case, bias=True)
  state, x, g, bias = _inputs(case, seed=7)
  ct = g.astype(jnp.float32)
  (val, (dx, db)) = _grads(x, state, bias, ct, "interpret")
  (ref_val, (ref_dx, ref_db)) = _grads(x, state, bias, ct, "xla")
  tol = TOL[jnp.dtype(case.dtype)]
  np.testing.assert_allclose(float(val), float(ref_val), rtol=tol, atol=tol * x.size ** 0.5)
  _assert_close(dx, ref_dx, case.dtype)
  _assert_close(db, ref_db, case.dtype)


@pytest.mark.parametrize("config", [Config("dq_dot", block_n=32, block_k=64),
                                    Config("gemm", block_m=16, block_n=32, block_k=64,
                                           split_k=2),
                                    Config("gemv", block_n=32, block_k=64)],
                         ids=["dq_dot", "gemm-split", "gemv"])
def test_bias_joins_the_product_before_rounding_interpret(config):
  # A bias that cancels the product leaves a small output: rounded once (float32 product +
  # bias, then bf16) it is within a bf16 ulp of the exact value; a 16-bit product rounded
  # before the bias is added would be off by up to an ulp of the (much larger) product.
  rng = np.random.default_rng(5)
  state = jq.quantize_4bit(rng.standard_normal((64, 128)).astype(np.float32), 64, False, "nf4",
                           backend="xla")
  arrays, wkw = _weight(state)
  x = jnp.asarray(rng.standard_normal((1, 128)), jnp.bfloat16)
  layout = api._layout(state.shape, 64, None, 64)
  weights = _decode.operands(*arrays, None, layout, x.dtype)
  w = np.asarray(_dequant.dequantize(weights, x.dtype, layout=layout, config=Config(
      "dq_dot", block_n=32, block_k=64), interpret=True), np.float64)  # the kernels' decode
  product = np.asarray(x, np.float64) @ w.T
  bias = jnp.asarray(0.3 - product[0], jnp.bfloat16)
  exact = product + np.asarray(bias, np.float64)
  assert np.abs(product).max() > 8 and np.abs(exact).max() < 1
  y = api.matmul_4bit(x, *arrays, bias, config=config, interpret=True, **wkw)
  np.testing.assert_allclose(np.asarray(y, np.float64), exact, rtol=2**-8, atol=1e-4)


def test_unsupported_shapes_fall_back_to_reference():
  rng = np.random.default_rng(3)
  w = rng.standard_normal((24, 100)).astype(np.float32)  # K = 100: not a multiple of 64
  state = jq.quantize_4bit(w, 64, True, "nf4", backend="xla")
  x = jnp.asarray(rng.standard_normal((5, 100)), jnp.float32)
  arrays, wkw = _weight(state)
  assert not api.kernel_supports(x, *arrays, **wkw)
  assert _dispatch.select("matmul_4bit", "interpret", x, *arrays, None, **wkw) == "xla"
  y = jq.matmul_4bit(x, state, backend="interpret")
  np.testing.assert_allclose(np.asarray(y), np.asarray(
      reference.matmul_4bit(x, *arrays, **wkw)), rtol=1e-6, atol=1e-6)
  ok = jq.quantize_4bit(rng.standard_normal((24, 128)).astype(np.float32), 64, False, "fp4")
  arrays, wkw = _weight(ok)
  x = jnp.ones((2, 128), jnp.float32)
  assert api.kernel_supports(x, *arrays, **wkw)
  assert not api.kernel_supports(x, *arrays, jnp.ones((23,)), **wkw)  # bias of wrong size
  assert not api.kernel_supports(x.astype(jnp.int32), *arrays, **wkw)
  assert not api.grad_supports(jnp.ones((2, 23)), *arrays, **wkw)


def test_tuning_choices_are_valid_and_cached():
  assert not _tuning.valid(Config("gemm", block_k=96), 4, 64, 192, 64)  # not a power of 2
  assert not _tuning.valid(Config("gemm", block_k=128), 4, 64, 192, 64)  # 128 ∤ 192
  assert not _tuning.valid(Config("gemv", block_k=64, split_k=4), 1, 64, 192, 64)
  assert not _tuning.valid(Config("gemm", block_m=8), 4, 64, 128, 64)  # dot needs >= 16
  for m in (1, 3, 8, 9, 100, 4096):
    for n, k, bs in ((72, 320, 64), (8192, 8192, 64), (2048, 5632, 128), (96, 256, 256)):
      fwd = _tuning.forward_config(m, n, k, bs, jnp.bfloat16)
      assert _tuning.valid(fwd, m, n, k, bs), (m, n, k, bs, fwd)
      assert fwd is _tuning.forward_config(m, n, k, bs, jnp.bfloat16)
      assert _tuning.valid(_tuning.grad_config(m, n, k, bs, jnp.bfloat16), m, n, k, bs)
  if _tuning.TABLE_PATH.exists():
    for device, ops in json.loads(_tuning.TABLE_PATH.read_text()).items():
      for op, entries in ops.items():
        for key, entry in entries.items():
          m, n, k, bs, _ = key.split(",")
          cfg = Config.from_json(entry)
          assert _tuning.valid(cfg, int(m), int(n), int(k), int(bs)), (device, op, key)



def test_pair_decode_not_chosen_without_multi_result_asm(monkeypatch):
  # On a jax whose Triton lowering lacks the several-result inline asm, the pair decode would
  # fail to lower: the tuning must fall back to the one-result decode instead.
  monkeypatch.setattr(_tuning, "_CACHE", {})
  assert _tuning.forward_config(1, 8192, 8192, 64, jnp.bfloat16).pairs  # the heuristic's choice
  monkeypatch.setattr(_tuning, "_CACHE", {})
  monkeypatch.setattr(_tuning._pairs, "MULTI_RESULT_ASM", False)
  for m in (1, 16):
    cfg = _tuning.forward_config(m, 8192, 8192, 64, jnp.bfloat16)
    assert not (cfg.pairs or cfg.prefetch or cfg.x_reuse), cfg
    assert _tuning.valid(cfg, m, 8192, 8192, 64)

@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernels_match_reference_gpu(case):
  for seed in (11, 12):  # fresh inputs twice: a race or stale tile would show
    _check_case(case, seed=seed, poison=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=IDS)
@jax.default_matmul_precision("highest")
def test_dispatch_runs_the_kernels_gpu(case):
  state, x, g, bias = _inputs(case, seed=21)
  arrays, wkw = _weight(state)
  fwd = lambda x: jq.matmul_4bit(x, state, bias, backend="pallas")  # noqa: E731

  def grad_op(g):
    return _dispatch.call("matmul_4bit_grad_input", "pallas", g, *arrays, **wkw)

  # value and gradient, so that neither kernel is dead code in the program
  both = jax.value_and_grad(lambda x: jnp.sum(fwd(x).astype(jnp.float32) * g))
  n_fwd = count_pallas_calls(fwd, x, name="jaxquant_matmul_4bit_")
  n_grad = count_pallas_calls(grad_op, g, name="jaxquant_matmul_4bit_")
  assert n_fwd >= 1 and n_grad >= 1
  assert count_pallas_calls(both, x, name="jaxquant_matmul_4bit_") >= n_fwd + n_grad
  _assert_close(jax.jit(fwd)(x), reference.matmul_4bit(x, *arrays, bias, **wkw), case.dtype)
  _assert_close(jax.jit(both)(x)[1], reference.matmul_4bit_grad_input(g, *arrays, **wkw),
                case.dtype)
