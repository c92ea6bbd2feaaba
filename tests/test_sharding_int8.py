"""The int8 linears per shard under ``jaxquant.sharding.use_mesh`` (8 fake CPU devices): the
LLM.int8() and weight-only linears, forward and gradients, equal the single-device results;
the compiled program gathers the int8 weight, not the activations; the int8 Flax layers."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq
import jaxquant.nn as jqnn
import jaxquant.sharding as js
from jaxquant.functional import _int8, _int8_matmul, _matmul, int8_weight_only_linear

N, K = 64, 64  # weight (N, K); rows split over fsdp (4 or 8)
MESHES = {"data2_fsdp4": dict(data=2, fsdp=4), "fsdp8": dict(data=1, fsdp=8)}
OPS = {
    "llm_int8_t0": lambda x, s, b: jq.int8_linear(x, s, b, 0.0, backend="xla"),
    "llm_int8_t6": lambda x, s, b: jq.int8_linear(x, s, b, 6.0, backend="xla"),
    "weight_only": lambda x, s, b: int8_weight_only_linear(x, s, b, backend="xla"),
}


def _normal(shape, seed, scale=1.0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * scale


def _inputs():
  """``x (16, 2, K)`` with outlier elements planted in rows that land on different devices
  (batch rows 1, 3 and 13: one device each on both meshes), one exactly at the threshold."""
  x = _normal((16, 2, K), 1)
  x = x.at[1, 0, 5].set(9.0).at[13, 1, 20].set(-7.5).at[3, 1, 40].set(6.0)
  return x, jq.quantize_int8(_normal((N, K), 0, 0.05)), _normal((N,), 2, 0.1)


def _jit(f):
  """A fresh ``jax.jit`` (a new function each time): jit's trace cache does not know about
  ``use_mesh``, so a program traced in another test with the same arguments is not reused."""
  return jax.jit(lambda *args: f(*args))


def _loss_grad(f):
  return jax.grad(lambda x, b, s: jnp.sum(jnp.sin(f(x, s, b))), (0, 1))


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("op", sorted(OPS))
def test_sharded_int8_linear_matches_single_device(op, mesh_name):
  f = OPS[op]
  mesh = js.make_mesh(**MESHES[mesh_name])
  x, st, bias = _inputs()
  xs = jax.device_put(x, js.batch_sharding(mesh))
  ss = js.shard_state(st, mesh)
  for b in (bias, None):
    ref = f(x, st, b)
    rx, rb = _loss_grad(f)(x, bias if b is None else b, st)
    with js.use_mesh(mesh):
      y = _jit(f)(xs, ss, b)
      gx, gb = jax.jit(_loss_grad(f))(xs, bias if b is None else b, ss)
    # every row is computed exactly as on one device (same op, same outlier columns)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
    assert y.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-6, atol=1e-6)
    # the bias gradient is a psum of per-device partial sums: float32 summation order
    np.testing.assert_allclose(np.asarray(gb), np.asarray(rb), rtol=1e-5, atol=2e-5)


def test_outlier_columns_are_chosen_over_the_whole_batch():
  # Chosen from each device's own rows the planted outliers would be decomposed on one
  # device and int8-rounded on the others: the per-slice result is measurably different, so
  # the equality above depends on the global (pmax) outlier mask.
  x, st, bias = _inputs()
  f = OPS["llm_int8_t6"]
  per_slice = jnp.concatenate([f(x[i:i + 2], st, bias) for i in range(0, 16, 2)])
  assert float(jnp.max(jnp.abs(per_slice - f(x, st, bias)))) > 1e-4
  mesh = js.make_mesh(data=1, fsdp=8)
  with js.use_mesh(mesh):
    y = _jit(f)(jax.device_put(x, js.batch_sharding(mesh)), js.shard_state(st, mesh), bias)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(f(x, st, bias)))


@pytest.mark.parametrize("op", ["llm_int8_t6", "weight_only"])
def test_use_mesh_gathers_the_int8_weight_not_the_activations(op):
  mesh = js.make_mesh(data=2, fsdp=4)
  x, st, bias = _inputs()
  xs = jax.device_put(x, js.batch_sharding(mesh))
  with js.use_mesh(mesh):
    hlo = _jit(OPS[op]).lower(xs, js.shard_state(st, mesh), bias).compile().as_text()
  gathered = set(re.findall(r"= (\w+)\[([\d,]*)\][^ ]* all-gather\(", hlo))
  # only the int8 rows and their float32 row scales, whole on every device; nothing of x
  assert gathered == {("s8", f"{N},{K}"), ("f32", f"{N}")}


def test_use_mesh_sets_and_resets_every_hook():
  mesh = js.make_mesh(data=2, fsdp=4)
  hooks = (_matmul.PARTITIONED, _int8.PARTITIONED, _int8_matmul.PARTITIONED)
  with js.use_mesh(mesh):
    assert all(h.get() is not None for h in hooks)
  assert all(h.get() is None for h in hooks)
  with pytest.raises(RuntimeError, match="inside"):
    with js.use_mesh(mesh):
      raise RuntimeError("inside")
  assert all(h.get() is None for h in hooks)


@pytest.mark.parametrize("op", sorted(OPS))
def test_single_vector_and_indivisible_batch_run_whole(op):
  f = OPS[op]
  mesh = js.make_mesh(data=2, fsdp=4)
  x, st, bias = _inputs()
  with js.use_mesh(mesh):
    v = _jit(f)(x[1, 0], js.shard_state(st, mesh), bias)  # (K,): no batch to split
    odd = _jit(f)(x[:3], js.shard_state(st, mesh), bias)  # 3 rows on 8 devices
  np.testing.assert_array_equal(np.asarray(v), np.asarray(f(x[1, 0], st, bias)))
  np.testing.assert_array_equal(np.asarray(odd), np.asarray(f(x[:3], st, bias)))


def test_linear8bitlt_under_use_mesh_matches_unsharded():
  mesh = js.make_mesh(data=2, fsdp=4)
  x, _, _ = _inputs()
  layer = jqnn.Linear8bitLt.from_linear(nnx.Linear(K, N, rngs=nnx.Rngs(0)), threshold=6.0)
  ref = layer(x)
  js.shard_model(layer, mesh)
  assert layer.quant_state.data.sharding.spec[0] == "fsdp"
  with js.use_mesh(mesh):
    y = nnx.jit(lambda m, x: m(x))(layer, jax.device_put(x, js.batch_sharding(mesh)))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))


def test_dense8bitlt_under_use_mesh_matches_unsharded():
  mesh = js.make_mesh(data=1, fsdp=8)
  x, _, _ = _inputs()
  model = jqnn.Dense8bitLt(N, threshold=6.0, bias_init=nn.initializers.normal(0.1))
  variables = model.init(jax.random.key(0), x)
  ref = model.apply(variables, x)
  with js.use_mesh(mesh):
    y = _jit(model.apply)(js.shard_state(variables, mesh),
                             jax.device_put(x, js.batch_sharding(mesh)))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))


def test_llm_int8_kernel_runs_per_shard():
  import pallas_kernels
  if "interpret" not in pallas_kernels.implementations("int8_linear"):
    pytest.skip("no int8 Pallas kernel registered")
  mesh = js.make_mesh(data=2, fsdp=4)
  x, st, bias = _inputs()
  x = x.astype(jnp.bfloat16)  # the outlier path of the kernels takes 16-bit activations
  f = lambda x, s, b: jq.int8_linear(x, s, b, 6.0, backend="interpret")
  with js.use_mesh(mesh):
    y = _jit(f)(jax.device_put(x, js.batch_sharding(mesh)), js.shard_state(st, mesh), bias)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(f(x, st, bias), np.float32))
