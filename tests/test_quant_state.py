"""QuantState as a pytree: jit, device_put, tree.map, eval_shape; metadata and repr."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq


@pytest.fixture
def state():
  w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
  return jq.quantize_4bit(jnp.asarray(w, jnp.bfloat16), 64, True, "nf4")


def test_children_and_static_metadata(state):
  leaves, treedef = jax.tree.flatten(state)
  assert len(leaves) == 6 and all(isinstance(l, jax.Array) for l in leaves)
  assert state.data.shape == (64, 128) and state.absmax.shape == (64, 4)
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert rebuilt.shape == (64, 256) and rebuilt.dtype == jnp.bfloat16 and rebuilt.nested


def test_jit_device_put_tree_map(state):
  out = jax.jit(lambda s: s)(state)
  assert out.quant_type == "nf4" and out.blocksize == 64
  np.testing.assert_array_equal(np.asarray(out.data), np.asarray(state.data))
  moved = jax.device_put(state, jax.devices()[-1])
  assert moved.data.devices() == {jax.devices()[-1]}
  copied = jax.tree.map(lambda a: a + 0, state)
  np.testing.assert_array_equal(np.asarray(jq.dequantize_4bit(copied)),
                                np.asarray(jq.dequantize_4bit(state)))
  shapes = jax.eval_shape(lambda s: s, state)
  assert shapes.data.shape == state.data.shape and shapes.shape == state.shape
  sharded = jax.device_put(
      state, jax.sharding.NamedSharding(jax.make_mesh((len(jax.devices()),), ("x",)),
                                        jax.sharding.PartitionSpec()))
  assert sharded.data.sharding.is_fully_replicated


def test_state_is_jit_argument_without_recompiles(state):
  f = jax.jit(lambda s: jq.dequantize_4bit(s, jnp.float32))
  f(state)
  other = jq.quantize_4bit(np.ones((64, 256), np.float32), 64, True, "nf4")
  other = other.replace(code=other.code, offset=other.offset)
  assert f._cache_size() == 1
  f(jax.tree.map(lambda a: a, state))
  assert f._cache_size() == 1


def test_repr_and_bytes(state):
  text = repr(state)
  for part in ("shape=(64, 256)", "dtype=bfloat16", "quant_type='nf4'", "blocksize=64", "bytes="):
    assert part in text
  expected = 64 * 128 + 256 + 16 * 4 + 1 * 4 + 256 * 4 + 4
  assert state.nbytes == expected


def test_check_catches_inconsistent_arrays(state):
  with pytest.raises(ValueError, match="QuantState.data"):
    state.replace(data=state.data[:, :10]).check()
  with pytest.raises(ValueError, match="quant_type"):
    state.replace(quant_type="nf5")
  # check() ignores non-array leaves (PartitionSpecs, None) so tree utilities keep working.
  jax.tree.map(lambda a: jax.sharding.PartitionSpec(), state).check()
