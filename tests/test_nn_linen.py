"""Linen: the quantized layers, quantize_model on the variables of an unchanged module,
QLoRA fine-tuning under jax.jit with Optax, merge / save / load of the adapters."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import jaxquant
import jaxquant.nn as jqnn
from tests.helpers import rel_error
from tests.test_nn_convert import chain_tol, inputs, tokens


class MLP(nn.Module):
  """Shapes shared with the NNX tests (d=128, hidden=256)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(256, name="up")(x))
    x = nn.relu(nn.Dense(128, name="down")(x))
    return nn.Dense(128, name="out")(x)


class Block(nn.Module):
  d: int = 128
  heads: int = 4
  ffn: int = 256
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    dense = functools.partial(nn.Dense, param_dtype=self.param_dtype)
    h = nn.LayerNorm(param_dtype=self.param_dtype)(x)
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    q, k, v = (split(dense(d, name=n)(h)) for n in ("query", "key", "value"))
    att = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + dense(d, name="out")(att.reshape(b, t, d))
    h = nn.gelu(dense(self.ffn, name="up")(nn.LayerNorm(param_dtype=self.param_dtype)(x)))
    return x + dense(d, name="down")(h)


class LM(nn.Module):
  """Embedding, one block, final norm, output head tied to the embedding."""
  vocab: int = 128
  d: int = 128
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(self.vocab, self.d, param_dtype=self.param_dtype, name="embed")
    h = Block(self.d, param_dtype=self.param_dtype, name="block")(embed(ids))
    return embed.attend(nn.LayerNorm(param_dtype=self.param_dtype)(h))


# One jitted function per model (modules are hashable dataclasses): a new jax.jit wrapper
# would trace and compile the same program again.
@functools.cache
def _jitted(model, what):
  fns = {"init": model.init, "apply": model.apply,
         "quantized": functools.partial(jqnn.quantized_apply, model)}
  return jax.jit(fns[what])


def _init(model, x, seed=0):
  return _jitted(model, "init")(jax.random.key(seed), x)


def _apply(model):
  return _jitted(model, "quantized")


@pytest.mark.parametrize("layer,kw", [
    (jqnn.Dense4bit, dict(quant_type="nf4")), (jqnn.Dense4bit, dict(quant_type="fp4")),
    (jqnn.Dense8bitLt, dict(threshold=3.0))])
def test_dense_layers_are_dropins(layer, kw):
  x = inputs()
  ref_model = nn.Dense(256, bias_init=nn.initializers.normal(0.1))
  ref_vars = ref_model.init(jax.random.key(0), x)
  model = layer(256, bias_init=nn.initializers.normal(0.1), **kw)
  variables = model.init(jax.random.key(0), x)
  assert set(variables) == {"params", "quantized"}
  assert set(variables["params"]) == {"bias"}  # the kernel lives only quantized
  np.testing.assert_array_equal(variables["params"]["bias"], ref_vars["params"]["bias"])
  state = variables["quantized"]["kernel"]
  assert isinstance(state, jaxquant.QuantState) and state.shape == (256, 128)
  # the kernel drawn is nn.Dense's draw, quantized in torch layout
  want = (jaxquant.quantize_int8(ref_vars["params"]["kernel"].T) if layer is jqnn.Dense8bitLt
          else jaxquant.quantize_4bit(ref_vars["params"]["kernel"].T, 64, True, kw["quant_type"]))
  np.testing.assert_array_equal(state.data, want.data)
  y = model.apply(variables, x)
  assert y.dtype == jnp.float32
  assert rel_error(y, ref_model.apply(ref_vars, x)) < chain_tol(kw.get("quant_type", "int8"), 1)
  grads = jax.grad(lambda p: jnp.sum(model.apply({**variables, "params": p}, x) ** 2))(
      variables["params"])
  assert set(grads) == {"bias"}


@pytest.mark.parametrize("layer,fmt", [(jqnn.Embed4bit, "nf4"), (jqnn.Embed8bit, "int8")])
def test_embed_layers_are_dropins(layer, fmt):
  ids = jnp.array([[1, 5, 127], [0, 0, 7]])
  ref_model = nn.Embed(128, 128)
  ref_vars = ref_model.init(jax.random.key(0), ids)
  model = layer(128, 128, **({"quant_type": "nf4"} if fmt == "nf4" else {}))
  variables = model.init(jax.random.key(0), ids)
  assert set(variables) == {"quantized"}
  out = model.apply(variables, ids)
  assert out.shape == (2, 3, 128) and out.dtype == jnp.float32
  assert rel_error(out, ref_model.apply(ref_vars, ids)) < chain_tol(fmt, 1)
  q = inputs()
  assert rel_error(model.apply(variables, q, method="attend"),
                   ref_model.apply(ref_vars, q, method="attend")) < chain_tol(fmt, 1)


