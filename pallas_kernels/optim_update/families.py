"""Optimizer families: state layout, hyperparameter vector and the elementwise update math.

The math is written once, as plain ``jnp`` on float32 arrays and scalar hyperparameters, and is
shared by the reference (``reference.py``) and the fused kernel (``kernel.py``), so the two can
only differ in how the state is decoded and re-encoded.

Every family computes a *direction* ``d`` and the new state from the gradient; the update is then

    u = -lr * (d + wd * p)

so an Optax ``scale_by_*`` transform is ``lr = -1, wd = 0`` (``u = d``) and an alias such as
``adamw`` folds its decoupled weight decay and learning rate into the same pass. Hyperparameters
travel as one float32 vector (traced, so schedules and ``optax.inject_hyperparams`` do not
recompile). ``omb1`` etc. hold ``1 - b1`` computed by the caller (in double precision for
Python numbers, as Optax does, rather than from the float32 ``b1``); flags that change the
program (``nesterov``, ``eps_in_sqrt``) are static.

Formulas are Optax's (``scale_by_adam``, ``scale_by_lion``, ``trace``, ``scale_by_rms``,
``scale_by_rss``, ``contrib.scale_by_ademamix``), which equal bitsandbytes' kernels up to the
order in which decoupled weight decay is applied (a term of order ``lr**2 * wd``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

__all__ = ["Family", "FAMILIES", "HP_SIZE", "LR", "WD", "GSCALE", "hparam_index", "epilogue"]

# Slots common to every family; family-specific names follow from slot 3.
LR, WD, GSCALE = 0, 1, 2
_COMMON = ("lr", "wd", "gscale")
HP_SIZE = 16  # a power of two, as Triton wants

Scalars = Mapping[str, jax.Array]
StepFn = Callable[..., tuple[jax.Array, tuple[jax.Array, ...]]]


@dataclasses.dataclass(frozen=True)
class Family:
  """One optimizer family.

  Attributes:
    name: e.g. ``"adam"``.
    signed: per state, whether it takes the signed dynamic map (moments of the gradient) or the
      unsigned one (sums of squares).
    hparams: names of the family's scalars, stored after the common ``lr, wd, gscale``.
    flags: names of the static boolean options the math reads.
    step: ``step(g, states, h, flags) -> (direction, new_states)`` on float32 arrays; ``h`` maps
      hyperparameter names to scalars, ``flags`` names to Python bools.
  """
  name: str
  signed: tuple[bool, ...]
  hparams: tuple[str, ...]
  flags: tuple[str, ...]
  step: StepFn

  @property
  def n_states(self) -> int:
    return len(self.signed)

  def unpack(self, get: Callable[[int], jax.Array]) -> dict[str, jax.Array]:
    """``{name: get(slot)}`` for every hyperparameter of this family."""
    names = _COMMON + self.hparams
    return {name: get(i) for i, name in enumerate(names)}


def hparam_index(family: Family, name: str) -> int:
  return (_COMMON + family.hparams).index(name)


def _adam(g, states, h, flags):
  m, v = states
  m = h["b1"] * m + h["omb1"] * g
  v = h["b2"] * v + h["omb2"] * (g * g)
  if flags["nesterov"]:
    m_hat = h["b1"] * m * h["c1_next"] + h["omb1"] * g * h["c1"]
  else:
    m_hat = m * h["c1"]
  direction = m_hat / (jnp.sqrt(v * h["c2"] + h["eps_root"]) + h["eps"])
  return direction, (m, v)


def _sign(x):
  one = jnp.ones_like(x)
  return jnp.where(x > 0, one, jnp.where(x < 0, -one, jnp.zeros_like(x)))


def _lion(g, states, h, flags):
  del flags
  (m,) = states
  direction = _sign(h["b1"] * m + h["omb1"] * g)
  m = h["b2"] * m + h["omb2"] * g
  return direction, (m,)


def _momentum(g, states, h, flags):
  (t,) = states
  t = g + h["beta"] * t
  direction = g + h["beta"] * t if flags["nesterov"] else t
  return direction, (t,)


def _ademamix(g, states, h, flags):
  del flags
  m1, m2, nu = states
  m1 = h["b1"] * m1 + h["omb1"] * g
  m2 = h["b3"] * m2 + h["omb3"] * g
  nu = h["b2"] * nu + h["omb2"] * (g * g)
  direction = (m1 * h["c1"] + h["alpha"] * m2) / (jnp.sqrt(nu * h["c2"] + h["eps_root"]) + h["eps"])
  return direction, (m1, m2, nu)


def _rmsprop(g, states, h, flags):
  (nu,) = states
  nu = h["decay"] * nu + h["omdecay"] * (g * g)
  nu_hat = nu * h["c"]
  if flags["eps_in_sqrt"]:
    direction = g * jax.lax.rsqrt(nu_hat + h["eps"])
  else:
    direction = g / (jnp.sqrt(nu_hat) + h["eps"])
  return direction, (nu,)


def _adagrad(g, states, h, flags):
  del flags
  (s,) = states
  s = s + g * g
  direction = jnp.where(s > 0, jax.lax.rsqrt(s + h["eps"]), jnp.zeros_like(s)) * g
  return direction, (s,)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("adam", (True, False),
               ("b1", "b2", "omb1", "omb2", "eps", "eps_root", "c1", "c2", "c1_next"),
               ("nesterov",), _adam),
        Family("lion", (True,), ("b1", "b2", "omb1", "omb2"), (), _lion),
        Family("momentum", (True,), ("beta",), ("nesterov",), _momentum),
        Family("ademamix", (True, True, False),
               ("b1", "b2", "b3", "omb1", "omb2", "omb3", "alpha", "eps", "eps_root", "c1",
                "c2"), (), _ademamix),
        Family("rmsprop", (False,), ("decay", "omdecay", "eps", "c"), ("eps_in_sqrt",), _rmsprop),
        Family("adagrad", (False,), ("eps",), (), _adagrad),
    )
}


def epilogue(direction: jax.Array, p: jax.Array | None, h: Scalars) -> jax.Array:
  """``-lr * (direction + wd * p)``; without ``p`` (no weight decay) ``-lr * direction``."""
  if p is None:
    return -h["lr"] * direction
  return -h["lr"] * (direction + h["wd"] * p)


def flag_dict(family: Family, flags: tuple[tuple[str, bool], ...]) -> dict[str, bool]:
  """Static flags as a dict, every flag of ``family`` present (default ``False``, except
  ``eps_in_sqrt`` which defaults to ``True`` as in Optax)."""
  given = dict(flags)
  unknown = set(given) - set(family.flags)
  if unknown:
    raise ValueError(f"flags {sorted(unknown)} do not apply to family {family.name!r} "
                     f"(accepted: {family.flags})")
  defaults = {"nesterov": False, "eps_in_sqrt": True}
  return {name: bool(given.get(name, defaults[name])) for name in family.flags}
