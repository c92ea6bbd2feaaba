"""Read a ``jax.profiler`` trace back: the events the GPU ran, per stream (benchmark helper).

``gpu_events(trace_dir)`` returns every event on the trace's GPU planes (kernels and copies)
with its stream, name, start and duration, via ``jax.profiler.ProfileData`` (no TensorBoard).
``trace(fn, calls)`` runs ``fn`` ``calls`` times under the profiler and returns those events;
``split_calls(events, calls)`` cuts them back into one list per call.
"""

from __future__ import annotations

import glob
import os
import tempfile
from typing import Any, Callable

import jax

__all__ = ["gpu_events", "trace", "kind_of", "split_calls"]


def gpu_events(trace_dir: str) -> list[dict]:
  """Events on the GPU planes of the newest trace under ``trace_dir``, by start time.

  Returns:
    ``[{stream, name, start_ms, dur_ms}]``; ``start_ms`` on the trace's clock.

  Raises:
    FileNotFoundError: no ``*.xplane.pb`` under ``trace_dir``.
  """
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb under trace_dir={trace_dir!r}")
  data = jax.profiler.ProfileData.from_file(paths[-1])
  events = []
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      for ev in line.events:
        events.append({"stream": f"{plane.name}:{line.name}", "name": ev.name,
                       "start_ms": ev.start_ns / 1e6, "dur_ms": ev.duration_ns / 1e6})
  return sorted(events, key=lambda e: e["start_ms"])


def trace(fn: Callable[[], Any], calls: int, trace_dir: str | None = None) -> list[dict]:
  """GPU events of ``calls`` runs of ``fn()`` (each waited for), after one untraced run."""
  jax.block_until_ready(fn())
  trace_dir = trace_dir or tempfile.mkdtemp(prefix="jaxquant_trace_")
  with jax.profiler.trace(trace_dir):
    for _ in range(calls):
      jax.block_until_ready(fn())
  return gpu_events(trace_dir)


def kind_of(name: str) -> str:
  """``"h2d"``, ``"d2h"``, ``"other-copy"`` or ``"kernel"`` from a GPU event's name."""
  low = name.lower()
  if "memcpyh2d" in low or "htod" in low:
    return "h2d"
  if "memcpyd2h" in low or "dtoh" in low:
    return "d2h"
  if "memcpy" in low or "memset" in low:
    return "other-copy"
  return "kernel"


def split_calls(events: list[dict], calls: int) -> list[list[dict]]:
  """``events`` (by start time) of ``calls`` waited-for calls, one list per call: cut at the
  ``calls - 1`` largest gaps between consecutive starts (the host's waits between calls)."""
  gaps = sorted(((events[i + 1]["start_ms"] - events[i]["start_ms"], i + 1)
                 for i in range(len(events) - 1)), reverse=True)[:calls - 1]
  cuts = [0] + sorted(i for _, i in gaps) + [len(events)]
  return [events[a:b] for a, b in zip(cuts, cuts[1:])]