def test_stable_embed():
  model = jqnn.StableEmbed(40, 32, dtype=jnp.bfloat16)
  ids = jnp.arange(10)
  variables = model.init(jax.random.key(0), ids)
  out = model.apply(variables, ids)
  assert out.dtype == jnp.bfloat16 and out.shape == (10, 32)
  np.testing.assert_allclose(np.asarray(out, np.float32).mean(-1), 0, atol=2e-2)
  assert set(variables["params"]) == {"embedding", "norm"}


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_variables_of_unchanged_module(bits):
  model = LM(param_dtype=jnp.bfloat16)
  ids = tokens()
  variables = _init(model, ids)
  ref = _jitted(model, "apply")(variables, ids).astype(jnp.float32)
  cfg = (jqnn.QuantConfig(load_in_4bit=True, quant_type="nf4", double_quant=True) if bits == 4
         else jqnn.QuantConfig(load_in_8bit=True))
  qvars, summary = jqnn.quantize_model(variables, cfg, return_summary=True)
  assert sorted(r.name for r in summary.layers) == sorted(
      ["embed"] + [f"block.{n}" for n in ("query", "key", "value", "out", "up", "down")])
  assert "kernel" not in qvars["params"]["block"]["query"]
  assert "embedding" in variables["params"]["embed"]  # the input is not modified
  ratio = jqnn.memory_footprint(qvars) / jqnn.memory_footprint(variables)
  assert ratio <= (0.30 if bits == 4 else 0.55)
  logits = _apply(model)(qvars, ids)
  assert logits.dtype == jnp.bfloat16
  assert rel_error(logits.astype(jnp.float32), ref) < chain_tol(
      "nf4" if bits == 4 else "int8", 8) + 0.01
  back = jqnn.dequantize_model(qvars)
  assert "quantized" not in back and back["params"]["embed"]["embedding"].dtype == jnp.bfloat16
  assert rel_error(_jitted(model, "apply")(back, ids).astype(jnp.float32),
                   logits.astype(jnp.float32)) < (0.02 if bits == 4 else chain_tol("int8", 8))


def test_qlora_finetune_linen_under_jit(tmp_path):
  """The user's Linen model (Dense + Embed): quantize_model on its variables, LoRA adapters,
  a jitted Optax step on the adapters alone; the module code is never changed."""
  model = LM(param_dtype=jnp.bfloat16)
  ids = tokens((4, 16))
  variables = _init(model, ids)
  qvars = jqnn.quantize_model(variables, jqnn.QuantConfig(
      load_in_4bit=True, quant_type="nf4", double_quant=True, compute_dtype=jnp.bfloat16))
  qvars = jqnn.add_lora(qvars, jqnn.LoraConfig(
      r=8, alpha=16, target_modules=["query", "value", "up", "down", "embed"]), rngs=0)
  lora = qvars["lora"]
  frozen = {k: v for k, v in qvars.items() if k != "lora"}
  tx = optax.adam(1e-2)
  opt_state = tx.init(lora)

  def loss_fn(lora, ids):
    logits = jqnn.quantized_apply(model, {**frozen, "lora": lora}, ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), ids[:, 1:]).mean()

  @jax.jit
  def train_step(lora, opt_state, ids):
    loss, grads = jax.value_and_grad(loss_fn)(lora, ids)
    updates, opt_state = tx.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  losses = []
  for _ in range(12):
    lora, opt_state, loss = train_step(lora, opt_state, ids)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0], losses
  tuned = {**frozen, "lora": lora}

  # adapters alone to disk and back
  jqnn.save_lora(tmp_path / "lora", tuned)
  fresh = jqnn.add_lora(frozen, jqnn.LoraConfig(
      r=8, alpha=16, target_modules=["query", "value", "up", "down", "embed"]), rngs=5)
  assert not _same_leaves(fresh["lora"], lora)
  loaded = jqnn.load_lora(tmp_path / "lora", fresh)
  assert _same_leaves(loaded["lora"], lora) and set(loaded) == set(tuned)

  # merge into re-quantized weights, or into float ones
  y_tuned = _apply(model)(tuned, ids).astype(jnp.float32)
  merged = jqnn.merge_lora(tuned)
  assert "lora" not in merged
  assert isinstance(merged["quantized"]["block"]["query"]["kernel"], jqnn.LinenQuantWeight)
  y_merged = _apply(model)(merged, ids).astype(jnp.float32)
  assert rel_error(y_merged, y_tuned) < chain_tol("nf4", 5)
  dense = jqnn.merge_lora(tuned, dequantize=True)
  assert "query" not in dense["quantized"]["block"]
  adapter = lora["block"]["query"]["adapter"]
  state = frozen["quantized"]["block"]["query"]["kernel"].state
  want = (jaxquant.dequantize_4bit(state, jnp.float32).T
          + adapter.lora_a @ adapter.lora_b * adapter.scaling)
  np.testing.assert_allclose(np.asarray(dense["params"]["block"]["query"]["kernel"], np.float32),
                             want, rtol=1e-2, atol=1e-2)  # stored in bfloat16


