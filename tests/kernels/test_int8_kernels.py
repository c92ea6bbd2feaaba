"""int8 kernels (row-wise quantization with outlier columns, w8a8 GEMM with fused dequant and
outlier epilogue, weight-only int8, input gradient) against the jnp references.

CPU: the kernels run in the Pallas interpreter on small ragged shapes. GPU (``-m gpu``): the
same kernels compiled, on outputs whose memory was poisoned first, with the kernel's name
checked in the lowered program. Every test draws fresh random inputs; activations carry
planted outlier columns.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant import _dispatch
from jaxquant.functional import int8_matmul, int8_weight_only_linear
from pallas_kernels.int8_matmul import gemm, linear, reference, weight_only
from tests.helpers import count_pallas_calls, rel_error

M_VALUES = (1, 7, 64, 512)
K, N = 200, 136  # ragged against every block size used on the CPU


def _rng(request) -> np.random.Generator:
  return np.random.default_rng(abs(hash(request.node.name)) % 2**32)


def _activations(rng, m, k, dtype=jnp.bfloat16, outlier_cols=3, threshold=6.0):
  """Standard normal rows with ``outlier_cols`` columns holding |x| >= threshold in some rows."""
  x = rng.standard_normal((m, k)).astype(np.float32)
  cols = rng.choice(k, size=outlier_cols, replace=False)
  for c in cols:
    rows = rng.random(m) < 0.5
    rows[rng.integers(m)] = True
    x[rows, c] = np.sign(rng.standard_normal(rows.sum())) * (threshold + 4 * rng.random(rows.sum()))
  return jnp.asarray(x, dtype), np.sort(cols)


def _weight(rng, n, k):
  w = jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.float32)
  return jq.quantize_int8(w)


def _close(out, ref, tol):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  assert np.all(np.isfinite(out)), "unwritten (NaN-poisoned) or non-finite outputs"
  err = rel_error(out, ref)
  assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


# ---------------------------------------------------------------- interpret mode (CPU, CI)


@pytest.mark.parametrize("m", M_VALUES)
def test_quant_kernel_finds_outliers(request, m):
  rng = _rng(request)
  x, planted = _activations(rng, m, K)
  q, stats, cols = linear.int8_vectorwise_quant(x, threshold=6.0, interpret=True)
  rq, rstats, rcols = reference.int8_vectorwise_quant(x, threshold=6.0)
  np.testing.assert_array_equal(np.nonzero(np.asarray(cols))[0], planted)
  np.testing.assert_array_equal(cols, rcols)
  np.testing.assert_array_equal(stats, rstats)
  np.testing.assert_array_equal(q, rq)


def test_quant_kernel_without_threshold(request):
  rng = _rng(request)
  x = jnp.asarray(rng.standard_normal((2, 3, K)) * 3, jnp.float16)
  q, stats, cols = linear.int8_vectorwise_quant(x, threshold=0.0, interpret=True)
  rq, rstats, _ = reference.int8_vectorwise_quant(x)
  assert q.shape == x.shape and stats.shape == (2, 3) and not np.any(cols)
  np.testing.assert_array_equal(stats, rstats)
  np.testing.assert_array_equal(q, rq)


GEMM_CONFIGS = {
    1: gemm.GemmConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=2),
    7: gemm.GemmConfig(block_m=16, block_n=32, block_k=128, group_m=1, num_warps=4),
    64: gemm.GemmConfig(block_m=32, block_n=64, block_k=64, group_m=2, num_warps=4),
    512: gemm.GemmConfig(block_m=128, block_n=64, block_k=64, group_m=4, num_warps=4),
}


@pytest.mark.parametrize("m", M_VALUES)
def test_gemm_kernel_fused_epilogue(request, m):
  rng = _rng(request)
  x, _ = _activations(rng, m, K, outlier_cols=0)
  a_q, a_stats, _ = reference.int8_vectorwise_quant(x)
  state = _weight(rng, N, K)
  bias = jnp.asarray(rng.standard_normal(N), jnp.bfloat16)
  out_dtype = jnp.float32 if m in (1, 64) else jnp.bfloat16
  y = gemm.int8_gemm(a_q, a_stats, state.data, state.absmax, bias, out_dtype=out_dtype,
                     interpret=True, config=GEMM_CONFIGS[m])
  ref = reference.int8_scaled_matmul(a_q, a_stats, state.data, state.absmax, bias,
                                     out_dtype=out_dtype)
  assert y.dtype == out_dtype and y.shape == (m, N)
  _close(y, ref, 1e-6 if out_dtype == jnp.float32 else 4e-3)


def test_gemm_kernel_outlier_epilogue(request):
  rng = _rng(request)
  m, c = 64, 32
  a_q = jnp.asarray(rng.integers(-127, 128, (m, K)), jnp.int8)
  a_stats = jnp.asarray(rng.random(m) * 4, jnp.float32)
  state = _weight(rng, N, K)
  x_out = jnp.asarray(rng.standard_normal((m, c)) * 8, jnp.float16)
  w_out = jnp.asarray(rng.standard_normal((N, c)) * 0.05, jnp.float16)
  y = gemm.int8_gemm(a_q, a_stats, state.data, state.absmax, None, x_out, w_out,
                     out_dtype=jnp.float32, interpret=True, config=GEMM_CONFIGS[64])
  ref = reference.int8_scaled_matmul(a_q, a_stats, state.data, state.absmax,
                                     out_dtype=jnp.float32)
  ref = ref + jnp.dot(x_out.astype(jnp.float32), w_out.astype(jnp.float32).T)
  _close(y, ref, 1e-6)


def test_llm_int8_linear_all_three_paths(request):
  """One compiled program, three data-dependent paths: outliers within the gathered slots,
  none, and more outlier columns than slots (reference fallback)."""
  rng = _rng(request)
  m = 7
  state = _weight(rng, N, K)
  bias = jnp.asarray(rng.standard_normal(N), jnp.bfloat16)
  for outliers in (5, 0, linear.outlier_capacity(K) + 2):
    x, _ = _activations(rng, m, K, outlier_cols=outliers)
    y = jq.int8_linear(x, state, bias, threshold=6.0, backend="interpret")
    ref = jq.int8_linear(x, state, bias, threshold=6.0, backend="xla")
    assert y.dtype == jnp.bfloat16
    _close(y, ref, 4e-3)
    assert np.mean(np.asarray(y) == np.asarray(ref)) > 0.97


def test_w8a8_linear_threshold_zero(request):
  rng = _rng(request)
  x, _ = _activations(rng, 512, K, outlier_cols=0)
  state = _weight(rng, N, K)
  y = jq.int8_linear(x.reshape(4, 128, K), state, threshold=0.0, backend="interpret")
  ref = jq.int8_linear(x.reshape(4, 128, K), state, threshold=0.0, backend="xla")
  assert y.shape == (4, 128, N)
  _close(y, ref, 4e-3)


WEIGHT_ONLY_CONFIGS = {
    1: weight_only.WeightOnlyConfig(block_m=16, block_n=32, block_k=64, split_k=2),
    7: weight_only.WeightOnlyConfig(block_m=16, block_n=64, block_k=128, bit_decode=False),
    64: weight_only.WeightOnlyConfig(block_m=32, block_n=64, block_k=64, w_lhs=False),
    512: None,
}


@pytest.mark.parametrize("m", M_VALUES)
def test_weight_only_kernel(request, m):
  rng = _rng(request)
  dtype = jnp.float16 if m == 7 else jnp.bfloat16
  x, _ = _activations(rng, m, K, dtype=dtype)
  state = _weight(rng, N, K)
  bias = jnp.asarray(rng.standard_normal(N), dtype) if m != 64 else None
  y = weight_only.weight_only_matmul(x, state.data, state.absmax, bias, interpret=True,
                                     config=WEIGHT_ONLY_CONFIGS[m])
  ref = reference.int8_weight_only_linear(x, state.data, state.absmax, bias)
  assert y.dtype == dtype and y.shape == (m, N)
  _close(y, ref, 4e-3)


@pytest.mark.parametrize("m", (7, 512))
def test_grad_input_kernel(request, m):
  rng = _rng(request)
  g = jnp.asarray(rng.standard_normal((m, N)), jnp.bfloat16)
  state = _weight(rng, N, K)
  dx = weight_only.grad_input_matmul(g, state.data, state.absmax, interpret=True)
  ref = reference.int8_linear_grad_input(g, state.data, state.absmax)
  assert dx.dtype == g.dtype and dx.shape == (m, K)
  _close(dx, ref, 4e-3)


def test_int8_layers_train_through(request):
  """Gradients to the input and bias through the kernels equal the reference's and
  ``dy @ dequant(W)``."""
  rng = _rng(request)
  x, _ = _activations(rng, 7, K)
  state = _weight(rng, N, K)
  bias = jnp.asarray(rng.standard_normal(N), jnp.bfloat16)
  w_deq = reference.int8_vectorwise_dequant(state.data, state.absmax)
  for layer in (lambda x, b, be: jq.int8_linear(x, state, b, threshold=6.0, backend=be),
                lambda x, b, be: int8_weight_only_linear(x, state, b, backend=be)):
    def loss(x, b, be, layer=layer):
      return jnp.sum(jnp.sin(layer(x, b, be).astype(jnp.float32)))
    dx, db = jax.grad(loss, argnums=(0, 1))(x, bias, "interpret")
    rdx, rdb = jax.grad(loss, argnums=(0, 1))(x, bias, "xla")
    _close(dx, rdx, 1e-2)
    _close(db, rdb, 1e-2)
    g = jnp.cos(layer(x, bias, "xla").astype(jnp.float32))
    _close(dx, g @ w_deq, 2e-2)


def test_int8_matmul_entry_point(request):
  rng = _rng(request)
  x, _ = _activations(rng, 6, K, outlier_cols=0)
  a_q, a_stats, _ = jq.int8_vectorwise_quant(x.reshape(2, 3, K))
  state = _weight(rng, N, K)
  bias = jnp.asarray(rng.standard_normal(N), jnp.float32)
  y = int8_matmul(a_q, a_stats, state, bias, dtype=jnp.float32, backend="interpret")
  ref = int8_matmul(a_q, a_stats, state, bias, dtype=jnp.float32, backend="xla")
  assert y.shape == (2, 3, N) and y.dtype == jnp.float32
  _close(y, ref, 1e-6)
  # w8a8 of the quantized rows is LLM.int8() without outliers.
  _close(y.astype(jnp.bfloat16),
         jq.int8_linear(x.reshape(2, 3, K), state, bias, threshold=0.0, backend="xla"), 4e-3)


def test_unsupported_inputs_fall_back_to_the_reference(request):
  rng = _rng(request)
  state = _weight(rng, N, K)
  x32 = jnp.asarray(rng.standard_normal((3, K)), jnp.float32)
  args = (x32, state.data, state.absmax, None)
  assert _dispatch.select("int8_weight_only_linear", "interpret", *args) == "xla"
  assert _dispatch.select("int8_linear", "interpret", *args, threshold=6.0) == "xla"
  assert _dispatch.select("int8_linear", "interpret", *args, threshold=0.0) == "interpret"
  y = int8_weight_only_linear(x32, state, backend="interpret")
  np.testing.assert_array_equal(y, reference.int8_weight_only_linear(*args))
  # Row counts where XLA's fused product measured faster than the kernels.
  big = jnp.zeros((weight_only.MAX_KERNEL_M + 1, K), jnp.bfloat16)
  assert _dispatch.select("int8_weight_only_linear", "interpret", big, *args[1:]) == "xla"
  g = jnp.zeros((weight_only.MAX_GRAD_M + 1, N), jnp.bfloat16)
  assert _dispatch.select("int8_linear_grad_input", "interpret", g, *args[1:3]) == "xla"
  assert _dispatch.select("int8_linear_grad_input", "interpret", g[:8], *args[1:3]) == "interpret"


def test_bad_inputs_are_rejected(request):
  rng = _rng(request)
  state = _weight(rng, N, K)
  a_q = jnp.zeros((4, K), jnp.int8)
  stats = jnp.ones((4,), jnp.float32)
  with pytest.raises(TypeError, match="a_q must have dtype in \\(int8\\)"):
    int8_matmul(a_q.astype(jnp.float32), stats, state)
  with pytest.raises(ValueError, match="a_stats must have shape \\(4,\\)"):
    int8_matmul(a_q, jnp.ones((5,), jnp.float32), state)
  with pytest.raises(ValueError, match="a_q.shape\\[-1\\] must equal the weight's in_features"):
    int8_matmul(a_q[:, :-1], stats, state)
  with pytest.raises(ValueError, match="bias must have shape"):
    int8_matmul(a_q, stats, state, jnp.ones((3,), jnp.float32))
  with pytest.raises(TypeError, match="dtype must be a float dtype"):
    int8_matmul(a_q, stats, state, dtype=jnp.int32)
  with pytest.raises(TypeError, match="state must be a QuantState"):
    int8_weight_only_linear(jnp.ones((2, K), jnp.bfloat16), state.data)
  with pytest.raises(ValueError, match="x.shape\\[-1\\] must equal"):
    int8_weight_only_linear(jnp.ones((2, K + 1), jnp.bfloat16), state)
  with pytest.raises(ValueError, match="GemmConfig.block_n must be a power of two"):
    gemm.int8_gemm(a_q, stats, state.data, state.absmax, interpret=True,
                   config=gemm.GemmConfig(block_n=48))


# ---------------------------------------------------------------- compiled (GPU)

GPU_K, GPU_N = 1000, 776  # ragged against the tiles


def _poison(*structs):
  """Fill, then free, buffers the size of the coming outputs, so memory the kernel fails to
  write reads back as NaN (floats) or -128 (int8, never produced by the quantizer)."""
  for shape, dtype in structs:
    fill = -128 if jnp.dtype(dtype) == jnp.int8 else jnp.nan
    for _ in range(3):
      jnp.full(shape, fill, dtype).block_until_ready().delete()


@pytest.mark.gpu
@pytest.mark.parametrize("m", M_VALUES)
def test_gpu_quant_kernel(request, m):
  rng = _rng(request)
  x, planted = _activations(rng, m, GPU_K)
  fn = jax.jit(lambda x: linear.int8_vectorwise_quant(x, threshold=6.0))
  assert count_pallas_calls(fn, x, name="jaxquant_int8_rowwise_quant") >= 1
  fn(x)
  _poison(((m, GPU_K), jnp.int8), ((m,), jnp.float32))
  q, stats, cols = fn(x)
  rq, rstats, rcols = reference.int8_vectorwise_quant(x, threshold=6.0)
  np.testing.assert_array_equal(np.nonzero(np.asarray(cols))[0], planted)
  np.testing.assert_array_equal(cols, rcols)
  np.testing.assert_array_equal(stats, rstats)
  diff = np.abs(np.asarray(q, np.int32) - np.asarray(rq, np.int32))
  assert diff.max() <= 1 and np.mean(diff) < 1e-3  # GPU division may differ by an ulp


@pytest.mark.gpu
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("threshold", (0.0, 6.0))
def test_gpu_int8_linear(request, m, threshold):
  rng = _rng(request)
  x, _ = _activations(rng, m, GPU_K, outlier_cols=4)
  state = _weight(rng, GPU_N, GPU_K)
  bias = jnp.asarray(rng.standard_normal(GPU_N), jnp.bfloat16)
  fn = jax.jit(lambda x: jq.int8_linear(x, state, bias, threshold=threshold, backend="pallas"))
  assert count_pallas_calls(fn, x, name="jaxquant_int8_gemm") >= 1
  fn(x)
  _poison(((m, GPU_N), jnp.bfloat16))
  y = fn(x)
  _close(y, jq.int8_linear(x, state, bias, threshold=threshold, backend="xla"), 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("m", M_VALUES)
def test_gpu_int8_matmul(request, m):
  rng = _rng(request)
  a_q = jnp.asarray(rng.integers(-127, 128, (m, GPU_K)), jnp.int8)
  a_stats = jnp.asarray(rng.random(m) * 4, jnp.float32)
  state = _weight(rng, GPU_N, GPU_K)
  fn = jax.jit(lambda a, s: int8_matmul(a, s, state, dtype=jnp.float32, backend="pallas"))
  assert count_pallas_calls(fn, a_q, a_stats, name="jaxquant_int8_gemm") >= 1
  fn(a_q, a_stats)
  _poison(((m, GPU_N), jnp.float32))
  y = fn(a_q, a_stats)
  _close(y, int8_matmul(a_q, a_stats, state, dtype=jnp.float32, backend="xla"), 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", (jnp.bfloat16, jnp.float16))
def test_gpu_weight_only_and_grad(request, m, dtype):
  rng = _rng(request)
  x, _ = _activations(rng, m, GPU_K, dtype=dtype)
  state = _weight(rng, GPU_N, GPU_K)
  bias = jnp.asarray(rng.standard_normal(GPU_N), dtype)
  fn = jax.jit(lambda x: int8_weight_only_linear(x, state, bias, backend="pallas"))
  calls = count_pallas_calls(fn, x, name="jaxquant_int8_weight_only")
  assert calls >= 1 if m <= weight_only.MAX_KERNEL_M else calls == 0  # large M: XLA is faster
  fn(x)
  _poison(((m, GPU_N), dtype))
  y = fn(x)
  _close(y, int8_weight_only_linear(x, state, bias, backend="xla"), 4e-3)
  configs = [weight_only.WeightOnlyConfig(block_m=16, block_n=64, block_k=128, split_k=4),
             weight_only.WeightOnlyConfig(block_m=64, block_n=128, block_k=64, w_lhs=True)]
  for cfg in configs:
    y = weight_only.weight_only_matmul(x, state.data, state.absmax, bias, config=cfg)
    _close(y, int8_weight_only_linear(x, state, bias, backend="xla"), 4e-3)
  g = jnp.asarray(rng.standard_normal((m, GPU_N)), dtype)
  grad = jax.jit(lambda g: weight_only.grad_input_matmul(g, state.data, state.absmax))
  assert count_pallas_calls(grad, g, name="jaxquant_int8_grad_input") >= 1
  grad(g)
  _poison(((m, GPU_K), dtype))
  _close(grad(g), reference.int8_linear_grad_input(g, state.data, state.absmax), 4e-3)


@pytest.mark.gpu
def test_gpu_auto_backend_picks_the_kernels(request):
  rng = _rng(request)
  x, _ = _activations(rng, 16, GPU_K)
  state = _weight(rng, GPU_N, GPU_K)
  args = (x, state.data, state.absmax, None)
  assert _dispatch.select("int8_linear", None, *args, threshold=6.0) == "pallas"
  assert _dispatch.select("int8_weight_only_linear", None, *args) == "pallas"
  dx = jax.grad(lambda x: jnp.sum(jq.int8_linear(x, state, threshold=6.0).astype(jnp.float32)))
  _close(dx(x), jnp.ones((16, GPU_N), jnp.float32) @ reference.int8_vectorwise_dequant(
      state.data, state.absmax), 1e-2)
