"""LoRA on NNX models: QLoRA fine-tuning under jit with an Optax optimizer, gradients only on
the adapters, merging, saving and loading the adapters alone, bad targets."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxquant.nn as jqnn
from tests.helpers import rel_error
from tests.test_nn_convert import MLP, TinyLM, forward, inputs, tokens

TARGETS = ["query", "value", "up", "down", "embed"]


def _lm_loss(model, ids):
  logits = model(ids[:, :-1]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def _randomize_lora(model, seed=0):
  """Nonzero B so that adapters change outputs (they start at zero)."""
  for i, (_, m) in enumerate(jqnn.lora_modules(model)):
    b = m.lora_b[...]
    m.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(seed + i), b.shape, b.dtype))


def test_qlora_finetune_nnx_under_jit():
  """The user's NNX model (Embed + Linear layers): one quantize_model call, LoRA adapters,
  nnx.Optimizer over the adapters only, a jitted train step."""
  model = TinyLM(rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
  bf16_bytes = jqnn.memory_footprint(model)
  jqnn.quantize_model(model, jqnn.QuantConfig(load_in_4bit=True, quant_type="nf4",
                                              double_quant=True, compute_dtype=jnp.bfloat16))
  assert jqnn.memory_footprint(model) <= 0.30 * bf16_bytes
  frozen_before = jax.tree.map(np.asarray, nnx.state(model))
  jqnn.add_lora(model, jqnn.LoraConfig(r=8, alpha=16, target_modules=TARGETS), rngs=1)
  assert isinstance(model.block.query, jqnn.LoraLinear)
  assert isinstance(model.block.query.base, jqnn.Linear4bit)
  assert isinstance(model.embed, jqnn.LoraEmbed) and type(model.block.key) is jqnn.Linear4bit

  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=jqnn.lora_filter)

  @nnx.jit
  def train_step(model, optimizer, ids):
    diff = nnx.DiffState(0, jqnn.lora_filter)
    loss, grads = nnx.value_and_grad(_lm_loss, argnums=diff)(model, ids)
    optimizer.update(model, grads)
    return loss

  ids = tokens((4, 16))
  losses = [float(train_step(model, optimizer, ids)) for _ in range(12)]
  assert losses[-1] < 0.8 * losses[0], losses
  # only the adapters moved: every quantized state and float param is bit-identical
  flat_after = {tuple(p): v for p, v in nnx.state(model).flat_state()}
  for path, var in frozen_before.flat_state():
    base_path = _wrapped_path(tuple(path), flat_after)
    for got, want in zip(jax.tree.leaves(flat_after[base_path]), jax.tree.leaves(var),
                         strict=True):
      np.testing.assert_array_equal(got, want, err_msg=str(path))
  moved = [m.lora_b[...] for _, m in jqnn.lora_modules(model)]
  assert all(float(jnp.abs(b).max()) > 0 for b in moved)


def _wrapped_path(path, flat):
  """Where a layer's variable lives once the layer is wrapped (``.../base/...``)."""
  if path in flat:
    return path
  for i in range(len(path)):
    candidate = (*path[:i + 1], "base", *path[i + 1:])
    if candidate in flat:
      return candidate
  raise KeyError(path)


def test_gradients_reach_only_lora():
  model = MLP(rngs=nnx.Rngs(0))
  jqnn.quantize_model(model, jqnn.QuantConfig(load_in_8bit=True, skip_modules=["down"]))
  jqnn.add_lora(model, jqnn.LoraConfig(r=4, target_modules="all-linear"))
  _randomize_lora(model)
  x = inputs()
  loss = lambda m: jnp.sum(m(x) ** 2)
  grads = nnx.grad(loss, argnums=nnx.DiffState(0, jqnn.lora_filter))(model)
  names = sorted(p[-1] for p, _ in grads.flat_state())
  assert names == ["lora_a"] * 3 + ["lora_b"] * 3
  assert all(float(jnp.abs(v[...]).sum()) > 0 for _, v in grads.flat_state())
  # gradients w.r.t. every Param: the quantized weights are not among them
  all_grads = nnx.grad(loss)(model)
  assert not any(isinstance(v, jqnn.QuantizedWeight) for _, v in all_grads.flat_state())
  assert any(p[-1] == "bias" for p, _ in all_grads.flat_state())
  # optax.masked with lora_mask over all Params: non-LoRA updates are exactly zero
  params = nnx.state(model, nnx.Param)
  tx = optax.masked(optax.sgd(0.1), jqnn.lora_mask)
  updates, _ = tx.update(all_grads, tx.init(params), params)
  for path, u in updates.flat_state():
    if path[-1] in ("lora_a", "lora_b"):
      assert float(jnp.abs(u[...]).sum()) > 0, path
    else:  # masked out: optax passes the gradient through untouched, never an SGD step
      np.testing.assert_array_equal(u[...], _at(all_grads, path)[...])
  mask = jqnn.lora_mask(params)
  flags = {tuple(p): bool(v.get_value()) for p, v in mask.flat_state()}
  assert flags[("up", "lora_a")] and not flags[("up", "base", "bias")]
  # split/merge with the filter: adapters alone are a small state
  _, lora_state, rest = nnx.split(model, jqnn.lora_filter, ...)
  assert [type(v) for _, v in lora_state.flat_state()] == [nnx.LoRAParam] * 6
  assert sorted(type(v).__name__ for _, v in rest.flat_state()) == (
      ["Param"] * 4 + ["QuantizedWeight"] * 2)  # 3 biases, the float 'down' kernel


