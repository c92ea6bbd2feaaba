"""NNX quantized layers: drop-in behaviour against nnx.Linear / nnx.Embed, frozen weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant
import jaxquant.nn as jqnn
from tests.helpers import rel_error

# Relative Frobenius error of a layer output against the float layer, per format (a random
# Gaussian weight; NF4's expected error is ~0.1, FP4's ~0.12, LLM.int8's ~0.01).
TOL = {"nf4": 0.13, "fp4": 0.16, "int8": 0.02}


def _x(shape, seed=1, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_linear4bit_matches_linear(quant_type, double_quant):
  ref = nnx.Linear(128, 256, rngs=nnx.Rngs(0))
  layer = jqnn.Linear4bit.from_linear(ref, quant_type=quant_type, double_quant=double_quant)
  x = _x((3, 4, 128))
  y, y_ref = layer(x), ref(x)
  assert y.shape == (3, 4, 256) and y.dtype == jnp.float32
  assert rel_error(y, y_ref) < TOL[quant_type]
  # the forward is exactly the functional op on the transposed kernel
  state = jaxquant.quantize_4bit(ref.kernel[...].T, 64, double_quant, quant_type)
  np.testing.assert_array_equal(layer.quant_state.data, state.data)
  want = jaxquant.matmul_4bit(x, state, ref.bias[...])
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


def test_linear4bit_constructor_is_dropin():
  """Same arguments as nnx.Linear; the drawn kernel is quantized, the bias kept."""
  kw = dict(use_bias=True, param_dtype=jnp.float32, rngs=nnx.Rngs(3),
            kernel_init=nnx.initializers.lecun_normal(),
            bias_init=nnx.initializers.constant(0.5))
  ref = nnx.Linear(128, 256, **kw)
  layer = jqnn.Linear4bit(128, 256, quant_type="nf4", **{**kw, "rngs": nnx.Rngs(3)})
  np.testing.assert_array_equal(layer.bias[...], ref.bias[...])
  x = _x((4, 128))
  assert rel_error(layer(x), ref(x)) < TOL["nf4"]
  # the kernel drawn is nnx.Linear's draw, quantized in torch layout
  want = jaxquant.quantize_4bit(ref.kernel[...].T, 64, True, "nf4")
  np.testing.assert_array_equal(layer.quant_state.data, want.data)
  nobias = jqnn.Linear4bit(128, 256, use_bias=False, rngs=nnx.Rngs(0))
  assert nobias.bias is None and nobias(x).shape == (4, 256)


def test_linear8bit_matches_linear():
  ref = nnx.Linear(128, 256, rngs=nnx.Rngs(0))
  for threshold in (0.0, 2.0):
    layer = jqnn.Linear8bitLt.from_linear(ref, threshold=threshold)
    x = _x((4, 128)) * 1.5
    assert rel_error(layer(x), ref(x)) < TOL["int8"]
    want = jaxquant.int8_linear(x, jaxquant.quantize_int8(ref.kernel[...].T), ref.bias[...],
                                threshold)
    np.testing.assert_allclose(layer(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,param_dtype,compute_dtype", [
    (None, jnp.bfloat16, None), (jnp.bfloat16, jnp.float32, None),
    (None, jnp.float32, jnp.bfloat16)])
def test_output_dtype_follows_nnx_rules(dtype, param_dtype, compute_dtype):
  ref = nnx.Linear(128, 256, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  x = _x((4, 128))
  for layer in (jqnn.Linear4bit.from_linear(ref, compute_dtype=compute_dtype),
                jqnn.Linear8bitLt.from_linear(ref, compute_dtype=compute_dtype)):
    assert layer(x).dtype == ref(x).dtype


def test_preferred_element_type():
  for use_bias in (True, False):
    ref = nnx.Linear(128, 256, use_bias=use_bias, preferred_element_type=jnp.bfloat16,
                     rngs=nnx.Rngs(0))
    layer = jqnn.Linear4bit.from_linear(ref)
    assert layer(_x((4, 128))).dtype == ref(_x((4, 128))).dtype


def test_quantized_weight_is_frozen():
  """The QuantState is not a Param: no gradient, not in nnx.state(model, nnx.Param)."""
  layer = jqnn.Linear4bit(128, 256, rngs=nnx.Rngs(0))
  assert isinstance(layer.kernel, jqnn.QuantizedWeight)
  params = nnx.state(layer, nnx.Param)
  assert [tuple(path) for path, _ in params.flat_state()] == [("bias",)]
  x = _x((4, 128))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == 1 and leaves[0].shape == (256,)
  # gradients still flow to the input through the frozen weight
  gx = jax.grad(lambda x: jnp.sum(layer(x)))(x)
  assert float(jnp.abs(gx).sum()) > 0


@pytest.mark.parametrize("bits,quant_type", [(4, "nf4"), (4, "fp4"), (8, None)])
def test_embeddings_lookup_and_attend(bits, quant_type):
  ref = nnx.Embed(128, 128, rngs=nnx.Rngs(0))
  emb = (jqnn.Embedding4bit.from_embed(ref, quant_type=quant_type) if bits == 4
         else jqnn.Embedding8bit.from_embed(ref))
  ids = jnp.array([[0, 3, 127], [7, 7, 1]])
  tol = TOL[quant_type or "int8"]
  out = emb(ids)
  assert out.shape == (2, 3, 128) and out.dtype == ref(ids).dtype
  assert rel_error(out, ref(ids)) < tol
  # rows equal the dequantized table
  np.testing.assert_allclose(out[1, 0], emb.dequantize().embedding[...][7], rtol=1e-6)
  q = _x((4, 128))
  assert rel_error(emb.attend(q), ref.attend(q)) < tol
  with pytest.raises(ValueError, match="integer"):
    emb(jnp.ones((2,), jnp.float32))


def test_stable_embedding():
  emb = jqnn.StableEmbedding(30, 16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  ids = jnp.arange(6)
  out = emb(ids)
  assert out.shape == (6, 16) and out.dtype == jnp.bfloat16
  f32 = np.asarray(out, np.float32)
  np.testing.assert_allclose(f32.mean(-1), 0, atol=2e-2)
  np.testing.assert_allclose(f32.std(-1), 1, atol=2e-2)
  assert isinstance(emb.embedding, nnx.Param)  # trainable, float


def test_layers_under_jit_and_split_merge():
  layer = jqnn.Linear4bit(128, 256, quant_type="nf4", rngs=nnx.Rngs(0))
  x = _x((4, 128))
  graphdef, state = nnx.split(layer)
  y = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  np.testing.assert_allclose(y, layer(x), rtol=1e-5, atol=1e-6)
  y2 = nnx.jit(lambda m, x: m(x))(layer, x)
  np.testing.assert_allclose(y2, layer(x), rtol=1e-5, atol=1e-6)


def test_bad_layer_arguments():
  with pytest.raises(ValueError, match=r"blocksize=64 does not divide in_features=100"):
    jqnn.Linear4bit(100, 8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="quant_type"):
    jqnn.Linear4bit(64, 8, quant_type="int4", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="threshold"):
    jqnn.Linear8bitLt(64, 8, threshold=-1.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="blocksize=128 does not divide features=64"):
    jqnn.Embedding4bit(10, 64, blocksize=128, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="dot_general must be left at its default"):
    jqnn.Linear8bitLt(64, 8, dot_general=lambda *a, **k: None, rngs=nnx.Rngs(0))
  # the defaults nnx.Linear passes are accepted, so its constructor arguments carry over
  jax.eval_shape(lambda: jqnn.Linear4bit(64, 8, dot_general=jax.lax.dot_general,
                                         rngs=nnx.Rngs(0)))
