"""Shared timing helpers for the benchmark scripts (not a test utility: speed is never asserted).

A figure is the **median** over repetitions of the time per call, where one repetition runs the
function once on each of several distinct input sets back to back (so a 50 MB L2 cannot hold a
weight between calls, as ``TARGETS.md`` requires) and waits for the last result. Dispatch is
asynchronous, so for kernels of tens of microseconds the host loop overlaps the device work and
the time per call is the device time.

Usage::

  from benchmarks._timing import time_calls, report_env
  t = time_calls(jax.jit(f), [(w,) for w in weights], reps=30)
  print(t.median_us, t.min_us)
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import jax

__all__ = ["Timing", "time_calls", "time_interleaved", "report_env", "distinct_inputs"]


@dataclasses.dataclass(frozen=True)
class Timing:
  """Time per call in microseconds over ``reps`` repetitions.

  Attributes:
    median_us: median over repetitions of (wall time of one repetition / calls in it).
    min_us: the fastest repetition, per call.
    max_us: the slowest repetition, per call.
    reps: repetitions measured (after warm-up).
    calls_per_rep: distinct input sets rotated through in one repetition.
  """
  median_us: float
  min_us: float
  max_us: float
  reps: int
  calls_per_rep: int

  def as_dict(self) -> dict[str, float | int]:
    return dataclasses.asdict(self)


def _block(out: Any) -> None:
  jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, out)


def time_calls(fn: Callable[..., Any], arg_sets: Sequence[tuple[Any, ...]], *, reps: int = 30,
               warmup: int = 2) -> Timing:
  """Median time per call of ``fn`` rotating over ``arg_sets``.

  Args:
    fn: a (jitted) function; it is compiled during warm-up.
    arg_sets: distinct argument tuples, already on the device (e.g. 8 different weights).
    reps: repetitions to measure; each calls ``fn`` once per argument tuple.
    warmup: unmeasured repetitions first (compilation, allocator warm-up).

  Returns:
    A :class:`Timing` in microseconds per call.

  Raises:
    ValueError: ``arg_sets`` is empty or ``reps < 1``.
  """
  if not arg_sets:
    raise ValueError("arg_sets must hold at least one tuple of arguments, got none")
  if reps < 1:
    raise ValueError(f"reps must be >= 1, got {reps!r}")
  for _ in range(warmup):
    for args in arg_sets:
      out = fn(*args)
    _block(out)
  per_call = []
  for _ in range(reps):
    start = time.perf_counter()
    for args in arg_sets:
      out = fn(*args)
    _block(out)
    per_call.append((time.perf_counter() - start) / len(arg_sets) * 1e6)
  return Timing(median_us=statistics.median(per_call), min_us=min(per_call),
                max_us=max(per_call), reps=reps, calls_per_rep=len(arg_sets))


def time_interleaved(cases: dict[str, tuple[Callable[..., Any], Sequence[tuple[Any, ...]]]], *,
                     reps: int = 30, warmup: int = 2) -> dict[str, Timing]:
  """Like :func:`time_calls` for several functions measured in alternation.

  Each repetition times one rotation of every case in turn, so slow drifts of the machine
  (clocks, a neighbour on the GPU) hit all cases alike and their ratios stay meaningful.

  Args:
    cases: name → ``(fn, arg_sets)``.
    reps: repetitions; each times one rotation of every case.
    warmup: unmeasured repetitions first.

  Returns:
    name → :class:`Timing` in microseconds per call.
  """
  if not cases or any(not arg_sets for _, arg_sets in cases.values()):
    raise ValueError("cases must map names to (fn, non-empty arg_sets)")
  if reps < 1:
    raise ValueError(f"reps must be >= 1, got {reps!r}")
  per_call: dict[str, list[float]] = {name: [] for name in cases}
  for rep in range(warmup + reps):
    for name, (fn, arg_sets) in cases.items():
      start = time.perf_counter()
      for args in arg_sets:
        out = fn(*args)
      _block(out)
      if rep >= warmup:
        per_call[name].append((time.perf_counter() - start) / len(arg_sets) * 1e6)
  return {name: Timing(median_us=statistics.median(v), min_us=min(v), max_us=max(v), reps=reps,
                       calls_per_rep=len(cases[name][1])) for name, v in per_call.items()}


def distinct_inputs(make: Callable[[jax.Array], Any], count: int = 8,
                    seed: int = 0) -> list[Any]:
  """``count`` inputs ``make(key_i)`` with distinct keys, materialized on the device."""
  keys = jax.random.split(jax.random.key(seed), count)
  out = [make(k) for k in keys]
  _block(out)
  return out


def report_env() -> dict[str, str]:
  """Versions and device for the results JSON."""
  dev = jax.devices()[0]
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": getattr(dev, "device_kind", str(dev)),
      "platform": dev.platform,
      "jax": jax.__version__,
      "python": platform.python_version(),
  }
