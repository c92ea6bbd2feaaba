"""matmul_4bit and int8_linear: values and gradients against the dense product, under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from tests.helpers import TOLERANCES

DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)


def _dense_reference(x, w, bias):
  y = jnp.einsum("...k,nk->...n", x.astype(jnp.float32), w.astype(x.dtype).astype(jnp.float32),
                 precision="highest")
  if bias is not None:
    y = y + bias.astype(jnp.float32).reshape((1,) * (y.ndim - 1) + (-1,))
  return y.astype(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type,blocksize,double_quant",
                         [("nf4", 64, True), ("fp4", 128, False), ("nf4", 32, False)])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
@pytest.mark.parametrize("use_bias", [False, True])
def test_matmul_4bit_value_and_grads(dtype, quant_type, blocksize, double_quant, lead, use_bias):
  rng = np.random.default_rng(0)
  n, k = 48, 256
  w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
  state = jq.quantize_4bit(w, blocksize, double_quant, quant_type)
  w_deq = jq.dequantize_4bit(state, jnp.float32)
  x = jnp.asarray(rng.standard_normal((*lead, 7, k)), dtype)
  bias = jnp.asarray(rng.standard_normal((n,)), dtype) if use_bias else None
  rtol, atol = TOLERANCES[jnp.dtype(dtype)]

  y = jax.jit(jq.matmul_4bit)(x, state, bias)
  assert y.shape == (*lead, 7, n) and y.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(_dense_reference(x, w_deq, bias), np.float32),
                             rtol=rtol, atol=atol * np.sqrt(k))

  ct = jnp.asarray(rng.standard_normal(y.shape), dtype)
  def loss(x, bias, fn):
    return jnp.sum(fn(x, bias).astype(jnp.float32) * ct.astype(jnp.float32))
  grads = jax.jit(jax.grad(lambda x, b: loss(x, b, lambda x, b: jq.matmul_4bit(x, state, b)),
                           argnums=(0, 1) if use_bias else 0))(x, bias)
  ref = jax.grad(lambda x, b: loss(x, b, lambda x, b: _dense_reference(x, w_deq, b)),
                 argnums=(0, 1) if use_bias else 0)(x, bias)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
    assert g.dtype == r.dtype
    scale = np.sqrt(np.prod(ct.shape[:-1])) if g.ndim == 1 else np.sqrt(n)
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                               rtol=rtol, atol=atol * scale)


def test_matmul_4bit_quantization_error_like_bitsandbytes():
  """bitsandbytes' test_matmul_4bit bound: mean |err| vs the float product < 0.115 (nf4)."""
  rng = np.random.default_rng(1)
  k, n = 512, 256
  w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
  x = rng.standard_normal((64, k)).astype(np.float32)
  y = jq.matmul_4bit(x, jq.quantize_nf4(w))
  assert float(np.mean(np.abs(np.asarray(y) - x @ w.T))) < 0.115


def test_weight_gets_no_gradient():
  w = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)
  state = jq.quantize_4bit(w, 64, True, "nf4")
  x = jnp.ones((2, 64))
  g_state = jax.grad(lambda s: jnp.sum(jq.matmul_4bit(x, s)), allow_int=True)(state)
  for leaf in jax.tree.leaves(g_state):
    assert leaf.dtype == jax.dtypes.float0 or not np.asarray(leaf).any()


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_int8_linear_value_and_grad(threshold, dtype):
  rng = np.random.default_rng(3)
  n, k = 32, 128
  w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
  state = jq.quantize_int8(w)
  x = rng.standard_normal((2, 9, k)).astype(np.float32)
  x[..., 7] *= 20  # an outlier column
  x = jnp.asarray(x, dtype)
  bias = jnp.asarray(rng.standard_normal((n,)), dtype)
  y = jax.jit(lambda x, b: jq.int8_linear(x, state, b, threshold=threshold))(x, bias)
  assert y.shape == (2, 9, n) and y.dtype == dtype
  ref = np.asarray(x, np.float32) @ w.T + np.asarray(bias, np.float32)
  rel = np.linalg.norm(np.asarray(y, np.float32) - ref) / np.linalg.norm(ref)
  # int8 activations: ~1% relative error; the outlier path recovers the outlier column.
  assert rel < (0.02 if threshold else 0.05)
  w_deq = np.asarray(jq.int8_vectorwise_dequant(state.data, state.absmax))
  gx, gb = jax.grad(lambda x, b: jnp.sum(jq.int8_linear(x, state, b, threshold).astype(jnp.float32)),
                    argnums=(0, 1))(x, bias)
  assert gx.dtype == dtype and gb.dtype == dtype
  rtol, atol = TOLERANCES[jnp.dtype(dtype)]
  np.testing.assert_allclose(np.asarray(gx, np.float32),
                             np.broadcast_to(w_deq.astype(dtype).astype(np.float32).sum(0), gx.shape),
                             rtol=rtol, atol=atol * np.sqrt(n))
  np.testing.assert_allclose(np.asarray(gb, np.float32), np.full((n,), 18.0), rtol=rtol)


def test_outliers_improve_accuracy():
  rng = np.random.default_rng(4)
  w = (rng.standard_normal((64, 256)) / 16).astype(np.float32)
  x = rng.standard_normal((16, 256)).astype(np.float32)
  x[:, [3, 100]] *= 40
  ref = x @ w.T
  state = jq.quantize_int8(w)
  err = {t: np.linalg.norm(np.asarray(jq.int8_linear(x, state, threshold=t)) - ref) for t in (0.0, 6.0)}
  assert err[6.0] < 0.5 * err[0.0]
