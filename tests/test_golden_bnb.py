"""The jnp references against bitsandbytes' CUDA vectors (tests/data/bnb/).

Packed bytes, 8-bit codes and absmax must be identical; dequantized values equal to float32
rounding. One stated exception: the double-quantization offset is ``mean(absmax)``, which
bitsandbytes computes with a CUDA tree reduction whose summation order we do not reproduce, so
our offset (and hence the nested scale) may differ from its by a few float32 ulps; the nested
codes are identical, and given bitsandbytes' offset the nested scales and the dequantized
tensor are identical too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from tests.helpers import golden

WEIGHTS = ("w0", "w1", "w2")
QTYPES = ("nf4", "fp4")
BLOCKSIZES = (64, 128, 256)


def _case(w, qt, bs, dq):
  g = golden("bnb_4bit")
  return g, f"{w}_{qt}_bs{bs}_dq{dq}"


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("qt", QTYPES)
@pytest.mark.parametrize("bs", BLOCKSIZES)
def test_quantize_4bit_bytes(w, qt, bs):
  g, key = _case(w, qt, bs, 0)
  state = jq.quantize_4bit(g[w], blocksize=bs, quant_type=qt)
  np.testing.assert_array_equal(np.asarray(state.data).ravel(), g[f"{key}_packed"])
  np.testing.assert_array_equal(np.asarray(state.absmax).ravel(), g[f"{key}_absmax"])
  np.testing.assert_array_equal(np.asarray(state.code).view(np.uint32),
                                g[f"{key}_code"].view(np.uint32))
  deq = jq.dequantize_4bit(state)
  np.testing.assert_array_equal(np.asarray(deq), g[f"{key}_deq"])


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize("qt", QTYPES)
@pytest.mark.parametrize("bs", BLOCKSIZES)
def test_quantize_4bit_double_quant(w, qt, bs):
  g, key = _case(w, qt, bs, 1)
  state = jq.quantize_4bit(g[w], blocksize=bs, quant_type=qt, compress_statistics=True)
  assert state.nested and state.nested_blocksize == int(g[f"{key}_nested_blocksize"])
  np.testing.assert_array_equal(np.asarray(state.data).ravel(), g[f"{key}_packed"])
  np.testing.assert_array_equal(np.asarray(state.nested_code), g[f"{key}_nested_code"])
  # Offset and nested scales: same values up to the summation order of the mean.
  np.testing.assert_allclose(np.asarray(state.offset), g[f"{key}_offset"], rtol=4 * 2.0**-24)
  np.testing.assert_array_equal(np.asarray(state.absmax).ravel(), g[f"{key}_absmax_q"])
  # absmax - offset inherits the offset's rounding as an absolute error.
  np.testing.assert_allclose(np.asarray(state.nested_absmax), g[f"{key}_nested_absmax"],
                             rtol=0, atol=4 * np.spacing(g[f"{key}_offset"]))
  np.testing.assert_allclose(np.asarray(jq.dequantize_4bit(state)), g[f"{key}_deq"],
                             rtol=2.0**-22, atol=8 * np.spacing(g[f"{key}_offset"]))
  # Given bitsandbytes' offset, the nested quantization is byte-identical and so is the
  # dequantized tensor.
  absmax = g[f"{key.replace('dq1', 'dq0')}_absmax"]
  nested = jq.quantize_blockwise(absmax - g[f"{key}_offset"], blocksize=256)
  np.testing.assert_array_equal(np.asarray(nested.data), g[f"{key}_absmax_q"])
  np.testing.assert_array_equal(np.asarray(nested.absmax), g[f"{key}_nested_absmax"])
  bnb_state = state.replace(offset=jnp.asarray(g[f"{key}_offset"]),
                            nested_absmax=nested.absmax)
  np.testing.assert_array_equal(np.asarray(jq.dequantize_4bit(bnb_state)), g[f"{key}_deq"])


@pytest.mark.parametrize("x", ("x0", "x1", "x2"))
@pytest.mark.parametrize("bs", (256, 4096))
def test_quantize_blockwise_bytes(x, bs):
  g = golden("bnb_blockwise8")
  state = jq.quantize_blockwise(g[x], blocksize=bs)
  np.testing.assert_array_equal(np.asarray(state.data), g[f"{x}_bs{bs}_q"])
  np.testing.assert_array_equal(np.asarray(state.absmax).ravel(), g[f"{x}_bs{bs}_absmax"])
  np.testing.assert_array_equal(np.asarray(jq.dequantize_blockwise(state)), g[f"{x}_bs{bs}_deq"])


@pytest.mark.parametrize("name,threshold", [("rowwise", 0.0), ("thr6", 6.0)])
def test_int8_vectorwise_quant(name, threshold):
  # bitsandbytes' CUDA kernel quantizes float16 activations.
  g = golden("bnb_int8")
  q, stats, outlier_cols = jq.int8_vectorwise_quant(g["a"].astype(np.float16), threshold=threshold)
  np.testing.assert_array_equal(np.asarray(q), g[f"a_{name}_q"])
  np.testing.assert_array_equal(np.asarray(stats), g[f"a_{name}_scale"])
  if threshold:
    np.testing.assert_array_equal(np.nonzero(np.asarray(outlier_cols))[0], g["a_thr6_outlier_cols"])
  else:
    assert not np.asarray(outlier_cols).any()


def test_int8_vectorwise_dequant():
  g = golden("bnb_int8")
  deq = jq.int8_vectorwise_dequant(jnp.asarray(g["a_rowwise_q"]), jnp.asarray(g["a_rowwise_scale"]))
  a16 = g["a"].astype(np.float16).astype(np.float32)
  # one int8 step of the row scale
  step = g["a_rowwise_scale"][:, None] / 127
  assert np.all(np.abs(np.asarray(deq) - a16) <= 0.5 * step + 1e-6)


@pytest.mark.parametrize("threshold", (0, 6))
def test_int8_linear_matches_linear8bitlt(threshold):
  """jaxquant's LLM.int8() vs bitsandbytes' Linear8bitLt(256->64) outputs.

  With float16 inputs as bitsandbytes uses: threshold 0 is identical; with outliers the
  16-bit outlier product is accumulated in a different order, so the tolerance is one float16
  ulp of the largest output (|y| < 16 → 2**-6)."""
  from safetensors.numpy import load_file
  from tests.helpers import BNB
  g = golden("bnb_int8")
  sd = load_file(str(BNB / f"bnb_linear8bit_thr{threshold}_state.safetensors"))
  state = jq.quantize_int8(g["w"])
  # Our weight state against the checkpoint: SCB identical; int8 values identical except where
  # bitsandbytes' approximate division (__fdividef) rounds the other way (at most 1 code).
  np.testing.assert_array_equal(np.asarray(state.absmax), sd["SCB"])
  diff = np.abs(np.asarray(state.data).astype(int) - sd["weight"].astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
  bnb_state = state.replace(data=jnp.asarray(sd["weight"]))
  x = jnp.asarray(g[f"linear8bit_thr{threshold}_x"].astype(np.float16))
  y = jax.jit(lambda x: jq.int8_linear(x, bnb_state, jnp.asarray(sd["bias"]), threshold=float(threshold)))(x)
  assert y.dtype == jnp.float16
  ref = g[f"linear8bit_thr{threshold}_y"]
  atol = 0.0 if threshold == 0 else 2.0**-6
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=0, atol=atol)
