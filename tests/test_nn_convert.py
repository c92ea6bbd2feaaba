"""quantize_model on NNX models built with Flax: an MLP, a transformer block with attention
and an MLP, an embedding with a tied output head. Also the small architectures the other nn
tests import."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant.nn as jqnn
from tests.helpers import rel_error


# The nn tests share these shapes (d=128, hidden=256, vocab=128) so that each quantizer and
# initializer is compiled once for the whole run.
class MLP(nnx.Module):
  def __init__(self, d=128, hidden=256, *, rngs, param_dtype=jnp.float32):
    self.up = nnx.Linear(d, hidden, param_dtype=param_dtype, rngs=rngs)
    self.down = nnx.Linear(hidden, d, param_dtype=param_dtype, rngs=rngs)
    self.out = nnx.Linear(d, d, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.down(jax.nn.relu(self.up(x)))))


class Block(nnx.Module):
  """Pre-norm transformer block: causal multi-head attention and a GELU MLP."""

  def __init__(self, d=128, heads=4, ffn=256, *, rngs, param_dtype=jnp.float32):
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.heads = heads
    self.norm1 = nnx.LayerNorm(d, **kw)
    self.query, self.key, self.value, self.out = (nnx.Linear(d, d, **kw) for _ in range(4))
    self.norm2 = nnx.LayerNorm(d, **kw)
    self.up = nnx.Linear(d, ffn, **kw)
    self.down = nnx.Linear(ffn, d, **kw)

  def __call__(self, x):
    b, t, d = x.shape
    h = self.norm1(x)
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    att = jax.nn.dot_product_attention(split(self.query(h)), split(self.key(h)),
                                       split(self.value(h)), is_causal=True)
    x = x + self.out(att.reshape(b, t, d))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TinyLM(nnx.Module):
  """Token embedding, one block, final norm and an output head tied to the embedding."""

  def __init__(self, vocab=128, d=128, *, rngs, param_dtype=jnp.float32):
    self.embed = nnx.Embed(vocab, d, param_dtype=param_dtype, rngs=rngs)
    self.block = Block(d, rngs=rngs, param_dtype=param_dtype)
    self.norm = nnx.LayerNorm(d, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, ids):
    return self.embed.attend(self.norm(self.block(self.embed(ids))))


def inputs(shape=(4, 128), seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


def tokens(shape=(2, 12), vocab=128, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


# Forward passes run compiled: eager mode would compile every op of every model separately.
forward = nnx.jit(lambda model, x: model(x))

# Relative output error of a whole converted model: each quantized matmul adds an independent
# error of ~0.1 (NF4) / ~0.12 (FP4) / ~0.01 (LLM.int8) relative to its output, so a chain of
# L of them is off by about sqrt(L) times that.
def chain_tol(fmt, n_layers):
  return {"nf4": 0.11, "fp4": 0.14, "int8": 0.012}[fmt] * np.sqrt(n_layers)


def test_mlp_4bit_in_place():
  model = MLP(rngs=nnx.Rngs(0))
  x = inputs()
  ref = forward(model, x)
  out, summary = jqnn.quantize_model(
      model, jqnn.QuantConfig(load_in_4bit=True, quant_type="nf4"), return_summary=True)
  assert out is model
  assert all(isinstance(m, jqnn.Linear4bit) for m in (model.up, model.down, model.out))
  y = forward(model, x)
  assert rel_error(y, ref) < chain_tol("nf4", 3)
  # exactly the float model with the dequantized weights (up to float32 rounding)
  np.testing.assert_allclose(model(x), y, rtol=1e-5, atol=1e-5)
  jqnn.dequantize_model(model)
  assert type(model.down) is nnx.Linear
  np.testing.assert_allclose(forward(model, x), y, rtol=1e-5, atol=1e-5)
  assert sorted(r.name for r in summary.layers) == ["down", "out", "up"]
  # nf4, blocksize 64, float32 absmax: 0.5 + 4/64 bytes per weight, plus a 16-entry float32
  # codebook per layer
  n = 2 * 128 * 256 + 128 * 128
  assert summary.bytes_after == n // 2 + 4 * n // 64 + 3 * 64
  assert summary.ratio_vs_bf16 == pytest.approx(summary.bytes_after / (2 * n))
  assert summary.bytes_before == 4 * summary.params


@pytest.mark.parametrize("bits", [4, 8])
def test_tied_lm_conversion_and_memory(bits):
  """A bf16 model: whole-model weight memory <= 0.30x (4-bit) / <= 0.55x (8-bit)."""
  model = TinyLM(rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
  ids = tokens()
  ref = forward(model, ids).astype(jnp.float32)
  before = jqnn.memory_footprint(model)
  cfg = (jqnn.QuantConfig(load_in_4bit=True, quant_type="nf4", double_quant=True)
         if bits == 4 else jqnn.QuantConfig(load_in_8bit=True))
  _, summary = jqnn.quantize_model(model, cfg, return_summary=True)
  after = jqnn.memory_footprint(model)
  assert after / before <= (0.30 if bits == 4 else 0.55)
  assert len(summary.layers) == 7  # embed + q, k, v, o + up, down
  assert isinstance(model.embed, jqnn.Embedding4bit if bits == 4 else jqnn.Embedding8bit)
  logits = forward(model, ids)
  assert logits.dtype == jnp.bfloat16 and logits.shape == (2, 12, 128)
  # 8 quantized matmuls (lookup, q, k, v, o, up, down, tied head) plus bfloat16 rounding
  assert rel_error(logits.astype(jnp.float32), ref) < chain_tol("nf4" if bits == 4 else "int8",
                                                                8) + 0.01


def test_transformer_block_skip_modules_and_dtypes():
  block = Block(rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (2, 8, 128))
  ref = forward(block, x)
  cfg = jqnn.QuantConfig(load_in_4bit=True, quant_type="nf4", compute_dtype=jnp.bfloat16,
                         skip_modules=("out", r"(query|key)", "no_such_layer"))
  _, summary = jqnn.quantize_model(block, cfg, return_summary=True)
  assert type(block.out) is nnx.Linear and type(block.query) is nnx.Linear
  assert type(block.key) is nnx.Linear
  assert isinstance(block.value, jqnn.Linear4bit) and block.value.compute_dtype == jnp.bfloat16
  assert {n for n, _ in summary.skipped} == {"out", "query", "key"}
  assert summary.unused_skip_patterns == ("no_such_layer",)
  y = forward(block, x)
  # value, up, down quantized; bfloat16 compute adds ~0.004 per matmul
  assert y.dtype == jnp.float32 and rel_error(y, ref) < chain_tol("nf4", 3)


def test_containers_and_shared_layers():
  """Layers inside nnx.Sequential / nnx.List / nnx.Dict / nnx.data lists are found and
  replaced in their container; a layer referenced twice is converted once."""

  class Stack(nnx.Module):
    def __init__(self, rngs):
      lin = lambda: nnx.Linear(128, 128, rngs=rngs)
      self.seq = nnx.Sequential(lin(), jax.nn.relu, lin())
      self.layers = nnx.List([lin(), lin()])
      self.plain = nnx.data([lin()])
      self.named = nnx.Dict(a=lin())
      self.tied = self.layers[0]

    def __call__(self, x):
      for layer in (self.seq, *self.layers, self.plain[0], self.named["a"], self.tied):
        x = layer(x)
      return x

  model = Stack(nnx.Rngs(0))
  x = inputs()
  ref = forward(model, x)
  _, summary = jqnn.quantize_model(model, jqnn.QuantConfig(load_in_8bit=True),
                                   return_summary=True)
  assert sorted(r.name for r in summary.layers) == [
      "layers.0", "layers.1", "named.a", "plain.0", "seq.layers.0", "seq.layers.2"]
  assert model.tied is model.layers[0] and isinstance(model.tied, jqnn.Linear8bitLt)
  assert all(isinstance(m, jqnn.Linear8bitLt) for m in
             (model.seq.layers[0], model.seq.layers[2], model.plain[0], model.named["a"]))
  assert rel_error(forward(model, x), ref) < chain_tol("int8", 7)
  jqnn.add_lora(model, jqnn.LoraConfig(r=2, target_modules=[r"seq\..*", "layers.1"]))
  assert [n for n, _ in jqnn.lora_modules(model)] == ["layers.1", "seq.layers.0",
                                                      "seq.layers.2"]


def test_summary_progress_and_dequantize(capsys):
  model = MLP(rngs=nnx.Rngs(0))
  x = inputs()
  jqnn.quantize_model(model, jqnn.QuantConfig(load_in_8bit=True, llm_int8_threshold=0.0),
                      progress=True, verbose=True)
  captured = capsys.readouterr()
  assert "3 layers" in captured.out and "x of bfloat16" in captured.out
  assert "quantizing" in captured.err and "3/3" in captured.err  # the tqdm bar
  assert model.up.threshold == 0.0
  y_q = forward(model, x)
  ref = forward(jqnn.dequantize_model(model), x)
  assert type(model.up) is nnx.Linear
  # only the int8 rounding of the activations separates them
  assert rel_error(y_q, ref) < chain_tol("int8", 3)


def test_bad_configs():
  with pytest.raises(ValueError, match="both given"):
    jqnn.QuantConfig(load_in_4bit=True, load_in_8bit=True)
  with pytest.raises(ValueError, match="both False"):
    jqnn.QuantConfig()
  with pytest.raises(ValueError, match=r"quant_type must be one of \('nf4', 'fp4'\), got 'int4'"):
    jqnn.QuantConfig(load_in_4bit=True, quant_type="int4")
  with pytest.raises(ValueError, match="blocksize must be one of"):
    jqnn.QuantConfig(load_in_4bit=True, blocksize=48)
  with pytest.raises(TypeError, match="compute_dtype"):
    jqnn.QuantConfig(load_in_4bit=True, compute_dtype=jnp.int8)
  with pytest.raises(ValueError, match="llm_int8_threshold"):
    jqnn.QuantConfig(load_in_8bit=True, llm_int8_threshold=-1)
  with pytest.raises(ValueError, match=r"quant_type='nf4', blocksize=128 apply to load_in_4bit"):
    jqnn.QuantConfig(load_in_8bit=True, quant_type="nf4", blocksize=128)
  with pytest.raises(ValueError, match="llm_int8_threshold=3.0 applies to load_in_8bit"):
    jqnn.QuantConfig(load_in_4bit=True, llm_int8_threshold=3.0)
  cfg = jqnn.QuantConfig(load_in_8bit=True)
  assert cfg.llm_int8_threshold == 6.0 and cfg.quant_type is None
  model = nnx.eval_shape(lambda: MLP(d=96, rngs=nnx.Rngs(0)))  # validation needs no values
  with pytest.raises(ValueError, match=r"blocksize=64 does not divide in_features=96 of layer "
                                       r"'up'.*use blocksize in \(32,\)"):
    jqnn.quantize_model(model, jqnn.QuantConfig(load_in_4bit=True))
  assert type(model.up) is nnx.Linear and type(model.down) is nnx.Linear  # nothing changed
  with pytest.raises(ValueError, match="no layer to convert"):
    jqnn.quantize_model(model, jqnn.QuantConfig(load_in_8bit=True, skip_modules=".*"))
  with pytest.raises(TypeError, match="QuantConfig"):
    jqnn.quantize_model(model, {"load_in_4bit": True})
  with pytest.raises(TypeError, match="model must be"):
    jqnn.quantize_model([1, 2], jqnn.QuantConfig(load_in_8bit=True))
