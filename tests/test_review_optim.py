"""jaxquant.optim as an Optax user wraps it: inject_hyperparams of every alias, Optax's prefix
masks, hyperparameter checks of the chained aliases, non-finite gradients (nnx.Optimizer under
MultiSteps / apply_if_finite: tests/test_optim.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxquant.optim as jo
from jaxquant import QuantState


def _params():
  k1, k2 = jax.random.split(jax.random.key(0), 2)
  return {"enc": {"w": 0.05 * jax.random.normal(k1, (16, 256)), "b": jnp.zeros(8)},
          "dec": {"w": 0.05 * jax.random.normal(k2, (16, 256))}}


def _grads(params, seed):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([1e-2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _run(tx, params, steps=3):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(steps):
    updates, state = update(_grads(params, i), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- optax.inject_hyperparams ----------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs", [
    ("rmsprop8bit", {}), ("rmsprop8bit", {"momentum": 0.9}),
    ("adagrad8bit", {"initial_accumulator_value": 0.5})])
def test_state_initial_value_under_inject_hyperparams(name, kwargs):
  """inject_hyperparams injects every numeric argument (defaults included) and rebuilds the
  transform inside ``update`` with traced values, the state's initial value among them
  (rmsprop8bit's initial_scale, adagrad8bit's initial_accumulator_value); init uses it."""
  params = {"w": _params()["dec"]["w"], "b": jnp.zeros(8)}
  alias = getattr(jo, name)
  injected = optax.inject_hyperparams(alias)(learning_rate=1e-2, **kwargs)
  init = jax.jit(injected.init)(params)
  assert float(optax.tree_utils.tree_get(init, "learning_rate")) == pytest.approx(1e-2)
  if name == "adagrad8bit":
    acc = init.inner_state.sum_of_squares
    np.testing.assert_array_equal(np.asarray(acc["b"]), np.full(8, 0.5, np.float32))
  got, _ = _run(injected, params, steps=2)
  want, _ = _run(alias(1e-2, **kwargs), params, steps=2)
  # 1 - decay in float32 (traced) vs double: a code may flip at a midpoint, moving a parameter
  # by a small fraction of lr.
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


# -- weight decay mask -------------------------------------------------------------------------


def test_weight_decay_mask_may_be_a_prefix_tree():
  """optax.adamw(mask=...) takes a mask that is a prefix of the parameters' structure
  (optax.masked broadcasts each bool over its subtree); the 8-bit aliases must too."""
  params, grads = _params(), _grads(_params(), 0)

  def update(**kw):
    tx = jo.adamw8bit(1e-2, min_8bit_size=1 << 20, **kw)  # float32 state: the mask is the point
    return tx.update(grads, tx.init(params), params)[0]

  want = update(weight_decay=0.5, mask={"enc": {"w": False, "b": False}, "dec": {"w": True}})
  for prefix in ({"enc": False, "dec": True}, lambda p: {"enc": False, "dec": True}):
    _same(update(weight_decay=0.5, mask=prefix), want)
  no_decay = update(weight_decay=0.0)
  _same(want["enc"], no_decay["enc"])
  assert not np.allclose(np.asarray(want["dec"]["w"]), np.asarray(no_decay["dec"]["w"]))
  with pytest.raises(ValueError, match="mask must be a pytree of bools"):
    update(weight_decay=0.5, mask={"enc": False, "other": True})


# -- hyperparameter checks ---------------------------------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: jo.rmsprop8bit(-1e-3, momentum=0.9), "learning_rate"),
    (lambda: jo.lamb8bit(1e-3, weight_decay=-0.1), "weight_decay"),
    (lambda: jo.lars8bit(1e-3, weight_decay=-0.1), "weight_decay"),
    (lambda: jo.adam8bit(1e-3, b1=optax.constant_schedule(0.9)), "b1 .*inject_hyperparams"),
    (lambda: jo.lion8bit(1e-3, b2=lambda count: 0.99), "b2 .*inject_hyperparams"),
    (lambda: jo.sgd8bit(1e-3, momentum=lambda count: 0.9), "momentum .*inject_hyperparams"),
    (lambda: jo.rmsprop8bit(1e-3, decay=lambda count: 0.9), "decay .*inject_hyperparams"),
])
def test_bad_hyperparameters_of_chained_aliases_and_schedules_rejected(make, match):
  """Refused when the optimizer is built, naming the argument (negative values went through the
  chained aliases; a schedule where Optax takes a number failed at the first update with
  ``unsupported operand type(s) for -: 'float' and 'function'``)."""
  with pytest.raises((ValueError, TypeError), match=match):
    make()


def test_explicit_kernel_backend_with_float32_leaves():
  """backend="interpret" (or "pallas" on a GPU) forces the fused kernel; a model also has
  leaves kept in float32 (biases under min_8bit_size, keep_32bit), which have only the XLA
  update: they must take it (the update raised "backend='interpret' is not available for
  optim_update_fp32"). Equal to the default backend."""
  params = {"w": _params()["dec"]["w"][:4], "b": jnp.ones(8)}
  grads = _grads(params, 0)
  forced = jo.adamw8bit(1e-2, backend="interpret", min_8bit_size=256)
  auto = forced.with_options(backend=None)
  got, state = forced.update(grads, forced.init(params), params)
  want, _ = auto.update(grads, auto.init(params), params)
  assert isinstance(state.mu["w"], QuantState) and not isinstance(state.mu["b"], QuantState)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-7)


def test_empty_leaf_with_min_8bit_size_zero():
  """min_8bit_size=0 (bitsandbytes' "everything in 8 bits", as in its tests) with an empty
  parameter: the fused kernel has no block to run on (it failed deep in the slicing)."""
  params = {"empty": jnp.zeros((0, 256)), "w": _params()["dec"]["w"]}
  tx = jo.adamw8bit(1e-2, min_8bit_size=0, backend="interpret")
  state = tx.init(params)
  assert isinstance(state.mu["w"], QuantState)
  updates, state = tx.update(_grads(params, 0), state, params)
  assert updates["empty"].shape == (0, 256) and state.mu["empty"].shape == (0, 256)


# -- non-finite gradients ----------------------------------------------------------------------


def test_apply_if_finite_skips_a_non_finite_step_bit_for_bit():
  """The documented recipe for gradients that may overflow: the step with an inf is skipped
  (8-bit state unchanged, zero update) and training continues as if it never happened."""
  params = {"w": _params()["dec"]["w"], "b": jnp.zeros(8)}
  tx = optax.apply_if_finite(jo.adamw8bit(1e-2), max_consecutive_errors=3)
  update = jax.jit(tx.update)
  state = tx.init(params)
  _, state = update(_grads(params, 0), state, params)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.inf), _grads(params, 1))
  updates, skipped = update(bad, state, params)
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
  _same(skipped.inner_state, state.inner_state)
  assert int(skipped.notfinite_count) == 1
  _same(update(_grads(params, 2), skipped, params)[0], update(_grads(params, 2), state, params)[0])
