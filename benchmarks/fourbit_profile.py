"""Where the time of W1/W2 goes: the GPU kernels of the 4-bit matmul and of bf16, per layer.

Runs the same jitted programs as ``benchmarks/fourbit_matmul.py`` (8 distinct 8192×8192
weights per call, NF4, blocksize 64, double quant, bf16 activations) under ``jax.profiler``
and prints, for each M and for W2 (M = 4096, forward + backward to the input), the kernels
each program launched with their time per layer (summed over a call, divided by 8 layers,
median over the traced calls), beside the bf16 program's. For the 4-bit kernels it also prints
the bandwidth they reached on the weight's bytes. Writes ``<out>/fourbit_profile.json``.

``PYTHONPATH=$PWD python3 benchmarks/fourbit_profile.py [--ms 1,16,128,512,4096] [--out DIR]``
(GPU only).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jaxquant as jq  # noqa: E402
from benchmarks import fourbit_matmul as w1  # noqa: E402
from benchmarks._timing import report_env  # noqa: E402
from benchmarks._trace import kind_of, split_calls, trace  # noqa: E402

CALLS = 5


def _per_layer(events: list[dict], calls: int) -> dict:
  """Kernel time per layer by kernel name, the kernels' sum, and the call's device span."""
  kernels = [e for e in events if kind_of(e["name"]) == "kernel"]
  if not kernels:
    return {"kernels": {}, "sum_us": 0.0}
  per_call = split_calls(kernels, calls)
  names = sorted({e["name"] for e in kernels})
  table = {}
  for name in names:
    times = [sum(e["dur_ms"] for e in call if e["name"] == name) for call in per_call]
    count = statistics.median(sum(e["name"] == name for e in call) for call in per_call)
    table[name[:90]] = {"us_per_layer": statistics.median(times) * 1e3 / w1.LAYERS,
                        "launches_per_layer": count / w1.LAYERS}
  spans = [(c[-1]["start_ms"] + c[-1]["dur_ms"] - c[0]["start_ms"]) * 1e3 / w1.LAYERS
           for c in per_call]
  return {"kernels": dict(sorted(table.items(), key=lambda kv: -kv[1]["us_per_layer"])),
          "sum_us": sum(v["us_per_layer"] for v in table.values()),
          "span_us": statistics.median(spans)}


def _print(label: str, prof: dict, weight_bytes: float | None = None) -> None:
  print(f"  {label}: kernels {prof['sum_us']:.1f} us/layer, device span "
        f"{prof.get('span_us', 0):.1f} us/layer")
  for name, v in list(prof["kernels"].items())[:6]:
    extra = ""
    if weight_bytes and v["us_per_layer"] > 0:
      extra = f"  ({weight_bytes / (v['us_per_layer'] * 1e-6) / 1e12:.2f} TB/s on the weight)"
    print(f"    {v['us_per_layer']:8.1f} us x{v['launches_per_layer']:.0f}  {name}{extra}")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--ms", default=",".join(str(m) for m in w1.MS))
  ap.add_argument("--skip-w2", action="store_true")
  ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
  args = ap.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  dense, states = w1.setup()
  weight_bytes = w1.N * w1.K * (0.5 + 1 / 64)  # packed codes + absmax codes (+ nested, small)
  bf16 = jax.jit(lambda x, ws: [x @ w.T for w in ws])
  ours = jax.jit(lambda x, ss: [jq.matmul_4bit(x, s) for s in ss])
  result = {"env": report_env(), "w1": {}, "w2": {}}
  for m in (int(v) for v in args.ms.split(",")):
    x = jax.random.normal(jax.random.key(m), (m, w1.K), jnp.bfloat16)
    row = {"bf16": _per_layer(trace(lambda: bf16(x, dense), CALLS), CALLS),
           "jaxquant": _per_layer(trace(lambda: ours(x, states), CALLS), CALLS)}
    result["w1"][str(m)] = row
    print(f"W1 M={m}")
    _print("bf16", row["bf16"])
    _print("jaxquant", row["jaxquant"], weight_bytes)
  if not args.skip_w2:
    m = 4096
    x = jax.random.normal(jax.random.key(1), (m, w1.K), jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(2), (m, w1.N), jnp.bfloat16)
    fb_bf16 = w1.fwd_bwd_program(lambda x, w: x @ w.T)
    fb_ours = w1.fwd_bwd_program(jq.matmul_4bit)
    row = {"bf16": _per_layer(trace(lambda: fb_bf16(x, dy, dense), CALLS), CALLS),
           "jaxquant": _per_layer(trace(lambda: fb_ours(x, dy, states), CALLS), CALLS)}
    result["w2"] = row
    print("W2 M=4096 forward + backward to the input")
    _print("bf16", row["bf16"])
    _print("jaxquant", row["jaxquant"], weight_bytes)
  (args.out / "fourbit_profile.json").write_text(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
