"""jaxquant.checkpoint as a Flax/Orbax user meets it: PRNG key arrays in a model's state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant import checkpoint as ck


class _Dropper(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(8, 8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)  # keeps an RNG stream: a typed key array

  def __call__(self, x):
    return self.drop(self.dense(x))


def _keys(state):
  return [x for x in jax.tree.leaves(state) if hasattr(x, "dtype")
          and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]


def test_nnx_state_with_rng_keys_round_trips(tmp_path):
  """nnx.state of a model with Dropout holds typed PRNG keys (dtype key<fry>); it must save and
  restore (into a fresh model, with and without a target) and give the same dropout masks."""
  model = _Dropper(nnx.Rngs(0))
  model(jnp.ones((2, 8)))  # advance the stream: the key to restore is not the initial one
  state = nnx.state(model)
  assert _keys(state)
  ck.save(tmp_path / "ck", {"model": state, "step": 1})
  fresh = _Dropper(nnx.Rngs(1))
  back = ck.restore(tmp_path / "ck", {"model": nnx.state(fresh), "step": 0})
  for a, b in zip(_keys(back["model"]), _keys(state)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(a)),
                                  np.asarray(jax.random.key_data(b)))
  nnx.update(fresh, back["model"])
  x = jnp.ones((4, 8))
  np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(model(x)))
  plain = ck.restore(tmp_path / "ck")
  assert len(_keys(plain)) == len(_keys(state))
  abstract = ck.restore(tmp_path / "ck", ck.abstract({"model": state, "step": 1}))
  assert len(_keys(abstract)) == len(_keys(state))


def test_key_array_of_another_impl_is_refused(tmp_path):
  ck.save(tmp_path / "ck", {"key": jax.random.key(0, impl="rbg")})
  with pytest.raises(ValueError, match=r"entry 'key'.*key<rbg>.*key<fry>"):
    ck.restore(tmp_path / "ck", {"key": jax.random.key(0)})
