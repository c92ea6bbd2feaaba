"""jaxquant.sharding on 8 fake CPU devices: partition rules, placement, per-device bytes, local
dequantization of shards, the per-shard 4-bit matmul."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxquant as jq
import jaxquant.sharding as js
from jaxquant.functional._fourbit import check_4bit_state  # noqa: F401 (import check)


def _weight(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 0.02


@pytest.fixture(scope="module")
def mesh():
  return js.make_mesh(data=2, fsdp=4)


# -- mesh ----------------------------------------------------------------------------------


def test_make_mesh_shapes():
  assert dict(js.make_mesh(data=2, fsdp=4).shape) == {"data": 2, "fsdp": 4}
  assert dict(js.make_mesh(data=1).shape) == {"data": 1, "fsdp": 8}
  assert dict(js.make_mesh(data=None, fsdp=2).shape) == {"data": 4, "fsdp": 2}
  m = js.make_mesh(fsdp=2, devices=jax.devices()[:2])
  assert m.devices.size == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(data=3, fsdp=2), "must equal the number of devices 8"),
    (dict(data=0), "data must be a positive int"),
    (dict(data=None, fsdp=None), "give data or fsdp"),
    (dict(data=2, fsdp=3.0), "fsdp must be a positive int"),
    (dict(data=3), "data=3 does not divide"),
])
def test_make_mesh_rejects(kwargs, match):
  with pytest.raises(ValueError, match=match):
    js.make_mesh(**kwargs)


def test_rules_reject_bad_input():
  with pytest.raises(ValueError, match="lora must be one of"):
    js.PartitionRules(lora="shard")
  with pytest.raises(TypeError, match="overrides entries must be"):
    js.PartitionRules(overrides=(("q", ("fsdp",)),))
  with pytest.raises(ValueError, match="not a regular expression"):
    js.PartitionRules(overrides=(("(", P()),))
  with pytest.raises(TypeError, match="fsdp must hold mesh axis names"):
    js.PartitionRules(fsdp=(1,))
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    js.plan({}, "mesh")
  with pytest.raises(TypeError, match="rules must be"):
    js.plan({}, js.make_mesh(data=1), rules={"fsdp": "x"})


# -- QuantState specs ----------------------------------------------------------------------


def test_nf4_rows_split_with_nested_absmax(mesh):
  # (512, 1024) blocksize 64: 16 blocks per row, 128 rows per shard -> 2048 absmax per shard,
  # a multiple of 256: the nested scales split with the rows.
  st = jq.quantize_nf4(_weight((512, 1024)), 64, True)
  specs, notes = js.quant_state_specs(st, P("fsdp"), mesh)
  assert (specs.data, specs.absmax, specs.nested_absmax) == (P("fsdp", None),) * 2 + (P("fsdp"),)
  assert (specs.code, specs.nested_code, specs.offset) == (P(), P(), P())
  assert notes == []


def test_nested_absmax_replicated_when_shards_cut_nested_blocks(mesh):
  # 64 rows x 2 blocks / 4 shards = 32 absmax per shard: not whole nested blocks of 256.
  st = jq.quantize_nf4(_weight((64, 128)), 64, True)
  specs, notes = js.quant_state_specs(st, P("fsdp"), mesh)
  assert specs.data == P("fsdp", None) and specs.nested_absmax == P()
  assert "nested_absmax replicated" in notes[0]


def test_rows_not_divisible_kept_whole(mesh):
  st = jq.quantize_nf4(_weight((6, 128)), 64)
  specs, notes = js.quant_state_specs(st, P("fsdp"), mesh)
  assert specs.data == P(None, None) and "not divisible" in notes[0]


def test_last_dim_split_only_into_whole_blocks(mesh):
  st = jq.quantize_nf4(_weight((8, 512)), 64)  # 8 blocks per row
  specs, _ = js.quant_state_specs(st, P(None, "fsdp"), mesh)
  assert specs.data == P(None, "fsdp") and specs.absmax == P(None, "fsdp")
  st = jq.quantize_nf4(_weight((8, 128)), 64)  # 2 blocks per row, 4 shards
  specs, notes = js.quant_state_specs(st, P(None, "fsdp"), mesh)
  assert specs.data == P(None, None) and "whole blocks" in notes[0]


def test_flat_layout_splits_only_whole_blocks(mesh):
  st = jq.quantize_nf4(_weight((4096,)), 64)  # 1-D: flat, 64 blocks
  specs, _ = js.quant_state_specs(st, P("fsdp"), mesh)
  assert specs.data == P("fsdp") and specs.absmax == P("fsdp")
  st = jq.quantize_nf4(_weight((6, 96)), 64)  # rows not a multiple of 64: flat, 9 blocks
  specs, notes = js.quant_state_specs(st, P("fsdp"), mesh)
  assert specs.data == P() and specs.absmax == P() and notes


def test_blockwise8_and_int8_rowwise_follow_the_tensor(mesh):
  b8 = jq.quantize_blockwise(_weight((16, 512)), blocksize=256)
  specs, _ = js.quant_state_specs(b8, P(None, "fsdp"), mesh)  # 2 blocks per row, 4 shards
  assert specs.data == P(None, None) and specs.absmax == P(None, None)
  specs, _ = js.quant_state_specs(b8, P("fsdp"), mesh)
  assert specs.data == P("fsdp", None) and specs.absmax == P("fsdp", None)
  i8 = jq.quantize_int8(_weight((64, 32)))
  specs, _ = js.quant_state_specs(i8, P("fsdp"), mesh)
  assert specs.data == P("fsdp", None) and specs.absmax == P("fsdp")


def test_overrides_and_min_size(mesh):
  tree = {"attn": {"q": jq.quantize_nf4(_weight((256, 256)), 64)},
          "embed": _weight((1024, 64)), "norm": jnp.ones((64,))}
  specs = js.partition_specs(tree, mesh)
  assert specs["attn"]["q"].data == P("fsdp", None)
  assert specs["embed"] == P("fsdp", None) and specs["norm"] == P()
  rules = js.PartitionRules(overrides=((r"embed$", P(None, ("data", "fsdp"))),
                                       (r"attn/q", P())))
  specs = js.partition_specs(tree, mesh, rules)
  assert specs["embed"] == P(None, ("data", "fsdp")) and specs["attn"]["q"].data == P(None, None)
  assert js.partition_specs(tree, mesh, js.PartitionRules(fsdp=()))["embed"] == P()


def test_lora_follows_base_and_optimizer_state_follows_params(mesh):
  tree = {"q": {"base": {"kernel": jq.quantize_nf4(_weight((256, 128)), 64)},  # torch (out, in)
                "lora_a": jnp.zeros((128, 4)), "lora_b": jnp.zeros((4, 256))}}
  specs = js.partition_specs(tree, mesh)
  assert specs["q"]["lora_a"] == P(None, None) and specs["q"]["lora_b"] == P(None, "fsdp")
  rep = js.partition_specs(tree, mesh, js.PartitionRules(lora="replicate"))
  assert rep["q"]["lora_b"] == P()
  params = {"q": {"lora_a": tree["q"]["lora_a"], "lora_b": jnp.zeros((4, 2048))}}
  # optimizer state: 8-bit moment of lora_b (blocks of 256 along 2048: 8 per row) and a counter
  moment = jq.quantize_blockwise(jnp.zeros((4, 2048)), blocksize=256)
  opt = ({"count": jnp.zeros((), jnp.int32), "mu": {"q": {"lora_b": moment,
                                                          "lora_a": jnp.zeros((128, 4))}}},)
  follow = js.plan({"q": {**params["q"], "base": {"kernel": jq.quantize_nf4(
      _weight((2048, 128)), 64)}}}, mesh)
  specs = js.partition_specs(opt, mesh, follow=follow)
  assert specs[0]["mu"]["q"]["lora_b"].data == P(None, "fsdp")
  assert specs[0]["mu"]["q"]["lora_b"].absmax == P(None, "fsdp")
  assert specs[0]["count"] == P() and specs[0]["mu"]["q"]["lora_a"] == P(None, None)



def test_linen_lora_follows_its_base_weight(mesh):
  import flax.linen as nn  # noqa: PLC0415
  import jaxquant.nn as jqnn  # noqa: PLC0415

  class Net(nn.Module):
    @nn.compact
    def __call__(self, ids):
      h = nn.Embed(512, 256, name="embed")(ids)
      h = nn.Dense(512, name="up")(h)         # quantized: torch layout (512, 256), rows split
      return nn.Dense(256, name="head")(h)    # kept float: flax layout (512, 256)

  variables = Net().init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32))
  variables = jqnn.quantize_model(variables, jqnn.QuantConfig(
      load_in_4bit=True, quant_type="nf4", skip_modules=("head",), quantize_embeddings=False))
  variables = jqnn.add_lora(variables, jqnn.LoraConfig(
      r=4, target_modules=("up", "head", "embed")), rngs=jax.random.key(1))
  specs = js.partition_specs(variables, mesh)
  lora = specs["lora"]
  assert specs["quantized"]["up"]["kernel"].state.data == P("fsdp", None)
  assert lora["up"]["adapter"].lora_a == P(None, None)       # (in 256, r): in not split
  assert lora["up"]["adapter"].lora_b == P(None, "fsdp")     # (r, out 512): follows the rows
  assert specs["params"]["head"]["kernel"] == P("fsdp", None)  # float (in 512, out 256)
  assert lora["head"]["adapter"].lora_a == P("fsdp", None)   # (in, r) follows the in split
  assert lora["head"]["adapter"].lora_b == P(None, None)
  assert specs["params"]["embed"]["embedding"] == P("fsdp", None)  # float (512, 256)
  assert lora["embed"]["adapter"].lora_a == P("fsdp", None)  # (num_embeddings, r)
  assert js.partition_specs(variables, mesh, js.PartitionRules(lora="replicate"))[
      "lora"]["up"]["adapter"].lora_b == P()

# -- placement, bytes, local shards --------------------------------------------------------


def test_per_device_bytes_fall_as_one_over_n():
  weights = {f"w{i}": jq.quantize_nf4(_weight((1024, 512), i), 64, True) for i in range(3)}
  total = sum(w.nbytes for w in weights.values())
  replicated = sum(w.code.nbytes + w.nested_code.nbytes + w.offset.nbytes
                   for w in weights.values())
  for n in (2, 4, 8):
    mesh = js.make_mesh(data=1, fsdp=n, devices=jax.devices()[:n])
    per = js.per_device_bytes(js.shard_state(weights, mesh))
    assert len(per) == n
    for b in per.values():
      assert b == (total - replicated) // n + replicated
      assert b <= total / n * 1.07


def test_shard_model_places_variables_in_place(mesh):
  from flax import nnx
  import jaxquant.nn as jqnn
  layer = jqnn.Linear4bit(256, 512, quant_type="nf4", rngs=nnx.Rngs(0))
  x = _weight((8, 256), 3)
  before = np.asarray(layer(x))
  same = js.shard_model(layer, mesh)
  assert same is layer
  assert layer.quant_state.data.sharding.spec == P("fsdp", None)
  assert layer.bias[...].sharding.spec == P()
  np.testing.assert_array_equal(np.asarray(layer(x)), before)
  with pytest.raises(TypeError, match="model must be an nnx.Module"):
    js.shard_model({"w": x}, mesh)


@pytest.mark.parametrize("shape, nested_split", [((512, 1024), True), ((64, 128), False)])
def test_each_shard_dequantizes_locally(mesh, shape, nested_split):
  st = jq.quantize_nf4(_weight(shape), 64, True)
  full = np.asarray(jq.dequantize_4bit(st))
  sharded = js.shard_state(st, mesh)
  assert (sharded.nested_absmax.sharding.spec == P("fsdp")) == nested_split
  rows = shape[0] // 4
  for shard in sharded.data.addressable_shards:
    local = js.local_quant_state(sharded, shard.device)
    assert local.shape == (rows, shape[1]) and local.nested == nested_split
    start = shard.index[0].start
    np.testing.assert_array_equal(np.asarray(jq.dequantize_4bit(local)),
                                  full[start:start + rows])


def test_local_quant_state_rejects_foreign_device():
  mesh = js.make_mesh(data=1, fsdp=2, devices=jax.devices()[:2])
  sharded = js.shard_state(jq.quantize_nf4(_weight((64, 128)), 64), mesh)
  with pytest.raises(ValueError, match="holds no shard"):
    js.local_quant_state(sharded, jax.devices()[5])


# -- per-shard matmul ----------------------------------------------------------------------


@pytest.mark.parametrize("data, fsdp_axes", [(2, ("fsdp",)),
                                             (2, ("data", "fsdp"))])
def test_sharded_matmul_matches_unsharded(data, fsdp_axes):
  mesh = js.make_mesh(data=data)
  rules = js.PartitionRules(fsdp=fsdp_axes)
  st = jq.quantize_nf4(_weight((512, 256)), 64, True)
  x, bias = _weight((16, 4, 256), 1) * 50, _weight((512,), 2)
  sharded = js.shard_state(st, mesh, rules)

  def loss(f, x, b, s):
    return jnp.sum(jnp.sin(f(x, s, b)))

  def run(x, s, b):
    return js.sharded_matmul_4bit(x, s, b, mesh=mesh, rules=rules)

  y = jax.jit(run)(x, sharded, bias)
  ref = jq.matmul_4bit(x, st, bias)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
  assert y.sharding.spec[0] == ("data", "fsdp")
  gx, gb = jax.jit(jax.grad(lambda x, b, s: loss(run, x, b, s), (0, 1)))(x, bias, sharded)
  rx, rb = jax.grad(lambda x, b: loss(lambda x, s, b: jq.matmul_4bit(x, s, b), x, b, st),
                    (0, 1))(x, bias)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gb), np.asarray(rb), rtol=1e-5, atol=1e-4)


def test_use_mesh_gathers_packed_bytes_not_dequantized_weights(mesh):
  st = js.shard_state(jq.quantize_nf4(_weight((512, 256)), 64, True), mesh)
  x = jax.device_put(_weight((16, 256), 1), js.batch_sharding(mesh))
  with js.use_mesh(mesh):
    hlo = jax.jit(jq.matmul_4bit).lower(x, st).compile().as_text()
  gathered = re.findall(r"= (\w+)\[([\d,]*)\][^ ]* all-gather\(", hlo)
  itemsize = {"u8": 1, "f32": 4, "bf16": 2}
  nbytes = sum(itemsize[t] * int(np.prod([int(d) for d in dims.split(",") if d]))
               for t, dims in gathered)
  assert ("u8", "512,128") in gathered  # the packed weight, whole, on every device
  assert nbytes < 512 * 256 * 4 / 7  # codes + scales: never the dequantized weight
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    with js.use_mesh(None):
      pass


def test_sharded_matmul_runs_the_kernel_per_shard(mesh):
  import pallas_kernels
  if "interpret" not in pallas_kernels.implementations("matmul_4bit"):
    pytest.skip("no 4-bit Pallas kernel registered")
  st = jq.quantize_nf4(_weight((256, 256)), 64, True)
  x = _weight((8, 256), 1)
  y = jax.jit(lambda x, s: js.sharded_matmul_4bit(x, s, mesh=mesh, backend="interpret"))(
      x, js.shard_state(st, mesh))
  np.testing.assert_allclose(np.asarray(y), np.asarray(jq.matmul_4bit(x, st)), rtol=1e-5,
                             atol=1e-6)


def test_sharded_matmul_rejects_bad_input(mesh):
  st = jq.quantize_nf4(_weight((64, 128)), 64)
  with pytest.raises(ValueError, match="batch dimension"):
    js.sharded_matmul_4bit(jnp.ones((128,)), st, mesh=mesh)
  with pytest.raises(TypeError, match="must be a QuantState"):
    js.sharded_matmul_4bit(jnp.ones((2, 128)), jnp.ones((64, 128)), mesh=mesh)


def test_global_batch_in_one_process_is_the_batch(mesh):
  rows = {"ids": np.arange(16 * 4, dtype=np.int32).reshape(16, 4), "w": np.ones((16,))}
  batch = js.global_batch(rows, mesh)
  assert batch["ids"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(batch["ids"]), rows["ids"])
  assert len(batch["ids"].addressable_shards) == 8
