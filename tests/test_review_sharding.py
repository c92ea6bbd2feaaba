"""Review of jaxquant.sharding: stacked (nnx.vmap) LoRA layers, global batches that cannot be
split, LoRA dropout and host-offloaded optimizer state in the sharded trainer, bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxquant as jq
import jaxquant.nn as jqnn
import jaxquant.optim as jqoptim
import jaxquant.sharding as js


@pytest.fixture(scope="module")
def mesh():
  return js.make_mesh(data=2, fsdp=4)


def test_lora_on_a_stacked_layer_follows_its_base(mesh):
  # nnx.vmap-built stack of 4 Linear(256, 256): kernel (4, 256, 256) is split on its first
  # divisible dimension (the layers); the stacked adapters (4, 256, r) / (4, r, 256) follow.
  @nnx.vmap(in_axes=0, out_axes=0)
  def stack(key):
    return nnx.Linear(256, 256, rngs=nnx.Rngs(key))

  class Model(nnx.Module):
    def __init__(self):
      self.layers = stack(jax.random.split(jax.random.key(0), 4))

  model = Model()
  jqnn.add_lora(model, jqnn.LoraConfig(r=4, target_modules="all-linear"), rngs=1)
  specs = js.partition_specs(nnx.state(model), mesh)["layers"]
  assert specs["base"]["kernel"].get_value() == P("fsdp", None, None)
  assert specs["lora_a"].get_value() == P("fsdp", None, None)
  assert specs["lora_b"].get_value() == P("fsdp", None, None)
  # a float kernel split on its output features: lora_b follows on its last dimension
  rules = js.PartitionRules(overrides=((r"base/kernel", P(None, None, "fsdp")),))
  specs = js.partition_specs(nnx.state(model), mesh, rules)["layers"]
  assert specs["lora_a"].get_value() == P(None, None, None)
  assert specs["lora_b"].get_value() == P(None, None, "fsdp")


def test_global_batch_rejects_rows_that_cannot_be_split(mesh, monkeypatch):
  # With several processes a leaf that cannot be split over the batch axes would become a
  # "replicated" array holding different rows on each process: refuse it by name.
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  rows = {"ids": np.zeros((4, 3), np.int32), "w": np.zeros((3,), np.float32)}
  with pytest.raises(ValueError, match=r"global_batch.*\['w'\].*6 rows.*8"):
    js.global_batch(rows, mesh)
  with pytest.raises(ValueError, match=r"\['t'\].*scalar"):
    js.global_batch({"t": np.float32(1.0)}, mesh)
  with pytest.raises(ValueError, match=r"batch_axes=\('tensor',\) split nothing"):
    js.global_batch(rows, mesh, batch_axes=("tensor",))


def test_train_step_with_lora_dropout_matches_single_device():
  # LoRA dropout (PEFT's lora_dropout) draws from an RNG counter in the frozen state: the step
  # must be able to advance it (it raised TraceContextError), and does so every step.
  def run(mesh):
    model = nnx.Sequential(jqnn.Linear4bit(64, 128, quant_type="nf4", rngs=nnx.Rngs(0)))
    jqnn.add_lora(model, jqnn.LoraConfig(r=4, dropout=0.5, target_modules="all-linear"),
                  rngs=1)
    for _, m in jqnn.lora_modules(model):
      m.lora_b.set_value(jnp.ones(m.lora_b.shape) * 0.1)
    trainer = js.make_train_step(model, optax.sgd(0.0), lambda m, b: jnp.mean(m(b) ** 2),
                                 mesh)
    state, batch = trainer.init(model), trainer.place_batch(jnp.ones((8, 64)))
    losses = []
    for _ in range(2):
      state, loss = trainer.step(state, batch)
      losses.append(float(loss))
    return losses

  losses = run(js.make_mesh(data=2, fsdp=4))
  assert losses[0] != losses[1]  # a new dropout mask each step
  np.testing.assert_allclose(losses, run(js.make_mesh(fsdp=1, devices=jax.devices()[:1])),
                             rtol=1e-5)


def test_bad_arguments_name_themselves(mesh):
  st = jq.quantize_nf4(jax.random.normal(jax.random.key(0), (64, 128)), 64)
  x = jnp.ones((8, 128))
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    js.sharded_matmul_4bit(x, st, mesh=None)
  with pytest.raises(TypeError, match="rules must be a jaxquant.sharding.PartitionRules"):
    js.sharded_matmul_4bit(x, st, mesh=mesh, rules={"fsdp": "fsdp"})
  with pytest.raises(ValueError, match="x.shape.-1. must equal the weight's in_features 128"):
    js.sharded_matmul_4bit(jnp.ones((8, 100)), st, mesh=mesh)
  with pytest.raises(ValueError, match=r"bias must have shape \(64,\)"):
    js.sharded_matmul_4bit(x, st, jnp.ones((3,)), mesh=mesh)
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    js.global_batch({"a": np.ones((8, 2))}, "mesh")
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    js.batch_sharding(None)
  with pytest.raises(ValueError, match=r"devices must be a flat sequence.*shape \(2, 4\)"):
    js.make_mesh(data=2, fsdp=4, devices=np.asarray(jax.devices()).reshape(2, 4))
  with pytest.raises(ValueError, match="fsdp names a mesh axis twice"):
    js.PartitionRules(fsdp=("fsdp", "fsdp"))
  # an override pattern that also catches the bias: the error names the entry
  tree = {"attn": {"kernel": jnp.ones((256, 256)), "bias": jnp.ones((256,))}}
  rules = js.PartitionRules(overrides=((r"attn", P(None, "fsdp")),))
  with pytest.raises(ValueError, match=r"overrides gives 'attn/bias' \(shape \(256,\)\)"):
    js.partition_specs(tree, mesh, rules)
  model = nnx.Sequential(jqnn.Linear4bit(64, 64, rngs=nnx.Rngs(0)))
  jqnn.add_lora(model, jqnn.LoraConfig(r=2, target_modules="all-linear"), rngs=1)
  with pytest.raises(TypeError, match="loss_fn must be a callable"):
    js.make_train_step(model, optax.sgd(0.1), "mse", mesh)


def test_offloaded_optimizer_state_stays_on_the_host(mesh):
  # bitsandbytes' paged optimizers ~ adamw8bit(offload=True): the trainer must keep the state
  # in pinned_host memory across init and steps (it was moved to device memory).
  if not jqoptim.host_memory_supported():
    pytest.skip("no pinned_host memory on this backend")
  model = nnx.Sequential(jqnn.Linear4bit(64, 256, quant_type="nf4", rngs=nnx.Rngs(0)))
  jqnn.add_lora(model, jqnn.LoraConfig(r=4, target_modules="all-linear"), rngs=1)
  tx = jqoptim.adamw8bit(1e-2, min_8bit_size=64, offload=True)
  trainer = js.make_train_step(model, tx, lambda m, b: jnp.mean(m(b) ** 2), mesh)
  state = trainer.init(model)
  on_host = lambda s: jqoptim.memory_kinds(s).get("pinned_host", 0)  # noqa: E731
  total = sum(jqoptim.memory_kinds(state.opt_state).values())
  assert on_host(state.opt_state) >= 0.9 * total
  state, loss = trainer.step(state, trainer.place_batch(jnp.ones((8, 64))))
  assert np.isfinite(float(loss)) and on_host(state.opt_state) >= 0.9 * total


def test_shard_state_keeps_host_offloaded_arrays_on_the_host(mesh):
  if not jqoptim.host_memory_supported():
    pytest.skip("no pinned_host memory on this backend")
  params = {"w": jnp.ones((512, 64))}
  opt = jqoptim.adamw8bit(1e-2, offload=True).init(params)
  host = jqoptim.memory_kinds(opt)["pinned_host"]
  placed = js.shard_state(opt, mesh, follow=params)
  assert jqoptim.memory_kinds(placed).get("pinned_host", 0) == host
  mu = [x for x in jax.tree.leaves(placed, is_leaf=lambda x: isinstance(x, jq.QuantState))
        if isinstance(x, jq.QuantState)][0]
  assert mu.data.sharding.spec == P("fsdp", None)  # still split like its parameter
  # what each device holds: the step counter, not the host-resident moments
  assert max(js.per_device_bytes(placed).values()) < 64
