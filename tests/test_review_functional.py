"""Regression tests from the review of the functional ops (each failed before its fix)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

RNG = np.random.default_rng(0)
W = (RNG.standard_normal((16, 64)) / 8).astype(np.float32)


@pytest.mark.parametrize("const", [np.asarray, jnp.asarray], ids=["numpy", "jax"])
def test_quantize_int8_of_a_constant_inside_jit(const):
  """A weight closed over by a jitted function is concrete: quantize_int8 checks its range
  instead of failing with a ConcretizationTypeError, and gives the eager bytes."""
  w = const(W)
  x = jnp.asarray(RNG.standard_normal((3, 64)), jnp.float32)
  y = jax.jit(lambda x: jq.int8_linear(x, jq.quantize_int8(w), threshold=0.0))(x)
  np.testing.assert_array_equal(np.asarray(y),
                                np.asarray(jq.int8_linear(x, jq.quantize_int8(W), threshold=0.0)))
  big = const(W * 1e6)
  with pytest.raises(ValueError, match="beyond float16's range"):
    jax.jit(lambda x: jq.int8_linear(x, jq.quantize_int8(big)))(x)


@pytest.mark.parametrize("threshold", [np.float32(6.0), np.float16(6.0), np.int64(6)])
def test_int8_threshold_accepts_numpy_scalars(threshold):
  x = jnp.asarray(RNG.standard_normal((4, 64)) * 4, jnp.float32)
  state = jq.quantize_int8(W)
  np.testing.assert_array_equal(np.asarray(jq.int8_linear(x, state, threshold=threshold)),
                                np.asarray(jq.int8_linear(x, state, threshold=6.0)))
  q, _, cols = jq.int8_vectorwise_quant(x, threshold)
  np.testing.assert_array_equal(np.asarray(cols), np.asarray(jq.int8_vectorwise_quant(x, 6.0)[2]))


def test_matmul_4bit_double_quant_weight_equals_dequantize_under_jit():
  """The double-quantized absmax is decoded with two roundings, as bitsandbytes and
  dequantize_4bit do, also when XLA fuses the matmul (no FMA contraction): the product with
  the identity is exactly the dequantized weight."""
  w = RNG.standard_normal((64, 256)).astype(np.float32)
  state = jq.quantize_4bit(w, 64, True, "nf4")
  eye = jnp.eye(256, dtype=jnp.float32)
  got = np.asarray(jax.jit(jq.matmul_4bit)(eye, state)).T
  np.testing.assert_array_equal(got, np.asarray(jq.dequantize_4bit(state)))
  g = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(jq.matmul_4bit(x, state)[:, 3])))(eye[:1]))
  np.testing.assert_array_equal(g[0], np.asarray(jq.dequantize_4bit(state))[3])


def test_flax_serialization_round_trip():
  """flax.serialization.to_bytes / from_bytes (Linen checkpoints) take trees holding
  QuantStates: the bytes come back into the template's metadata; a template of another
  layout is refused."""
  from flax import serialization
  tree = {"q4": jq.quantize_4bit(W, 32, True, "nf4"), "q8": jq.quantize_int8(W),
          "b8": jq.quantize_blockwise(W, blocksize=64), "bias": jnp.arange(3.0)}
  blob = serialization.to_bytes(tree)
  template = jax.tree.map(jnp.zeros_like, tree)
  back = serialization.from_bytes(template, blob)
  for name in ("q4", "q8", "b8"):
    assert isinstance(back[name], jq.QuantState) and back[name].shape == tree[name].shape
    for a, b in zip(jax.tree.leaves(back[name]), jax.tree.leaves(tree[name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match=r"must hold the arrays .*nested_absmax"):
    serialization.from_bytes({**template, "q4": jq.quantize_4bit(W, 32, False, "nf4")}, blob)
  with pytest.raises(ValueError, match=r"QuantState.data has shape"):
    serialization.from_bytes({**template, "q4": jq.quantize_4bit(W[:8], 32, True, "nf4")}, blob)


def test_quantize_blockwise_rejects_an_unsorted_code():
  """The 8-bit encoder bisects the codebook: an unsorted one gave codes far from the nearest
  value without a word (max error 1.3 instead of 0.02 here)."""
  code = np.asarray(jq.codebooks.dynamic_map(True)).copy()
  shuffled = code[np.random.default_rng(1).permutation(256)]
  with pytest.raises(ValueError, match=r"code must be sorted ascending and finite .*got code\["):
    jq.quantize_blockwise(W, code=shuffled, blocksize=64)
  code[200] = np.nan
  with pytest.raises(ValueError, match=r"code\[199\]=.* and code\[200\]=nan"):
    jq.quantize_blockwise(W, code=code, blocksize=64)


@pytest.mark.parametrize("quantize", [
    lambda bs: jq.quantize_4bit(W, bs), lambda bs: jq.quantize_blockwise(W, blocksize=bs)],
    ids=["4bit", "blockwise8"])
def test_blocksize_must_be_an_integer(quantize):
  """64.0 compared equal to 64 and passed the check, then failed deep in jnp.pad."""
  with pytest.raises(ValueError, match=r"blocksize must be one of .*got 64.0"):
    quantize(64.0)
  state = quantize(np.int64(64))  # a NumPy integer is fine, stored as a Python int
  assert type(state.blocksize) is int and state.blocksize == 64


def test_compress_statistics_accepts_a_numpy_bool():
  state = jq.quantize_4bit(W, 64, np.bool_(True), "nf4")
  assert state.nested and state.nested_blocksize == 256


@pytest.mark.parametrize("op", ["matmul_4bit", "int8_linear", "int8_weight_only_linear"])
def test_linear_ops_take_an_empty_batch(op):
  """No rows (an MoE expert that got no tokens): an empty ``(..., N)`` result and empty/zero
  gradients, as ``jnp.dot`` and bitsandbytes' MatMul4Bit / MatMul8bitLt give; it raised
  'x must not be empty'."""
  state = jq.quantize_nf4(W) if op == "matmul_4bit" else jq.quantize_int8(W)
  fn = getattr(jq, op)
  x = jnp.zeros((2, 0, 64), jnp.bfloat16)
  bias = jnp.ones((16,), jnp.bfloat16)
  y = jax.jit(fn)(x, state, bias)
  assert y.shape == (2, 0, 16) and y.dtype == jnp.bfloat16
  gx, gb = jax.grad(lambda x, b: jnp.sum(fn(x, state, b).astype(jnp.float32)), (0, 1))(x, bias)
  assert gx.shape == x.shape and gb.shape == (16,) and not np.asarray(gb, np.float32).any()
  with pytest.raises(ValueError, match=r"x.shape\[-1\] must equal"):
    fn(jnp.zeros((0, 63), jnp.float32), state)
