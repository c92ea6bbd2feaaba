"""W1 and W2 of TARGETS.md: the 4-bit matmul against bf16 and naive dequantize-then-dot.

W1: ``y = x @ W.T``, W 8192×8192 NF4 (blocksize 64, double quant), x M×8192 bf16, M in
{1, 16, 128, 512, 4096}. W2: M = 4096, forward + backward to the input, against the same with a
bf16 weight. Every figure rotates over 8 distinct weights inside one jitted call (so the L2
cannot hold a weight) and is the median over repetitions of (call time / 8) per layer; the
bf16 baseline and the naive path are measured in the same run.

With ``--tune`` the candidate kernels and block sizes of each shape are timed first (each
checked against the reference), the fastest, fused XLA included, is cached for the run and
written to ``<out>/tuned.json`` (copy it to ``pallas_kernels/fourbit_matmul/tuned.json``).

Usage (on the GPU)::

  PYTHONPATH=$PWD python3 benchmarks/fourbit_matmul.py --tune --out /tmp/out

``--ms 1,16`` and ``--skip-w2`` restrict the run (quick experiments), ``--tune-ms`` re-tunes
only some shapes and keeps the shipped table's other entries, ``--max-candidates N`` tries
only the first N candidates of each shape. The committed results came from, on one H100
(2026-11-23): ``results/fourbit_matmul_sweep1.json`` (first sweep, ``--tune --ms
1,16,128,512 --skip-w2``, a longer candidate list), ``results/fourbit_matmul_m1.json``
(``--tune --ms 1 --skip-w2 --max-candidates 2``, the shipped GEMV step),
``results/fourbit_matmul_tune.json`` (``--tune``, all shapes and W2: the other entries of
``tuned.json``), and ``results/fourbit_matmul.json`` with the W1 plot (no options: the shipped
tuning table, all shapes and W2). ``benchmarks/fourbit_profile.py`` shows the kernels behind
each figure.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import jaxquant as jq
from benchmarks._timing import report_env
from jaxquant.functional._fourbit import nested_of
from pallas_kernels.fourbit_matmul import _tuning, api
from pallas_kernels.fourbit_matmul._tuning import Config

N = K = 8192
LAYERS = 8
MS = (1, 16, 128, 512, 4096)
HBM_TBS, BF16_TFLOPS = 3.0, 700.0  # TARGETS.md ceilings (floors are computed from these)
TARGET_US = {1: 15.0, 16: 18.0, 128: 45.0}
TARGET_RATIO = {512: 1.10, 4096: 1.05, "w2": 1.10}


def candidates(m: int) -> list[Config]:
  """Forward kernels tried per M bucket (8192×8192, blocksize 64, bf16).

  A first H100 sweep (``results/fourbit_matmul_sweep1.json``: gemv ``block_n`` 4-32,
  ``block_k`` 256-1024, 1-3 stages, 2-8 warps; gemm split-K 2-8, either operand order;
  decode-then-dot tiles) left these: its winners, their prefetching variants, and the best
  tiling of the generic decode for comparison. The one-row ``x_reuse`` gemv tilings were
  added after the last H100 run, from their SASS (no shared-memory layout conversion).
  """
  def g(bm, bn, bk, lhs=False, s=1, w=4, st=3, p=True, pf=False):
    return Config("gemm", block_m=bm, block_n=bn, block_k=bk, w_lhs=lhs, split_k=s,
                  num_warps=w, num_stages=st, pairs=p, prefetch=pf)

  def v(bn, bk, st=1, pf=False, xr=False):
    return Config("gemv", block_n=bn, block_k=bk, num_stages=st, pairs=True, prefetch=pf,
                  x_reuse=xr)

  def dq(bn, bk):
    return Config("dq_dot", block_n=bn, block_k=bk, num_stages=1)

  if m <= 8:
    return [v(4, 1024, pf=True), v(2, 2048, pf=True), v(4, 2048, st=2), v(8, 1024, pf=True),
            v(4, 1024), v(4, 2048, pf=True), v(1, 4096, xr=True), v(1, 8192, xr=True),
            v(1, 4096, pf=True, xr=True)]
  if m <= 16:
    return [g(16, 64, 128, True, s=4), g(16, 64, 128, True, s=4, st=1, pf=True),
            g(16, 64, 256, True, s=4, st=1, pf=True), g(16, 64, 128, True, s=8, st=1, pf=True),
            g(16, 64, 128, True, s=8)]
  if m <= 128:
    return [g(128, 128, 64, s=4, w=8, p=False), g(128, 128, 64, s=4, w=8, st=1, pf=True)]
  return [dq(32, 512), dq(64, 128)]


def grad_candidates(m: int) -> list[Config]:
  """Backward kernels tried at M = 4096: decode-then-dot, and the in-place tile kernel."""
  del m
  return [Config("dq_dot", block_n=64, block_k=128, num_stages=1),
          Config("gemm", block_m=128, block_n=64, block_k=128, num_warps=8, num_stages=3)]


def time_layers(fn, *args, reps: int = 15, min_rep_s: float = 0.004) -> float:
  """Median µs per layer of ``fn(*args)`` (which runs ``LAYERS`` layers), calls queued
  back to back so host dispatch overlaps device work."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  calls = max(1, int(min_rep_s / max(time.perf_counter() - start, 1e-6)))
  samples = []
  for _ in range(reps):
    start = time.perf_counter()
    out = [fn(*args) for _ in range(calls)]
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / calls / LAYERS * 1e6)
  return statistics.median(samples)


