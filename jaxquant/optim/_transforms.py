"""``scale_by_*_8bit``: Optax's ``scale_by_adam``, ``scale_by_lion``, ``trace``, ``scale_by_rms``,
``scale_by_rss`` and ``contrib.scale_by_ademamix`` with blockwise 8-bit state.

Each returns the same updates as its Optax counterpart (up to the quantization of the state)
and keeps, per parameter of at least ``min_8bit_size`` elements, one byte per element and
state plus a float32 absmax per 256 elements. Storage options (``min_8bit_size``,
``keep_32bit``, ``percentile_clipping``, ``max_unorm``, ``backend``, ``offload``, ...) are the
keyword arguments of :class:`~jaxquant.optim.Options`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxquant.optim import _config, _core

__all__ = [
    "ScaleByAdam8bitState", "ScaleByLion8bitState", "ScaleBySgdMomentum8bitState",
    "ScaleByRms8bitState", "ScaleByAdagrad8bitState", "ScaleByAdemamix8bitState",
    "scale_by_adam_8bit", "scale_by_lion_8bit", "scale_by_sgd_momentum_8bit",
    "scale_by_rmsprop_8bit", "scale_by_adagrad_8bit", "scale_by_ademamix_8bit", "make",
]

Moments = Any  # pytree like the params: QuantState (8-bit) or float32 array (32-bit) leaves


class ScaleByAdam8bitState(NamedTuple):
  count: jax.Array  # int32 ()
  mu: Moments  # first moment, signed dynamic map
  nu: Moments  # second moment, unsigned dynamic map
  gnorm: Any = None  # per-leaf float32 (100,) with percentile clipping, else None


class ScaleByLion8bitState(NamedTuple):
  count: jax.Array
  mu: Moments
  gnorm: Any = None


class ScaleBySgdMomentum8bitState(NamedTuple):
  count: jax.Array
  trace: Moments
  gnorm: Any = None


class ScaleByRms8bitState(NamedTuple):
  count: jax.Array
  nu: Moments
  gnorm: Any = None


class ScaleByAdagrad8bitState(NamedTuple):
  count: jax.Array
  sum_of_squares: Moments
  gnorm: Any = None


class ScaleByAdemamix8bitState(NamedTuple):
  count: jax.Array
  m1: Moments  # fast EMA
  m2: Moments  # slow EMA
  nu: Moments
  gnorm: Any = None


def _inv_bias(beta, step):
  return 1.0 / (1.0 - jnp.asarray(beta, jnp.float32) ** step)


def make(family: str, state_cls: type, fields: tuple[str, ...], scalars, *,
         init_values: tuple[float, ...] | None = None, flags=(), learning_rate=None,
         weight_decay=0.0, wd_mask=None, options: dict[str, Any]) -> _core.Optimizer8bit:
  """Build an :class:`~jaxquant.optim.Optimizer8bit` (shared by transforms and aliases)."""
  # optax.inject_hyperparams binds the factory's signature and calls it again with the
  # var-keyword dict passed as one keyword, ``options={...}``: unwrap it.
  if set(options) == {"options"} and isinstance(options["options"], dict):
    options = options["options"]
  if learning_rate is not None:
    _config.check_nonnegative("learning_rate", learning_rate)
  _config.check_nonnegative("weight_decay", weight_decay)
  spec = _core.Spec(
      family=family, state_cls=state_cls, fields=fields,
      init_values=init_values or (0.0,) * len(fields), scalars=scalars,
      learning_rate=learning_rate, weight_decay=weight_decay, wd_mask=wd_mask,
      flags=tuple(flags), options=_config.Options(**options))
  return _core.build(spec)


def scale_by_adam_8bit(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, *, nesterov: bool = False,
                       **options: Any) -> _core.Optimizer8bit:
  """``optax.scale_by_adam`` with 8-bit ``mu`` (signed map) and ``nu`` (unsigned map).

  Args:
    b1, b2: decay rates of the first and second moments, in [0, 1).
    eps, eps_root: added outside / inside the square root of the second moment, >= 0.
    nesterov: Nesterov momentum (NAdam), as Optax.
    **options: :class:`~jaxquant.optim.Options` fields.
  """
  return _adam_like(b1, b2, eps, eps_root, nesterov, options)


def _adam_like(b1, b2, eps, eps_root, nesterov, options, **alias):
  _config.check_beta("b1", b1)
  _config.check_beta("b2", b2)
  _config.check_nonnegative("eps", eps)
  _config.check_nonnegative("eps_root", eps_root)

  def scalars(count, step):
    del count
    return dict(b1=b1, b2=b2, omb1=1.0 - b1, omb2=1.0 - b2, eps=eps, eps_root=eps_root,
                c1=_inv_bias(b1, step),
                c2=_inv_bias(b2, step), c1_next=_inv_bias(b1, step + 1.0))

  return make("adam", ScaleByAdam8bitState, ("mu", "nu"), scalars,
              flags=(("nesterov", bool(nesterov)),), options=options, **alias)


def scale_by_lion_8bit(b1=0.9, b2=0.99, **options: Any) -> _core.Optimizer8bit:
  """``optax.scale_by_lion`` (``sign(b1 * mu + (1 - b1) * g)``) with an 8-bit ``mu``."""
  return _lion_like(b1, b2, options)


def _lion_like(b1, b2, options, **alias):
  _config.check_beta("b1", b1)
  _config.check_beta("b2", b2)
  return make("lion", ScaleByLion8bitState, ("mu",),
              lambda c, s: dict(b1=b1, b2=b2, omb1=1.0 - b1, omb2=1.0 - b2),
              options=options, **alias)


def scale_by_sgd_momentum_8bit(momentum=0.9, nesterov: bool = False,
                               **options: Any) -> _core.Optimizer8bit:
  """``optax.trace(momentum, nesterov)`` with an 8-bit trace: ``t = g + momentum * t``, the
  update is ``t`` (or ``g + momentum * t`` with Nesterov)."""
  return _momentum_like(momentum, nesterov, options)


def _momentum_like(momentum, nesterov, options, **alias):
  if momentum is None or _config.is_static_zero(momentum):
    raise ValueError(
        f"momentum must lie in (0, 1) for an 8-bit momentum state, got {momentum!r}; for plain "
        "SGD without state use optax.sgd")
  _config.check_beta("momentum", momentum, allow_zero=False)
  return make("momentum", ScaleBySgdMomentum8bitState, ("trace",),
              lambda c, s: dict(beta=momentum), flags=(("nesterov", bool(nesterov)),),
              options=options, **alias)


def scale_by_rmsprop_8bit(decay=0.9, eps=1e-8, initial_scale=0.0, eps_in_sqrt: bool = True,
                          bias_correction: bool = False, **options: Any) -> _core.Optimizer8bit:
  """``optax.scale_by_rms`` with an 8-bit ``nu`` (unsigned map): ``g / sqrt(nu + eps)``
  (``eps_in_sqrt``) or ``g / (sqrt(nu) + eps)``."""
  return _rms_like(decay, eps, initial_scale, eps_in_sqrt, bias_correction, options)


def _rms_like(decay, eps, initial_scale, eps_in_sqrt, bias_correction, options, **alias):
  _config.check_beta("decay", decay)
  _config.check_nonnegative("eps", eps)
  _config.check_nonnegative("initial_scale", initial_scale)
  init = _config.initial_value("initial_scale", initial_scale)

  def scalars(count, step):
    del count
    return dict(decay=decay, omdecay=1.0 - decay, eps=eps,
                c=_inv_bias(decay, step) if bias_correction else 1.0)

  return make("rmsprop", ScaleByRms8bitState, ("nu",), scalars, init_values=(init,),
              flags=(("eps_in_sqrt", bool(eps_in_sqrt)),), options=options, **alias)


def scale_by_adagrad_8bit(initial_accumulator_value=0.1, eps=1e-7,
                          **options: Any) -> _core.Optimizer8bit:
  """``optax.scale_by_rss`` with an 8-bit sum of squares (unsigned map): ``g / sqrt(s + eps)``."""
  return _adagrad_like(initial_accumulator_value, eps, options)


def _adagrad_like(initial_accumulator_value, eps, options, **alias):
  _config.check_nonnegative("initial_accumulator_value", initial_accumulator_value)
  _config.check_nonnegative("eps", eps)
  init = _config.initial_value("initial_accumulator_value", initial_accumulator_value)
  return make("adagrad", ScaleByAdagrad8bitState, ("sum_of_squares",),
              lambda c, s: dict(eps=eps), init_values=(init,), options=options, **alias)


def scale_by_ademamix_8bit(b1=0.9, b2=0.999, b3=0.9999, alpha=6.0, eps=1e-8, eps_root=0.0,
                           **options: Any) -> _core.Optimizer8bit:
  """``optax.contrib.scale_by_ademamix`` with 8-bit ``m1``, ``m2`` (signed) and ``nu``
  (unsigned). ``b3`` and ``alpha`` may be schedules of the step count, as in Optax."""
  return _ademamix_like(b1, b2, b3, alpha, eps, eps_root, options)


def _ademamix_like(b1, b2, b3, alpha, eps, eps_root, options, **alias):
  _config.check_beta("b1", b1)
  _config.check_beta("b2", b2)
  if not callable(b3):
    _config.check_beta("b3", b3)
  if not callable(alpha):
    _config.check_nonnegative("alpha", alpha)
  _config.check_nonnegative("eps", eps)
  _config.check_nonnegative("eps_root", eps_root)

  def scalars(count, step):
    b3_t = b3(count) if callable(b3) else b3
    return dict(b1=b1, b2=b2, b3=b3_t, omb1=1.0 - b1, omb2=1.0 - b2, omb3=1.0 - b3_t,
                alpha=alpha(count) if callable(alpha) else alpha, eps=eps, eps_root=eps_root,
                c1=_inv_bias(b1, step), c2=_inv_bias(b2, step))

  return make("ademamix", ScaleByAdemamix8bitState, ("m1", "m2", "nu"), scalars,
              options=options, **alias)
