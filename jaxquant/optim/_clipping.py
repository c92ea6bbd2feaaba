"""bitsandbytes' percentile clipping, per parameter, inside the 8-bit transforms or standalone.

bitsandbytes (<= 0.49, ``percentile_clipping`` argument of its optimizers) keeps, for each
parameter, the squared gradient norms of its last 100 steps. At step ``t`` (from 1) it stores
``|g|**2`` at slot ``t % 100`` (step 1 fills all 100 slots), takes ``clip`` as the square root
of the ``percentile``-th smallest stored value and scales the gradient by ``clip / |g|`` when
``|g| > clip``. A percentile of 100 disables it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


__all__ = ["HISTORY", "percentile_scale", "percentile_clipping", "PercentileClippingState"]

HISTORY = 100


def init_history() -> jax.Array:
  return jnp.zeros((HISTORY,), jnp.float32)


def percentile_scale(g: jax.Array, history: jax.Array, step: jax.Array,
                     percentile: int) -> tuple[jax.Array, jax.Array]:
  """The gradient scale of one parameter and its updated norm history.

  Args:
    g: the parameter's gradient, any shape.
    history: float32 ``(100,)`` squared norms of past steps.
    step: int32 scalar, the step being taken (1 for the first).
    percentile: integer in [1, 99].

  Returns:
    ``(scale, history)``: float32 scalar in (0, 1] and the new ``(100,)`` history.
  """
  gnorm2 = jnp.sum(jnp.square(g.astype(jnp.float32)))
  history = jnp.where(step == 1, jnp.full_like(history, gnorm2),
                      history.at[step % HISTORY].set(gnorm2))
  current = jnp.sqrt(gnorm2)
  clip = jnp.sqrt(jnp.sort(history)[percentile])
  scale = jnp.where(current > clip, clip / jnp.where(current > 0, current, 1.0), 1.0)
  return scale.astype(jnp.float32), history


class PercentileClippingState(NamedTuple):
  count: jax.Array  # int32 ()
  history: optax.Updates  # float32 (100,) per leaf


def percentile_clipping(percentile: int = 95) -> optax.GradientTransformation:
  """Per-parameter percentile clipping of gradients as an Optax transform.

  Use it before any optimizer, e.g. ``optax.chain(percentile_clipping(5), optax.adamw(1e-3))``;
  the 8-bit transforms also take ``percentile_clipping=`` and fold the scale into their fused
  update.

  Args:
    percentile: integer in [1, 99]: clip to this percentile of the last 100 gradient norms.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`PercentileClippingState`.
  """
  if not (isinstance(percentile, int) and 1 <= percentile <= 99):
    raise ValueError(f"percentile must be an integer in [1, 99], got {percentile!r}")

  def init_fn(params):
    return PercentileClippingState(jnp.zeros([], jnp.int32),
                                   jax.tree.map(lambda _: init_history(), params))

  def update_fn(updates, state, params=None):
    del params
    step = optax.safe_int32_increment(state.count)
    g_leaves, treedef = jax.tree_util.tree_flatten(updates)
    h_leaves = treedef.flatten_up_to(state.history)
    pairs = [percentile_scale(g, h, step, percentile) for g, h in zip(g_leaves, h_leaves)]
    new_g = [(g.astype(jnp.float32) * s).astype(g.dtype) for g, (s, _) in zip(g_leaves, pairs)]
    return (treedef.unflatten(new_g),
            PercentileClippingState(step, treedef.unflatten([h for _, h in pairs])))

  return optax.GradientTransformation(init_fn, update_fn)