def _same_leaves(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                  strict=True))


def test_linen_lora_dropout_and_gradient_masks():
  model = MLP()
  x = inputs()
  qvars = jqnn.quantize_model(_init(model, x), jqnn.QuantConfig(load_in_8bit=True))
  variables = jqnn.add_lora(qvars, jqnn.LoraConfig(r=4, dropout=0.5,
                                                   target_modules="all-linear"))
  lora = jax.tree.map(lambda a: a + 0.1, variables["lora"])
  variables = {**variables, "lora": lora}
  apply = _apply(model)
  a = apply(variables, x)
  np.testing.assert_array_equal(a, apply(variables, x))
  b = apply(variables, x, rngs={"dropout": jax.random.key(1)})
  assert float(jnp.abs(a - b).max()) > 0

  # gradients over params and adapters together: lora_mask picks the adapters, and an
  # optax.masked optimizer leaves everything else alone
  trainable = {"params": variables["params"], "lora": lora}
  grads = jax.jit(jax.grad(lambda t: jnp.sum(apply({**variables, **t}, x))))(trainable)
  assert set(grads["params"]["up"]) == {"bias"}  # the quantized kernel gets none
  mask = jqnn.lora_mask(grads)
  assert all(jax.tree.leaves(mask["lora"])) and not any(jax.tree.leaves(mask["params"]))
  masked = optax.masked(optax.sgd(1.0), jqnn.lora_mask)
  updates, _ = masked.update(grads, masked.init(trainable), trainable)
  for u, g in zip(jax.tree.leaves(updates["params"]), jax.tree.leaves(grads["params"])):
    np.testing.assert_array_equal(u, g)  # passed through, never an SGD step
  assert all(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates["lora"]))
  with pytest.raises(TypeError):
    jax.grad(lambda q: 0.0)(variables["quantized"])  # integer codes are not differentiable


def test_linen_layers_take_lora_and_other_layers_are_refused():
  class WithGeneral(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.DenseGeneral(128, name="general")(x)  # a 2-D kernel, but not an nn.Dense
      x = nn.MultiHeadDotProductAttention(num_heads=2, name="mha")(x[:, None, :])[:, 0]
      return jqnn.Dense4bit(256, name="q4")(nn.Dense(128, name="dense")(x))

  model = WithGeneral()
  x = inputs()
  variables = _init(model, x)
  qvars, summary = jqnn.quantize_model(variables, jqnn.QuantConfig(load_in_8bit=True),
                                       return_summary=True)
  skipped = dict(summary.skipped)
  assert "mha.query" in skipped and "not a 2-D Dense kernel" in skipped["mha.query"]
  with pytest.raises(ValueError, match=r"DenseGeneral at 'general'.*skip_modules"):
    jqnn.quantized_apply(model, qvars, x)
  # skipping it works; the jaxquant layer takes an adapter too
  qvars = jqnn.quantize_model(variables, jqnn.QuantConfig(load_in_8bit=True,
                                                          skip_modules=["general"]))
  lvars = jqnn.add_lora(qvars, jqnn.LoraConfig(r=2, target_modules=["q4"]))
  assert lvars["lora"]["q4"]["adapter"].lora_a.shape == (128, 2)
  np.testing.assert_allclose(jqnn.quantized_apply(model, lvars, x),
                             jqnn.quantized_apply(model, qvars, x), rtol=1e-6)


def test_linen_bad_configs():
  model = MLP()
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((2, 96)))
  with pytest.raises(ValueError, match=r"blocksize=64 does not divide in_features=96 of layer "
                                       r"'up'"):
    jqnn.quantize_model(variables, jqnn.QuantConfig(load_in_4bit=True))
  with pytest.raises(ValueError, match=r"target_modules entry 'attn' matches no layer.*'out'"):
    jqnn.add_lora(variables, jqnn.LoraConfig(target_modules=["attn"]))
  with pytest.raises(ValueError, match="no LoRA adapters"):
    jqnn.merge_lora(variables)
  with pytest.raises(TypeError, match="module must be a flax.linen Module"):
    jqnn.quantized_apply(lambda x: x, variables, jnp.ones((2, 96)))
