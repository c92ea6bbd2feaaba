"""Options shared by every 8-bit transform, and the checks of their hyperparameters.

Hyperparameters may be Python numbers, concrete arrays, schedules (callables of the step) or,
under ``optax.inject_hyperparams``, traced scalars; only values known outside tracing can be
checked, and those are checked when the transform is built.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable

import jax
import numpy as np

from jaxquant import _dispatch, _validate

__all__ = ["Options", "check_nonnegative", "check_beta", "check_positive_int", "concrete_value",
           "is_static_zero", "initial_value"]

BLOCKSIZES = _validate.BLOCKSIZES_8BIT


def concrete_value(x: Any) -> float | None:
  """``float(x)`` for a number or a concrete scalar array, else ``None`` (traced/schedule)."""
  if callable(x) or isinstance(x, jax.core.Tracer):
    return None
  if isinstance(x, numbers.Number):
    return float(x)
  if hasattr(x, "shape") and np.ndim(x) == 0:
    return float(np.asarray(jax.device_get(x)))
  return None


def is_static_zero(x: Any) -> bool:
  return concrete_value(x) == 0.0


def check_nonnegative(name: str, value: Any) -> None:
  """Reject a known negative (or non-finite) value; schedules and traced values pass."""
  v = concrete_value(value)
  if v is not None and not (np.isfinite(v) and v >= 0):
    raise ValueError(f"{name} must be a finite number >= 0 (or a schedule), got {value!r}")
  if v is None and not callable(value) and not isinstance(value, jax.core.Tracer):
    raise TypeError(f"{name} must be a number, a scalar array or a schedule, got "
                    f"{type(value).__name__}")


def check_beta(name: str, value: Any, *, allow_zero: bool = True) -> None:
  """Require ``0 <= value < 1`` (``0 < value < 1`` without ``allow_zero``) when known; a traced
  value (``optax.inject_hyperparams``) passes, a schedule is refused (use inject_hyperparams)."""
  v = concrete_value(value)
  if v is None:
    if not isinstance(value, jax.core.Tracer):
      hint = (" (a schedule is not accepted here; wrap the optimizer in "
              "optax.inject_hyperparams to change it during training)" if callable(value) else "")
      raise TypeError(f"{name} must be a number in [0, 1), got {type(value).__name__}{hint}")
    return
  low_ok = v >= 0 if allow_zero else v > 0
  if not (low_ok and v < 1):
    interval = "[0, 1)" if allow_zero else "(0, 1)"
    raise ValueError(f"{name} must lie in {interval}, got {value!r}")


def initial_value(name: str, value: Any) -> Any:
  """A state's initial value: a float, or a traced scalar passed through.

  ``optax.inject_hyperparams`` injects every numeric argument, this one included, and rebuilds
  the transform inside each ``update`` with traced values; ``update`` never reads the initial
  value, and ``init`` (which does) gets it concrete. Schedules are refused.
  """
  v = concrete_value(value)
  if v is not None:
    return v
  if isinstance(value, jax.core.Tracer):
    return value
  raise ValueError(f"{name} must be a number (not a schedule), got {value!r}")


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


KeepPredicate = Callable[[str, Any], bool]


@dataclasses.dataclass(frozen=True, eq=False)
class Options:
  """How state is stored and computed; the same for every 8-bit transform.

  Attributes:
    min_8bit_size: parameters with fewer elements keep float32 state (bitsandbytes: 4096);
      empty parameters always do.
    blocksize: elements per absmax block (bitsandbytes' optimizers: 256; the fused kernel
      covers 256 only, other sizes run the reference).
    keep_32bit: leaves whose state stays float32 whatever their size (e.g. an embedding
      trained like bitsandbytes' ``StableEmbedding``): ``None``, a pytree of bools shaped like
      the parameters, or a predicate ``f(path, param) -> bool`` where ``path`` is
      ``jax.tree_util.keystr`` of the leaf's path, e.g. ``"['embed']['embedding']"``.
    percentile_clipping: clip each parameter's gradient to this percentile of its last 100
      gradient norms (bitsandbytes' ``percentile_clipping``; 100 disables it).
    max_unorm: limit the norm of each parameter's update direction to ``max_unorm`` times the
      parameter's norm (bitsandbytes' LAMB/LARS ``max_unorm``; 0 disables it). Costs a second
      pass: such leaves run the reference, not the fused kernel.
    backend: ``None``/"auto", "xla", "pallas" or "interpret" (see ``jaxquant._dispatch``).
    offload: keep the state in host memory (``pinned_host``) and stream it through the device
      leaf by leaf inside the update.
    offload_chunk: with ``offload``, ``None`` (default) moves each leaf's state to the device
      and back whole, the next leaf's copy overlapping the current update (``_offload``'s
      ``LeafStream``); an integer streams each leaf's state in
      chunks of that many elements through a pipelined ``lax.scan`` (see ``_offload``; on an
      H100 with jax 0.11.2 this measured slower).
    kernel_config: launch parameters for the fused kernel (``None``: defaults), for tuning.
  """
  min_8bit_size: int = 4096
  blocksize: int = 256
  keep_32bit: Any = None
  percentile_clipping: int = 100
  max_unorm: float = 0.0
  backend: str | None = None
  offload: bool = False
  offload_chunk: int | None = None
  kernel_config: Any = None

  def __post_init__(self):
    check_positive_int("min_8bit_size", self.min_8bit_size, minimum=0)
    _validate.check_choice("blocksize", self.blocksize, BLOCKSIZES)
    if not (isinstance(self.percentile_clipping, numbers.Integral)
            and 1 <= self.percentile_clipping <= 100):
      raise ValueError("percentile_clipping must be an integer in [1, 100] (100 disables it), "
                       f"got {self.percentile_clipping!r}")
    mu = concrete_value(self.max_unorm)
    if mu is None or not (np.isfinite(mu) and mu >= 0):
      raise ValueError(f"max_unorm must be a number >= 0 (0 disables it), got {self.max_unorm!r}")
    object.__setattr__(self, "max_unorm", float(mu))
    if self.backend is not None and self.backend not in _dispatch.BACKENDS:
      raise ValueError(f"backend must be one of {_dispatch.BACKENDS} or None, got {self.backend!r}")
    if not isinstance(self.offload, bool):
      raise TypeError(f"offload must be True or False, got {self.offload!r}")
    if self.offload_chunk is not None:
      check_positive_int("offload_chunk", self.offload_chunk, minimum=self.blocksize)
    if self.keep_32bit is not None and not callable(self.keep_32bit):
      bad = [x for x in jax.tree_util.tree_leaves(self.keep_32bit) if not isinstance(
          x, (bool, np.bool_))]
      if bad:
        raise TypeError("keep_32bit must be None, a predicate f(path, param) -> bool or a pytree "
                        f"of bools, got a tree with leaf {bad[0]!r}")

  def replace(self, **changes: Any) -> "Options":
    return dataclasses.replace(self, **changes)


def keep_32bit_leaves(options: Options, params: Any) -> list[bool]:
  """Per leaf of ``params`` (flattened order): whether its state stays float32."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  forced: list[bool]
  keep = options.keep_32bit
  if keep is None:
    forced = [False] * len(with_path)
  elif callable(keep):
    forced = [bool(keep(jax.tree_util.keystr(path), leaf)) for path, leaf in with_path]
  else:
    try:
      forced = [bool(x) for x in treedef.flatten_up_to(keep)]
    except (ValueError, TypeError) as e:
      raise ValueError(f"keep_32bit must have the structure of the parameters: {e}") from None
  sizes = [int(np.prod(leaf.shape)) for _, leaf in with_path]
  # An empty leaf has nothing to quantize (and no block for the fused kernel to run on).
  return [f or n < options.min_8bit_size or n == 0 for f, n in zip(forced, sizes)]
