"""jaxquant.checkpoint as a Flax/Orbax user meets it: PRNG key arrays in a model's state, a
script that exits right after an asynchronous save."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant import checkpoint as ck

ROOT = pathlib.Path(__file__).resolve().parent.parent


class _Dropper(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(8, 8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)  # keeps an RNG stream: a typed key array

  def __call__(self, x):
    return self.drop(self.dense(x))


def _is_key(x):
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys(state):
  return [x for x in jax.tree.leaves(state) if _is_key(x)]


def test_nnx_state_with_rng_keys_round_trips(tmp_path):
  """nnx.state of a model with Dropout holds typed PRNG keys (dtype key<fry>); it must save and
  restore (into a fresh model, with and without a target), keys and stream counters intact."""
  model = _Dropper(nnx.Rngs(0))
  model(jnp.ones((2, 8)))  # advance the stream: the key to restore is not the initial one
  state = nnx.state(model)
  assert _keys(state)
  ck.save(tmp_path / "ck", {"model": state, "step": 1})
  fresh = _Dropper(nnx.Rngs(1))
  back = ck.restore(tmp_path / "ck", {"model": nnx.state(fresh), "step": 0})
  nnx.update(fresh, back["model"])
  raw = lambda x: jax.random.key_data(x) if _is_key(x) else x  # noqa: E731
  saved, restored = jax.tree.leaves(state), jax.tree.leaves(nnx.state(fresh))
  assert len(saved) == len(restored)
  for a, b in zip(restored, saved):  # RNG keys and counters included: the same dropout masks
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(raw(a)), np.asarray(raw(b)))
  plain = ck.restore(tmp_path / "ck")
  assert len(_keys(plain)) == len(_keys(state))
  abstract = ck.restore(tmp_path / "ck", ck.abstract({"model": state, "step": 1}))
  assert len(_keys(abstract)) == len(_keys(state))


def test_key_array_of_another_impl_is_refused(tmp_path):
  ck.save(tmp_path / "ck", {"key": jax.random.key(0, impl="rbg")})
  with pytest.raises(ValueError, match=r"entry 'key'.*key<rbg>.*key<fry>"):
    ck.restore(tmp_path / "ck", {"key": jax.random.key(0)})


_EXIT_RIGHT_AFTER_SAVE = textwrap.dedent("""
    import sys
    import numpy as np
    from jaxquant import checkpoint as ck
    d = sys.argv[1]
    tree = {"w": np.arange(1 << 20, dtype=np.float32), "step": 7}
    ck.save(d + "/single", tree, block=False)
    ck.CheckpointManager(d + "/run").save(7, tree)   # never closed
""")


def test_exit_right_after_an_async_save_keeps_the_checkpoint(tmp_path):
  """A script whose last line starts an asynchronous save: the interpreter's exit must wait for
  it (Orbax's background threads cannot finish once shutdown has begun: the checkpoint was lost
  and a traceback printed)."""
  env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-c", _EXIT_RIGHT_AFTER_SAVE, str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
  want = np.arange(1 << 20, dtype=np.float32)
  np.testing.assert_array_equal(ck.restore(tmp_path / "single")["w"], want)
  with ck.CheckpointManager(tmp_path / "run") as mngr:
    assert mngr.all_steps() == [7]
    np.testing.assert_array_equal(mngr.restore()["w"], want)


def test_linen_train_state_resumes_from_a_fresh_target(tmp_path):
  """Flax's Linen recipe: save the TrainState, restore into ``TrainState.create(...)`` of a new
  run. ``create`` sets ``step=0`` (a Python int) where the trained state holds an int32 array;
  a Python scalar and a 0-d array of the same kind restore into each other's place (the value as
  saved), and training resumes bit for bit."""
  from flax.training import train_state  # noqa: PLC0415

  from jaxquant import optim as jo  # noqa: PLC0415

  params = {"w": 0.05 * jax.random.normal(jax.random.key(0), (16, 256)), "b": jnp.zeros(256)}
  x = jax.random.normal(jax.random.key(1), (4, 16))
  apply = lambda p, x: x @ p["w"] + p["b"][None]  # noqa: E731
  create = lambda: train_state.TrainState.create(  # noqa: E731
      apply_fn=apply, params=params, tx=jo.adamw8bit(1e-2))

  @jax.jit
  def step(state):
    grads = jax.grad(lambda p: jnp.mean(state.apply_fn(p, x) ** 2))(state.params)
    return state.apply_gradients(grads=grads)

  state = step(step(create()))
  ck.save(tmp_path / "trained", state)
  resumed = ck.restore(tmp_path / "trained", create())
  assert int(resumed.step) == 2
  for a, b in zip(jax.tree.leaves(step(state)), jax.tree.leaves(step(resumed))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ck.save(tmp_path / "fresh", create())  # and the other way round
  assert ck.restore(tmp_path / "fresh", state).step == 0
  ck.save(tmp_path / "count", {"n": 1.5})
  with pytest.raises(ValueError, match="entry 'n'.*a Python float.*int32"):
    ck.restore(tmp_path / "count", {"n": jnp.zeros((), jnp.int32)})