def rel_error(out, ref) -> float:
  out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
  return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def floor_us(m: int, passes: int = 1, weight_bytes: float = N * K * (0.5 + 1 / 64)) -> float:
  bytes_moved = passes * (weight_bytes + 2 * m * K + 2 * m * N)
  return max(bytes_moved / (HBM_TBS * 1e6), passes * 2 * m * N * K / (BF16_TFLOPS * 1e6))


def fwd_bwd_program(layer):
  """A jitted program running ``layer`` forward and backward to the input over each weight."""
  def run(x, dy, ws):
    outs = []
    for w in ws:
      y, vjp = jax.vjp(lambda x, w=w: layer(x, w), x)
      outs += [y, vjp(dy)[0]]
    return outs
  return jax.jit(run)


def setup():
  keys = jax.random.split(jax.random.key(0), LAYERS)
  dense = [(0.02 * jax.random.normal(k, (N, K), jnp.float32)).astype(jnp.bfloat16) for k in keys]
  states = [jq.quantize_4bit(w, 64, True, "nf4", backend="xla") for w in dense]
  return jax.block_until_ready((dense, states))


def weight_args(s):
  return (s.data, s.absmax, s.code), dict(shape=s.shape, blocksize=s.blocksize,
                                         nested=nested_of(s))


