"""Host-offloaded optimizer state: state in ``pinned_host`` between steps, streamed through the
device inside the jitted update (whole or in chunks), same numbers as on-device state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxquant.optim as jo
from jaxquant.optim import _offload

pytestmark = pytest.mark.skipif(not jo.host_memory_supported(),
                                reason="this backend has no pinned_host memory")


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w": 0.05 * jax.random.normal(k1, (64, 1024)), "v": 0.05 * jax.random.normal(k2, (5000,)),
          "b": jnp.zeros(7)}


def _grads(params, seed):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([1e-2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _host_kinds(state) -> set[str]:
  kinds = set()
  for leaf in jax.tree.leaves(state):
    if leaf.ndim:  # the step count (a scalar) stays on the device
      kinds.add(leaf.sharding.memory_kind)
  return kinds


@pytest.mark.parametrize("chunk", [1024, None])
def test_offloaded_state_matches_device_state(chunk):
  params = _params()
  opts = dict(min_8bit_size=0, percentile_clipping=50)
  host = jo.adamw8bit(1e-3, weight_decay=0.1, offload=True, offload_chunk=chunk, **opts)
  dev = jo.adamw8bit(1e-3, weight_decay=0.1, **opts)
  sh, sd = host.init(params), dev.init(params)
  assert _host_kinds(sh) == {"pinned_host"}
  step_h = jax.jit(lambda g, s, p: jo.update_and_apply(host, g, s, p))
  step_d = jax.jit(lambda g, s, p: jo.update_and_apply(dev, g, s, p))
  ph = pd = params
  for i in range(2):
    g = _grads(params, i)
    ph, sh = step_h(g, sh, ph)
    pd, sd = step_d(g, sd, pd)
  assert _host_kinds(sh) == {"pinned_host"}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               (ph, sh), (pd, sd))
  if chunk == 1024:  # 'w' streams in 64 chunks, 'v' (5000 -> 20 blocks) in 5
    assert step_h.lower(g, sh, ph).as_text().count("while") >= 2
    u, s2 = jax.jit(host.update)(g, sh, ph)  # the plain Optax path streams too
    assert _host_kinds(s2) == {"pinned_host"}


def test_leaf_stream_orders_copies():
  """Offloaded leaves come in one by one: the copy of leaf j waits (an optimization barrier)
  for the update of leaf j - 2, and each leaf's state is fetched once, on the device."""
  params = {f"w{i}": 0.05 * jax.random.normal(jax.random.key(i), (16, 256)) for i in range(5)}
  tx = jo.adamw8bit(1e-3, min_8bit_size=0, offload=True)
  state = tx.init(params)
  grads = _grads(params, 0)
  text = jax.jit(lambda g, s, p: jo.update_and_apply(tx, g, s, p)).lower(
      grads, state, params).as_text()
  assert text.count("optimization_barrier") == 5 - 2
  stream = _offload.LeafStream([jnp.full(3, i, jnp.float32) for i in range(4)], prefetch=1)
  for i in range(4):
    leaf = stream.get(i)
    np.testing.assert_array_equal(np.asarray(leaf), np.full(3, i))
    stream.done(i, leaf * 2)


def test_offload_state_wrapper():
  params = _params()
  g = _grads(params, 0)
  wrapped = jo.offload_state(jo.lion8bit(1e-4))
  assert isinstance(wrapped, jo.Optimizer8bit) and wrapped.spec.options.offload
  generic = jo.offload_state(optax.adam(1e-3))
  state = generic.init(params)
  assert _host_kinds(state) == {"pinned_host"}
  u, state = jax.jit(generic.update)(g, state, params)
  ref, _ = optax.adam(1e-3).update(g, optax.adam(1e-3).init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u, ref)
  assert _host_kinds(state) == {"pinned_host"}


def test_chunking_rule():
  assert _offload.n_chunks(262144, 256, 1 << 22) == 16
  assert _offload.n_chunks(20, 256, 1024) == 5
  assert _offload.n_chunks(8, 256, 1 << 22) == 1  # fits in one chunk
  assert _offload.n_chunks(7919, 256, 1024) == 1  # prime block count: no even split
  assert _offload.n_chunks(64, 256, None) == 1
  with pytest.raises(ValueError, match="offload_chunk"):
    jo.adamw8bit(1e-3, offload=True, offload_chunk=100)


@pytest.mark.gpu
def test_gpu_offload_streams_with_small_device_footprint():
  params = {f"w{i}": 0.05 * jax.random.normal(jax.random.key(i), (2048, 2048)) for i in range(4)}
  grads = {k: 1e-3 * jnp.ones_like(v) for k, v in params.items()}
  host = jo.adamw8bit(1e-3, offload=True, offload_chunk=1 << 18)
  dev = jo.adamw8bit(1e-3)
  sh, sd = host.init(params), dev.init(params)
  step_h = jax.jit(lambda g, s, p: jo.update_and_apply(host, g, s, p))
  step_d = jax.jit(lambda g, s, p: jo.update_and_apply(dev, g, s, p))
  ph, sh = step_h(grads, sh, params)
  pd, sd = step_d(grads, sd, params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               (ph, sh), (pd, sd))
  assert _host_kinds(sh) == {"pinned_host"}
  def device_bytes(step, s, p):
    ma = step.lower(grads, s, p).compile().memory_analysis()
    return ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes

  # The state is an argument and an output of the on-device step (2x its size); streamed from
  # the host, at most a few chunks of it are on the device.
  saved = device_bytes(step_d, sd, pd) - device_bytes(step_h, sh, ph)
  assert saved > 1.5 * jo.state_nbytes(sd), (saved, jo.state_nbytes(sd))
