"""The Llama decoder on a tiny config: shapes, causality, grouped-query attention, rotary
embeddings, padding, rematerialization through 4-bit layers, and a QLoRA step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant import nn as jqnn
from jaxquant import optim as jqoptim
from jaxquant.models import (LLAMA_LORA_TARGETS, LlamaConfig, LlamaForCausalLM, causal_lm_loss,
                             rotary)

as_pure = getattr(nnx, "as_pure", None) or nnx.pure


def _ids(b=2, t=16, vocab=256, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


def _qlora(model, r=4):
  jqnn.quantize_model(model, jqnn.QuantConfig(load_in_4bit=True, quant_type="nf4",
                                              double_quant=True, skip_modules=("lm_head",),
                                              quantize_embeddings=False))
  jqnn.add_lora(model, jqnn.LoraConfig(r=r, alpha=2 * r, target_modules=LLAMA_LORA_TARGETS),
                rngs=1)
  return model


def test_forward_shapes_and_dtypes():
  cfg = LlamaConfig.tiny()
  model = LlamaForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  logits = model(_ids())
  assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.bfloat16
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == cfg.num_params()
  assert LlamaConfig.tinyllama_1_1b().num_params() == 1_100_048_384  # TinyLlama-1.1B


def test_causal_mask():
  model = LlamaForCausalLM(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  ids = _ids(1, 12)
  changed = ids.at[0, 7].set((ids[0, 7] + 1) % 256)
  a, b = model(ids), model(changed)
  np.testing.assert_array_equal(a[:, :7], b[:, :7])  # the past does not see the future
  assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-3


def test_grouped_query_attention_equals_repeated_heads():
  gqa_cfg = LlamaConfig.tiny(num_heads=4, num_kv_heads=2, num_layers=1)
  gqa = LlamaForCausalLM(gqa_cfg, rngs=nnx.Rngs(0))
  mha = LlamaForCausalLM(gqa_cfg.replace(num_kv_heads=4), rngs=nnx.Rngs(1))
  # Copy every weight; K/V heads repeated for each query head of their group.
  g_attn, m_attn = gqa.layers[0].self_attn, mha.layers[0].self_attn
  hd = gqa_cfg.head_dim
  for name in ("k_proj", "v_proj"):
    w = getattr(g_attn, name).kernel[...].reshape(gqa_cfg.hidden_size, 2, 1, hd)
    w = jnp.broadcast_to(w, (gqa_cfg.hidden_size, 2, 2, hd)).reshape(gqa_cfg.hidden_size, -1)
    getattr(m_attn, name).kernel.set_value(w)
  for path in ("q_proj", "o_proj"):
    getattr(m_attn, path).kernel.set_value(getattr(g_attn, path).kernel[...])
  for name in ("gate_proj", "up_proj", "down_proj"):
    getattr(mha.layers[0].mlp, name).kernel.set_value(
        getattr(gqa.layers[0].mlp, name).kernel[...])
  mha.embed_tokens.embedding.set_value(gqa.embed_tokens.embedding[...])
  mha.lm_head.kernel.set_value(gqa.lm_head.kernel[...])
  ids = _ids()
  np.testing.assert_allclose(gqa(ids), mha(ids), rtol=1e-5, atol=1e-5)


def test_rotary_depends_on_relative_position():
  key = jax.random.key(0)
  q = jax.random.normal(key, (1, 1, 1, 16))
  k = jax.random.normal(jax.random.fold_in(key, 1), (1, 1, 1, 16))
  dot = lambda pq, pk: jnp.sum(rotary(q, jnp.array([[pq]]), 1e4) * rotary(k, jnp.array([[pk]]),
                                                                          1e4))
  np.testing.assert_allclose(dot(3, 1), dot(10, 8), rtol=1e-5)
  np.testing.assert_allclose(rotary(q, jnp.zeros((1, 1), jnp.int32), 1e4), q, rtol=1e-6)
  assert abs(float(dot(3, 1) - dot(3, 2))) > 1e-4


def test_padding_lengths_ignore_padded_tokens():
  model = LlamaForCausalLM(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
  ids = _ids(1, 10)
  padded = jnp.concatenate([ids, jnp.zeros((1, 6), jnp.int32)], axis=1)
  full = model(ids)
  part = model(padded, lengths=jnp.array([10]))
  np.testing.assert_allclose(part[:, :10], full, rtol=1e-5, atol=1e-5)
  loss = causal_lm_loss(part, padded, jnp.array([10]))
  np.testing.assert_allclose(loss, causal_lm_loss(full, ids), rtol=1e-5)


@functools.lru_cache(maxsize=None)
def _lora_grads(remat):
  """Gradients of the adapters of a NF4 + LoRA tiny model, and the jaxpr of their function."""
  model = _qlora(LlamaForCausalLM(LlamaConfig.tiny(remat=remat), rngs=nnx.Rngs(0)))
  graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  lora = as_pure(lora)
  ids = _ids()

  def grads(lora, rest):
    def loss(lora):
      return causal_lm_loss(nnx.merge(graphdef, lora, rest)(ids), ids)
    return jax.grad(loss)(lora)

  return jax.jit(grads)(lora, rest), str(jax.make_jaxpr(grads)(lora, rest))


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_through_quantized_layers_gives_same_gradients(policy):
  plain, plain_jaxpr = _lora_grads("none")
  remat, remat_jaxpr = _lora_grads(policy)
  leaves = jax.tree.leaves(plain)
  # 2 layers x 7 projections x (A, B); with B = 0 at init only the 14 B gradients are nonzero.
  assert len(leaves) == 2 * 2 * 7
  assert sum(float(jnp.abs(g).max()) > 0 for g in leaves) == 14
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-7), plain, remat)
  # Each block is a rematerialized region (jax.checkpoint) in the traced gradient.
  assert remat_jaxpr.count("checkpoint[") + remat_jaxpr.count("remat") >= 2
  assert "checkpoint[" not in plain_jaxpr and "remat" not in plain_jaxpr


def test_qlora_step_reduces_loss():
  model = _qlora(LlamaForCausalLM(LlamaConfig.tiny(remat="full"), dtype=jnp.float32,
                                  rngs=nnx.Rngs(0)))
  graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  lora = as_pure(lora)
  tx = jqoptim.adamw8bit(3e-3, min_8bit_size=0)
  opt_state = tx.init(lora)
  ids = _ids(4, 32, seed=3)

  @jax.jit
  def step(lora, opt_state):
    def loss(lora):
      return causal_lm_loss(nnx.merge(graphdef, lora, rest)(ids), ids)
    value, grads = jax.value_and_grad(loss)(lora)
    lora, opt_state = jqoptim.update_and_apply(tx, grads, opt_state, lora)
    return lora, opt_state, value

  losses = []
  for _ in range(12):
    lora, opt_state, value = step(lora, opt_state)
    losses.append(float(value))
  assert losses[-1] < losses[0] - 0.2, losses
  # The frozen 4-bit weights did not move; only adapters are trained.
  _, _, rest_after = nnx.split(nnx.merge(graphdef, lora, rest), nnx.LoRAParam, ...)
  jax.tree.map(np.testing.assert_array_equal, rest, rest_after)


def test_bad_config():
  with pytest.raises(ValueError, match="num_kv_heads"):
    LlamaConfig.tiny(num_kv_heads=3)
  with pytest.raises(ValueError, match="remat"):
    LlamaConfig.tiny(remat="sometimes")
  with pytest.raises(ValueError, match="max_position"):
    LlamaForCausalLM(LlamaConfig.tiny(max_position=8), rngs=nnx.Rngs(0))(_ids(1, 9))