def _at(state, path):
  for p in path:
    state = state[p]
  return state


def test_add_lora_keeps_outputs_and_merges():
  x = inputs()
  model = MLP(rngs=nnx.Rngs(0))
  ref = forward(model, x)
  jqnn.add_lora(model, jqnn.LoraConfig(r=4, alpha=8, target_modules=["up", "out"]))
  np.testing.assert_array_equal(forward(model, x), ref)  # B starts at zero
  _randomize_lora(model)
  tuned = forward(model, x)
  assert rel_error(tuned, ref) > 1e-3
  jqnn.merge_lora(model)
  assert type(model.up) is nnx.Linear and not jqnn.lora_modules(model)
  np.testing.assert_allclose(forward(model, x), tuned, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_into_quantized_weights(bits):
  x = inputs()
  model = MLP(rngs=nnx.Rngs(0))
  cfg = (jqnn.QuantConfig(load_in_4bit=True, quant_type="nf4") if bits == 4
         else jqnn.QuantConfig(load_in_8bit=True, llm_int8_threshold=0.0))
  jqnn.quantize_model(model, cfg)
  jqnn.add_lora(model, jqnn.LoraConfig(r=4, target_modules="all-linear"))
  _randomize_lora(model)
  tuned = forward(model, x)
  kind = type(model.up.base)
  dense = jqnn.merge_lora(model, dequantize=True)
  assert type(dense.up) is nnx.Linear
  # the float merge holds the exact sum; the quantized one re-rounds it
  np.testing.assert_allclose(forward(dense, x), tuned, rtol=2e-2 if bits == 8 else 1e-5,
                             atol=2e-2 if bits == 8 else 1e-5)
  requant = jqnn.quantize_model(dense, cfg)
  assert type(requant.up) is kind
  assert rel_error(forward(requant, x), tuned) < (0.2 if bits == 4 else 0.02)


def test_save_and_load_adapters_alone(tmp_path):
  def build():
    model = MLP(rngs=nnx.Rngs(0))
    jqnn.quantize_model(model, jqnn.QuantConfig(load_in_4bit=True, quant_type="nf4"))
    return jqnn.add_lora(model, jqnn.LoraConfig(r=4, target_modules="all-linear"), rngs=7)

  model = build()
  _randomize_lora(model, seed=3)
  x = inputs()
  path = tmp_path / "adapters"
  jqnn.save_lora(path, model)
  size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
  adapter_bytes = sum(a.nbytes for a in jax.tree.leaves(nnx.state(model, jqnn.lora_filter)))
  assert size < adapter_bytes + 64_000  # the adapters plus Orbax/JSON metadata, no base weight
  fresh = build()
  assert rel_error(forward(fresh, x), forward(model, x)) > 1e-3
  jqnn.load_lora(path, fresh)
  np.testing.assert_array_equal(forward(fresh, x), forward(model, x))
  other = MLP(rngs=nnx.Rngs(0))
  jqnn.add_lora(other, jqnn.LoraConfig(r=2, target_modules="all-linear"))
  with pytest.raises(ValueError, match=r"lora_a.*float32\[\d+, 4\].*float32\[\d+, 2\]"):
    jqnn.load_lora(path, other)
  with pytest.raises(ValueError, match="no LoRA adapters"):
    jqnn.load_lora(path, MLP(rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="scaling"):
    jqnn.load_lora(path, jqnn.add_lora(MLP(rngs=nnx.Rngs(0)),
                                       jqnn.LoraConfig(r=4, alpha=1, target_modules="all-linear")))
  assert os.path.isdir(path)


def test_lora_dropout_follows_train_eval():
  model = MLP(rngs=nnx.Rngs(0))
  jqnn.add_lora(model, jqnn.LoraConfig(r=4, dropout=0.5, target_modules=["up"]),
                rngs=nnx.Rngs(0))
  _randomize_lora(model)
  x = inputs()
  model.eval()
  a, b = model(x), model(x)
  np.testing.assert_array_equal(a, b)
  model.train()
  assert float(jnp.abs(model(x) - a).max()) > 0


def test_bad_lora_configs():
  model = MLP(rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"target_modules entry 'attn' matches no layer.*'up'"):
    jqnn.add_lora(model, jqnn.LoraConfig(target_modules=["up", "attn"]))
  assert type(model.up) is nnx.Linear  # nothing changed
  with pytest.raises(ValueError, match="r must be an int >= 1"):
    jqnn.LoraConfig(r=0)
  with pytest.raises(ValueError, match="dropout"):
    jqnn.LoraConfig(dropout=1.0)
  with pytest.raises(ValueError, match="alpha"):
    jqnn.LoraConfig(alpha=-1)
  with pytest.raises(TypeError, match="target_modules entries"):
    jqnn.LoraConfig(target_modules=["up", 3])
  jqnn.add_lora(model, jqnn.LoraConfig(target_modules=["up"]))
  with pytest.raises(ValueError, match="already has LoRA adapters"):
    jqnn.add_lora(model, jqnn.LoraConfig(target_modules=["out"]))
  with pytest.raises(TypeError, match="LoraConfig"):
    jqnn.add_lora(model, {"r": 4})
