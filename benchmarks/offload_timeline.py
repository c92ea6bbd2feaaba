"""Device timeline of the offloaded 8-bit AdamW step (W5, ``adamw8bit(offload=True)``).

Traces a few steps with ``jax.profiler``, reads the trace back with ``jax.profiler.ProfileData``
and prints, per GPU stream, the events of the last step (start and duration in ms from the
step's first event, kernel or copy name), each stream's busy time, and how long each link
direction and the kernels ran. The scheduled HLO of the step goes next to the trace, so the
order XLA gave the copies can be read beside the times they took. The last step's events go
to ``<out>/offload_timeline.json`` (committed as ``results/offload_timeline.json``).

``python benchmarks/offload_timeline.py [--leaves 16] [--dim 8192] [--out DIR]`` (GPU only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._trace import gpu_events, kind_of, split_calls  # noqa: E402
from benchmarks.optim_step import _block, _params  # noqa: E402
import jaxquant.optim as jo  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--leaves", type=int, default=16)
  ap.add_argument("--dim", type=int, default=8192)
  ap.add_argument("--steps", type=int, default=2)
  ap.add_argument("--out", default="/tmp/offload_timeline")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)

  params = _params(args.leaves, args.dim, 0, 0.02)
  grads = _params(args.leaves, args.dim, 1, 1e-3)
  tx = jo.adamw8bit(1e-3, weight_decay=1e-4, offload=True)
  state = tx.init(params)
  step = jax.jit(lambda p, g, s: jo.update_and_apply(tx, g, s, p), donate_argnums=(0,))
  compiled = step.lower(params, grads, state).compile()
  with open(os.path.join(args.out, "step_hlo.txt"), "w") as f:
    f.write(compiled.as_text())
  for _ in range(2):
    params, state = compiled(params, grads, state)
  _block((params, state))
  trace_dir = os.path.join(args.out, "trace")
  with jax.profiler.trace(trace_dir):
    for _ in range(args.steps):
      params, state = compiled(params, grads, state)
      _block((params, state))

  events = gpu_events(trace_dir)
  if not events:
    raise SystemExit("no GPU events in the trace")
  last = split_calls(events, args.steps)[-1]
  t0 = last[0]["start_ms"]
  end = max(e["start_ms"] + e["dur_ms"] for e in last)
  print(f"last step: {len(last)} events, {end - t0:.2f} ms from first to last event")
  busy: dict[str, float] = {}
  per_kind: dict[str, list[float]] = {}
  for e in last:
    busy[e["stream"]] = busy.get(e["stream"], 0.0) + e["dur_ms"]
    k = kind_of(e["name"])
    span = per_kind.setdefault(k, [1e30, -1e30, 0.0, 0])
    span[0] = min(span[0], e["start_ms"] - t0)
    span[1] = max(span[1], e["start_ms"] + e["dur_ms"] - t0)
    span[2] += e["dur_ms"]
    span[3] += 1
  for stream, ms in sorted(busy.items()):
    print(f"  stream {stream}: busy {ms:.2f} ms")
  for k, (a, b, total, n) in sorted(per_kind.items()):
    print(f"  {k}: {n} events, first start {a:.2f}, last end {b:.2f}, summed {total:.2f} ms")
  for e in last:
    if e["dur_ms"] > 0.05:
      print(f"  {e['start_ms'] - t0:8.3f} +{e['dur_ms']:7.3f}  {kind_of(e['name']):10s} "
            f"{e['stream'][-24:]:24s} {e['name'][:70]}")
  with open(os.path.join(args.out, "offload_timeline.json"), "w") as f:
    json.dump([dict(e, start_ms=e["start_ms"] - t0) for e in last], f)


if __name__ == "__main__":
  main()
