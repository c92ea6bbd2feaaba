"""Bad input raises ValueError/TypeError at trace time naming the argument, the value and
what is accepted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

W = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: jq.quantize_4bit(W, blocksize=48), ValueError, r"blocksize must be one of .*got 48"),
    (lambda: jq.quantize_4bit(W, blocksize=16), ValueError, r"blocksize must be one of .*got 16"),
    (lambda: jq.quantize_4bit(W, quant_type="int4"), ValueError, r"quant_type must be one of .*'int4'"),
    (lambda: jq.quantize_4bit(W.astype(np.int32)), TypeError, r"x must have dtype in .*got int32"),
    (lambda: jq.quantize_4bit(np.zeros((0, 4), np.float32)), ValueError, r"x must not be empty"),
    (lambda: jq.quantize_4bit(W, compress_statistics=1), TypeError, r"compress_statistics must be a bool"),
    (lambda: jq.quantize_blockwise(W, blocksize=32), ValueError, r"blocksize must be one of .*got 32"),
    (lambda: jq.quantize_blockwise(W, code=np.zeros(255, np.float32)), ValueError, r"code must have shape \(256,\).*\(255,\)"),
    (lambda: jq.quantize_blockwise(W, code=np.zeros(256, np.int32)), TypeError, r"code must have dtype"),
    (lambda: jq.dequantize_4bit(jq.quantize_blockwise(W)), ValueError, r"state.quant_type must be one of \('nf4', 'fp4'\), got 'blockwise8'"),
    (lambda: jq.dequantize_4bit(W), TypeError, r"state must be a QuantState, got ndarray"),
    (lambda: jq.dequantize_4bit(jq.quantize_nf4(W), dtype=jnp.int8), TypeError, r"dtype must be a float dtype .*got int8"),
    (lambda: jq.matmul_4bit(np.ones((3, 63), np.float32), jq.quantize_nf4(W)), ValueError, r"x.shape\[-1\] must equal the weight's in_features 64"),
    (lambda: jq.matmul_4bit(np.ones((3, 64), np.float32), jq.quantize_nf4(W), np.ones(15, np.float32)), ValueError, r"bias must have shape \(16,\), got \(15,\)"),
    (lambda: jq.matmul_4bit(np.ones((3, 64), np.int32), jq.quantize_nf4(W)), TypeError, r"x must have dtype"),
    (lambda: jq.matmul_4bit(np.ones((3, 64), np.float32), jq.quantize_nf4(W[0])), ValueError, r"2-D \(out_features, in_features\) weight"),
    (lambda: jq.quantize_int8(W[0]), ValueError, r"w must have rank 2"),
    (lambda: jq.quantize_int8(W * 1e5), ValueError, r"beyond float16's range"),
    (lambda: jq.int8_linear(np.ones((2, 60), np.float32), jq.quantize_int8(W)), ValueError, r"x.shape\[-1\] must equal"),
    (lambda: jq.int8_linear(np.ones((2, 64), np.float32), jq.quantize_int8(W), threshold=-1.0), ValueError, r"threshold must be a float >= 0.*-1.0"),
    (lambda: jq.int8_linear(np.ones((2, 64), np.float32), jq.quantize_nf4(W)), ValueError, r"state.quant_type must be one of \('int8_rowwise',\), got 'nf4'"),
    (lambda: jq.int8_vectorwise_dequant(np.ones((2, 4), np.int8), np.ones((3,), np.float32)), ValueError, r"row_stats must have shape \(2,\)"),
    (lambda: jq.quantize_4bit(W, backend="cuda"), ValueError, r"backend must be one of .*'cuda'"),
])
def test_bad_input(call, exc, match):
  with pytest.raises(exc, match=match):
    call()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_rejected_outside_jit(bad):
  w = W.copy()
  w[3, 5] = bad
  with pytest.raises(ValueError, match=r"x contains 1 non-finite value\(s\) \(first at index \(3, 5\)"):
    jq.quantize_4bit(w)
  with pytest.raises(ValueError, match="non-finite"):
    jq.quantize_blockwise(w)
  with pytest.raises(ValueError, match="w contains 1 non-finite"):
    jq.quantize_int8(w)


def test_non_finite_under_jit_is_documented_behaviour():
  """Under jit values are abstract: a NaN makes its block's absmax NaN and takes code 0,
  exactly as bitsandbytes' CUDA kernel does; other blocks are unaffected."""
  w = W.copy()
  w[0, 0] = np.nan
  state = jax.jit(lambda w: jq.quantize_4bit(w, 64, False, "nf4"))(w)
  absmax = np.asarray(state.absmax).ravel()
  assert np.isnan(absmax[0]) and np.all(np.isfinite(absmax[1:]))
  assert int(np.asarray(state.data)[0, 0]) >> 4 == 0
  deq = np.asarray(jq.dequantize_4bit(state))
  np.testing.assert_allclose(deq[1:], np.asarray(jq.dequantize_4bit(jq.quantize_nf4(W)))[1:])
