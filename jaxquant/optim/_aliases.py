"""Optimizers with 8-bit state, with the names, hyperparameters and defaults of Optax's aliases.

``adam8bit``, ``adamw8bit``, ``lion8bit``, ``sgd8bit``, ``rmsprop8bit``, ``adagrad8bit`` and
``ademamix8bit`` fold the learning rate (scalar or schedule) and the decoupled weight decay into
the fused update: one pass over gradient, parameter and state per step. ``lamb8bit`` and
``lars8bit`` chain the 8-bit moments with Optax's ``scale_by_trust_ratio``, exactly as Optax
builds ``lamb`` and ``lars``.

Every alias also takes the storage options of :class:`~jaxquant.optim.Options` as keyword
arguments (``min_8bit_size=4096``, ``keep_32bit``, ``percentile_clipping=100``,
``max_unorm=0.0``, ``backend``, ``offload=False``, ...).

Deviations from Optax: ``sgd8bit`` defaults to ``momentum=0.9`` (plain SGD has no state to
quantize; ``momentum=None`` raises); ``rmsprop8bit`` does not implement ``centered=True``;
``mu_dtype`` does not exist (the state is 8-bit).
"""

from __future__ import annotations

from typing import Any

import optax

from jaxquant.optim import _config, _core, _transforms

__all__ = ["adam8bit", "adamw8bit", "lion8bit", "sgd8bit", "rmsprop8bit", "adagrad8bit",
           "ademamix8bit", "lamb8bit", "lars8bit"]


def adam8bit(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, *, nesterov: bool = False,
             **options: Any) -> _core.Optimizer8bit:
  """``optax.adam`` with 8-bit moments (bitsandbytes ``Adam8bit``)."""
  return _transforms._adam_like(b1, b2, eps, eps_root, nesterov, options,
                                learning_rate=learning_rate)


def adamw8bit(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=1e-4,
              mask=None, *, nesterov: bool = False, **options: Any) -> _core.Optimizer8bit:
  """``optax.adamw`` with 8-bit moments (bitsandbytes ``AdamW8bit``).

  Args:
    learning_rate: scalar or schedule, >= 0.
    b1, b2: moment decay rates in [0, 1).
    eps, eps_root: stabilizers outside / inside the square root.
    weight_decay: decoupled weight decay (scalar or schedule), multiplied by the learning rate.
    mask: pytree of bools or callable of params: which leaves get weight decay.
    nesterov: NAdamW.
    **options: :class:`~jaxquant.optim.Options` fields (e.g. ``offload=True``).
  """
  return _transforms._adam_like(b1, b2, eps, eps_root, nesterov, options,
                                learning_rate=learning_rate, weight_decay=weight_decay,
                                wd_mask=mask)


def lion8bit(learning_rate, b1=0.9, b2=0.99, weight_decay=1e-3, mask=None,
             **options: Any) -> _core.Optimizer8bit:
  """``optax.lion`` with an 8-bit momentum (bitsandbytes ``Lion8bit``)."""
  return _transforms._lion_like(b1, b2, options, learning_rate=learning_rate,
                                weight_decay=weight_decay, wd_mask=mask)


def sgd8bit(learning_rate, momentum=0.9, nesterov: bool = False,
            **options: Any) -> _core.Optimizer8bit:
  """``optax.sgd`` with momentum, the trace in 8 bits (bitsandbytes ``SGD8bit``)."""
  return _transforms._momentum_like(momentum, nesterov, options, learning_rate=learning_rate)


def rmsprop8bit(learning_rate, decay=0.9, eps=1e-8, initial_scale=0.0, eps_in_sqrt: bool = True,
                centered: bool = False, momentum=None, nesterov: bool = False,
                bias_correction: bool = False,
                **options: Any) -> optax.GradientTransformationExtraArgs:
  """``optax.rmsprop`` with an 8-bit second moment (and 8-bit momentum when ``momentum`` is
  set, chained as Optax does)."""
  if centered:
    raise ValueError("centered=True is not implemented for rmsprop8bit (bitsandbytes rejects it "
                     "too); use centered=False")
  if momentum is None:
    return _transforms._rms_like(decay, eps, initial_scale, eps_in_sqrt, bias_correction,
                                 options, learning_rate=learning_rate)
  _check_lr(learning_rate)
  return optax.chain(
      _transforms.scale_by_rmsprop_8bit(decay, eps, initial_scale, eps_in_sqrt, bias_correction,
                                        **options),
      optax.scale_by_learning_rate(learning_rate),
      _transforms.scale_by_sgd_momentum_8bit(momentum, nesterov, **options),
  )


def adagrad8bit(learning_rate, initial_accumulator_value=0.1, eps=1e-7,
                **options: Any) -> _core.Optimizer8bit:
  """``optax.adagrad`` with an 8-bit sum of squares (bitsandbytes ``Adagrad8bit``)."""
  return _transforms._adagrad_like(initial_accumulator_value, eps, options,
                                   learning_rate=learning_rate)


def ademamix8bit(learning_rate, b1=0.9, b2=0.999, b3=0.9999, alpha=5.0, eps=1e-8, eps_root=0.0,
                 weight_decay=0.0, mask=None, **options: Any) -> _core.Optimizer8bit:
  """``optax.contrib.ademamix`` with 8-bit EMAs and second moment (bitsandbytes
  ``AdEMAMix8bit``)."""
  return _transforms._ademamix_like(b1, b2, b3, alpha, eps, eps_root, options,
                                    learning_rate=learning_rate, weight_decay=weight_decay,
                                    wd_mask=mask)


def lamb8bit(learning_rate, b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0, weight_decay=0.0, mask=None,
             **options: Any) -> optax.GradientTransformationExtraArgs:
  """``optax.lamb`` (Adam moments in 8 bits, then weight decay, trust ratio, learning rate)."""
  _check_lr(learning_rate)
  _config.check_nonnegative("weight_decay", weight_decay)
  return optax.chain(
      _transforms.scale_by_adam_8bit(b1, b2, eps, eps_root, **options),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_trust_ratio(),
      optax.scale_by_learning_rate(learning_rate),
  )


def lars8bit(learning_rate, weight_decay=0.0, weight_decay_mask=True, trust_coefficient=0.001,
             eps=0.0, trust_ratio_mask=True, momentum=0.9, nesterov: bool = False,
             **options: Any) -> optax.GradientTransformationExtraArgs:
  """``optax.lars`` (weight decay, trust ratio, learning rate, then an 8-bit momentum)."""
  _check_lr(learning_rate)
  _config.check_nonnegative("weight_decay", weight_decay)
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps),
                   mask=trust_ratio_mask),
      optax.scale_by_learning_rate(learning_rate),
      _transforms.scale_by_sgd_momentum_8bit(momentum, nesterov, **options),
  )


def _check_lr(learning_rate) -> None:
  _config.check_nonnegative("learning_rate", learning_rate)