def tune(op, m, cands, x, states, ref, log, budget_s):
  """Time each candidate (after a correctness check) and the XLA path; cache the best."""
  results, t_end = [], time.perf_counter() + budget_s
  fn = api.matmul_4bit if op == "matmul_4bit" else api.matmul_4bit_grad_input
  for cfg in [Config("xla")] + cands:
    if time.perf_counter() > t_end:
      log(f"  tuning budget spent, skipping {cfg}")
      break
    def layers(x, states, cfg=cfg):
      return [fn(x, *weight_args(s)[0], **weight_args(s)[1], config=cfg) for s in states]
    try:
      f = jax.jit(layers)
      err = rel_error(f(x, states)[0], ref)
      us = time_layers(f, x, states, reps=7) if err < 2e-2 else float("inf")
      results.append(dict(config=cfg.to_json(), us=us, rel_error=err))
      log(f"  {op} M={m} {cfg}: {us:.1f} us (rel err {err:.1e})")
    except Exception as e:  # noqa: BLE001  (a candidate that does not lower is skipped)
      results.append(dict(config=cfg.to_json(), error=f"{type(e).__name__}: {e}"[:300]))
      log(f"  {op} M={m} {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}")
  best = min((r for r in results if "us" in r), key=lambda r: r["us"])
  key = _tuning.shape_key(m, N, K, 64, jnp.bfloat16)
  _tuning.record(op, key, Config.from_json(best["config"]))
  return key, best, results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
  parser.add_argument("--tune", action="store_true")
  parser.add_argument("--tune-budget-s", type=float, default=45.0, help="per shape and op")
  parser.add_argument("--dry-run", action="store_true", help="tiny shapes (plumbing check)")
  parser.add_argument("--ms", type=str, default=None,
                      help="comma-separated subset of M (quick experiments; default: all)")
  parser.add_argument("--skip-w2", action="store_true", help="W1 only (quick experiments)")
  parser.add_argument("--max-candidates", type=int, default=None,
                      help="with --tune: only the first N candidates of each shape")
  parser.add_argument("--tune-ms", type=str, default=None,
                      help="with --tune: re-tune only these M (and W2 only if 'w2' is listed); "
                           "the other entries of the shipped table are kept")
  args = parser.parse_args(argv)
  global N, K, MS
  if args.dry_run:
    N, K, MS = 256, 256, (1, 16)
  if args.ms:
    MS = tuple(int(v) for v in args.ms.split(","))
  args.out.mkdir(parents=True, exist_ok=True)
  lines = []

  def log(msg):
    print(msg, flush=True)
    lines.append(msg)

  env = report_env()
  dense, states = setup()
  result = dict(env=env, shapes=dict(n=N, k=K, blocksize=64, nested=True, quant_type="nf4",
                                     layers_rotated=LAYERS), w1={}, w2={}, tuning={})
  table = {}
  tune_ms = None
  if args.tune and args.tune_ms:
    tune_ms = set(args.tune_ms.split(","))
    table = json.loads(json.dumps(_tuning._shipped_table()))  # pylint: disable=protected-access

  def tuned(m) -> bool:
    return args.tune and (tune_ms is None or str(m) in tune_ms)
  bf16 = jax.jit(lambda x, ws: [x @ w.T for w in ws])
  naive = jax.jit(lambda x, ss: [x @ jq.dequantize_4bit(s, jnp.bfloat16, backend="xla").T
                                 for s in ss])
  ours = jax.jit(lambda x, ss: [jq.matmul_4bit(x, s) for s in ss])
  for m in MS:
    x = jax.random.normal(jax.random.key(m), (m, K), jnp.bfloat16)
    ref = naive(x, states[:1])[0]
    if tuned(m):
      key, best, res = tune("matmul_4bit", m, candidates(m)[:args.max_candidates], x, states,
                            ref, log, args.tune_budget_s)
      table.setdefault("matmul_4bit", {})[key] = best["config"]
      result["tuning"][f"matmul_4bit/{m}"] = res
    cfg = _tuning.forward_config(m, N, K, 64, jnp.bfloat16)
    runs = [time_layers(ours, x, states)]
    row = dict(bf16_us=time_layers(bf16, x, dense), naive_us=time_layers(naive, x, states))
    runs.append(time_layers(ours, x, states))  # twice, around the baselines: spread check
    row.update(jaxquant_us=min(runs), jaxquant_runs_us=runs, floor_us=floor_us(m),
               config=cfg.to_json(), rel_error=rel_error(ours(x, states[:1])[0], ref))
    row["ratio_to_bf16"] = row["jaxquant_us"] / row["bf16_us"]
    target = TARGET_US.get(m)
    row["target"] = f"<= {target} us" if target else f"<= {TARGET_RATIO[m]} x bf16"
    row["met"] = (row["jaxquant_us"] <= target if target else
                  row["ratio_to_bf16"] <= TARGET_RATIO[m])
    result["w1"][str(m)] = row
    log(f"W1 M={m}: jaxquant {row['jaxquant_us']:.1f} us ({cfg.kernel}) | bf16 "
        f"{row['bf16_us']:.1f} | naive {row['naive_us']:.1f} | floor {row['floor_us']:.1f} | "
        f"ratio {row['ratio_to_bf16']:.2f} | target {row['target']} met={row['met']}")

  if args.skip_w2:
    (args.out / "fourbit_matmul.json").write_text(json.dumps(result, indent=1))
    if table:
      (args.out / "tuned.json").write_text(json.dumps({env["device"]: table}, indent=1))
    return 0

  # W2: forward + backward to the input at M = 4096.
  m = 4096
  x = jax.random.normal(jax.random.key(1), (m, K), jnp.bfloat16)
  dy = jax.random.normal(jax.random.key(2), (m, N), jnp.bfloat16)
  if tuned("w2"):
    ref = jax.jit(lambda g, s: g @ jq.dequantize_4bit(s, jnp.bfloat16, backend="xla"))(
        dy, states[0])
    key, best, res = tune("matmul_4bit_grad_input", m, grad_candidates(m)[:args.max_candidates],
                          dy, states, ref, log, args.tune_budget_s)
    table.setdefault("matmul_4bit_grad_input", {})[key] = best["config"]
    result["tuning"][f"matmul_4bit_grad_input/{m}"] = res
    in_place = [r for r in res if r["config"]["kernel"] == "gemm" and "us" in r]
    if in_place:
      result["w2_grad_in_place_best_us"] = min(r["us"] for r in in_place)

  w2 = dict(bf16_us=time_layers(fwd_bwd_program(lambda x, w: x @ w.T), x, dy, dense),
            naive_us=time_layers(fwd_bwd_program(
                lambda x, s: x @ jq.dequantize_4bit(s, jnp.bfloat16, backend="xla").T),
                x, dy, states),
            jaxquant_us=time_layers(fwd_bwd_program(jq.matmul_4bit), x, dy, states),
            floor_us=floor_us(m, passes=2),
            grad_config=_tuning.grad_config(m, N, K, 64, jnp.bfloat16).to_json())
  w2["ratio_to_bf16"] = w2["jaxquant_us"] / w2["bf16_us"]
  w2["target"] = f"<= {TARGET_RATIO['w2']} x bf16"
  w2["met"] = w2["ratio_to_bf16"] <= TARGET_RATIO["w2"]
  result["w2"] = w2
  log(f"W2 M=4096 fwd+bwd: jaxquant {w2['jaxquant_us']:.1f} us | bf16 {w2['bf16_us']:.1f} | "
      f"naive {w2['naive_us']:.1f} | floor {w2['floor_us']:.1f} | ratio "
      f"{w2['ratio_to_bf16']:.2f} met={w2['met']}")

  (args.out / "fourbit_matmul.json").write_text(json.dumps(result, indent=1))
  if table:
    (args.out / "tuned.json").write_text(json.dumps({env["device"]: table}, indent=1))
  plot(result, args.out / "fourbit_matmul_w1.png")
  return 0


def plot(result, path: pathlib.Path) -> None:
  """W1 time per layer against M: bf16, jaxquant, naive and the floor (log-log)."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib not installed: no plot", file=sys.stderr)
    return
  ms = [int(m) for m in result["w1"]]
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label in (("bf16_us", "bf16 (XLA)"), ("jaxquant_us", "jaxquant NF4"),
                     ("naive_us", "naive dequantize + dot"), ("floor_us", "floor")):
    ax.plot(ms, [result["w1"][str(m)][key] for m in ms], marker="o", label=label,
            linestyle="--" if key == "floor_us" else "-")
  ax.set(xscale="log", yscale="log", xlabel="M (rows of x)", ylabel="µs per layer",
         title=f"W1: 8192×8192 NF4 layer, {result['env']['device']}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  sys.exit(main())
