"""Sharded QLoRA training on 8 fake CPU devices: a Llama-style model (NF4 + double quant base,
LoRA on every linear layer, 8-bit AdamW) trained on a (data=2, fsdp=4) mesh matches the
single-device run; its checkpoint restores onto another mesh and training continues there."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxquant.checkpoint as ckpt
import jaxquant.nn as jqnn
import jaxquant.optim as jqoptim
import jaxquant.sharding as js
from jaxquant.quant_state import QuantState

VOCAB, DIM, HIDDEN, HEADS, LAYERS = 256, 128, 256, 4, 1
BATCH, SEQ = 8, 16
LR = 3e-3


class Block(nnx.Module):
  """Pre-norm attention + SwiGLU MLP, as a Llama decoder layer."""

  def __init__(self, rngs: nnx.Rngs):
    lin = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)  # noqa: E731
    self.attn_norm, self.mlp_norm = nnx.RMSNorm(DIM, rngs=rngs), nnx.RMSNorm(DIM, rngs=rngs)
    self.q, self.k, self.v, self.o = lin(DIM, DIM), lin(DIM, DIM), lin(DIM, DIM), lin(DIM, DIM)
    self.gate, self.up, self.down = lin(DIM, HIDDEN), lin(DIM, HIDDEN), lin(HIDDEN, DIM)

  def __call__(self, x):
    b, t, _ = x.shape
    h = self.attn_norm(x)
    q, k, v = (f(h).reshape(b, t, HEADS, DIM // HEADS) for f in (self.q, self.k, self.v))
    s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(DIM // HEADS)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
    a = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v).reshape(b, t, DIM)
    x = x + self.o(a)
    h = self.mlp_norm(x)
    return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))


class TinyLlama(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.layers = nnx.List([Block(rngs) for _ in range(LAYERS)])
    self.norm = nnx.RMSNorm(DIM, rngs=rngs)
    self.lm_head = nnx.Linear(DIM, VOCAB, use_bias=False, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    for layer in self.layers:
      x = layer(x)
    return self.lm_head(self.norm(x))


def loss_fn(model, batch):
  logits = model(batch["ids"]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def build():
  model = TinyLlama(nnx.Rngs(0))
  jqnn.quantize_model(model, jqnn.QuantConfig(load_in_4bit=True, quant_type="nf4",
                                              double_quant=True,
                                              skip_modules=("embed", "lm_head")))
  jqnn.add_lora(model, jqnn.LoraConfig(r=8, alpha=16, target_modules="all-linear"), rngs=1)
  # non-zero B so that the first forward already exercises the adapters
  for _, m in jqnn.lora_modules(model):
    m.lora_b.set_value(jax.random.normal(jax.random.key(7), m.lora_b.shape) * 0.01)
  return model


def tx():
  return jqoptim.adamw8bit(LR, min_8bit_size=256)


@pytest.fixture(scope="module")
def batch():
  ids = jax.random.randint(jax.random.key(2), (BATCH, SEQ), 0, VOCAB)
  return {"ids": ids, "labels": jnp.roll(ids, -1, axis=1)}


def _train(mesh, batch, steps=3):
  model = build()
  trainer = js.make_train_step(model, tx(), loss_fn, mesh)
  state = trainer.init(model)
  placed = trainer.place_batch(batch)
  with js.use_mesh(mesh):
    logits = jax.jit(lambda s, ids: trainer.model(s)(ids))(state, placed["ids"])
  losses = []
  for _ in range(steps):
    state, loss = trainer.step(state, placed)
    losses.append(float(loss))
  return trainer, state, np.asarray(logits), losses


@pytest.fixture(scope="module")
def single(batch):
  return _train(js.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1]), batch)


@pytest.fixture(scope="module")
def sharded(batch):
  return _train(js.make_mesh(data=2, fsdp=4), batch)


def _params(state):
  return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}


def test_sharded_forward_loss_and_updates_match_single_device(single, sharded):
  _, s_state, s_logits, s_losses = single
  _, m_state, m_logits, m_losses = sharded
  np.testing.assert_allclose(m_logits, s_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(m_losses, s_losses, rtol=1e-5)
  assert m_losses[-1] < m_losses[0]  # the adapters learn
  ref, got = _params(s_state), _params(m_state)
  assert ref.keys() == got.keys() and len(ref) == 2 * (7 * LAYERS + 1)  # + lm_head
  # The 8-bit state rounds: a gradient that differs in the last float bit (another reduction
  # order) can move a moment to the neighbouring code, changing that element's update by a
  # fraction of the learning rate. Everything else agrees to float32 rounding.
  close = np.concatenate([np.isclose(got[k], ref[k], rtol=1e-4, atol=1e-6).ravel() for k in ref])
  assert close.mean() > 0.995, close.mean()
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=LR, err_msg=k)
  moved = [np.abs(got[k] - v).max() for k, v in _params(single[0].init(build())).items()]
  assert min(moved) > 0  # every adapter was updated


def test_layout_on_the_mesh(sharded):
  trainer, state, _, _ = sharded
  q = state.frozen["layers"][0]["q"]["base"]["kernel"].get_value()
  assert isinstance(q, QuantState)
  assert q.data.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  lora_b = state.params["layers"][0]["down"]["lora_b"].get_value()
  assert lora_b.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  # 8-bit AdamW state of lora_b follows it
  mu = [leaf for leaf in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(
      x, QuantState)) if isinstance(leaf, QuantState) and leaf.shape == (8, DIM)]
  assert mu and all(m.data.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp") for m in mu)


def test_quantized_weight_bytes_per_device_fall_as_one_over_fsdp(sharded):
  _, state, _, _ = sharded
  weights = [x for x in jax.tree.leaves(state.frozen, is_leaf=lambda x: isinstance(
      x, QuantState)) if isinstance(x, QuantState)]
  arrays = [a for w in weights for a in jax.tree.leaves(w)]
  split = [a for a in arrays if any(e is not None for e in a.sharding.spec)]
  replicated = sum(a.nbytes for a in arrays) - sum(a.nbytes for a in split)
  assert sum(a.nbytes for a in split) > 0.9 * sum(w.nbytes for w in weights)
  per = js.per_device_bytes(weights)
  assert len(per) == 8
  for b in per.values():  # fsdp=4: a quarter of codes and scales, plus the codebooks
    assert b == sum(a.nbytes for a in split) // 4 + replicated
  assert replicated <= len(weights) * (16 * 4 + 256 * 4 + 4 + 64)  # codebooks, offset


def test_checkpoint_restores_onto_another_mesh_and_training_continues(single, sharded, batch,
                                                                      tmp_path):
  trainer, state, _, _ = sharded
  path = tmp_path / "step3"
  ckpt.save(path, state)
  expect = jax.tree.map(np.asarray, state)
  # (runs last: the step donates the module-scoped state)
  _, ref_loss = trainer.step(state, trainer.place_batch(batch))  # continue on (2, 4)

  def target(shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        expect, shardings)

  # onto 8-way FSDP: every array restored bit-exactly, split the new way
  trainer8 = js.make_train_step(build(), tx(), loss_fn, js.make_mesh(data=1, fsdp=8))
  restored = ckpt.restore(path, target=target(trainer8.state_shardings))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expect)):
    np.testing.assert_array_equal(np.asarray(a), b)
  q = restored.frozen["layers"][0]["q"]["base"]["kernel"].get_value()
  assert q.data.sharding.mesh.shape["fsdp"] == 8 and q.data.sharding.spec[0] == "fsdp"
  assert len({s.device for s in q.data.addressable_shards}) == 8
  # onto one device, where training continues exactly as it would have on (2, 4)
  trainer1 = single[0]
  restored = ckpt.restore(path, target=target(trainer1.state_shardings))
  _, loss = trainer1.step(restored, trainer1.place_batch(batch))
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)


def test_make_train_step_rejects_bad_input():
  mesh = js.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
  model = TinyLlama(nnx.Rngs(0))
  with pytest.raises(ValueError, match="no variables matching"):
    js.make_train_step(model, optax.sgd(0.1), loss_fn, mesh)
  with pytest.raises(TypeError, match="tx must be an optax.GradientTransformation"):
    js.make_train_step(model, lambda g: g, loss_fn, mesh)
  with pytest.raises(TypeError, match="model must be an nnx.Module"):
    js.make_train_step({"w": jnp.ones(3)}, optax.sgd(0.1), loss_fn, mesh)
