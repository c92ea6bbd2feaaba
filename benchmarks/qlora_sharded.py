"""W6 sharded: QLoRA fine-tuning steps on 1 and on n GPUs at a fixed per-GPU batch.

``jaxquant.models.LlamaForCausalLM`` in TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 22
layers, 32 heads, 4 KV heads, vocab 32000), bf16 weights, NF4 + double quantization of every
linear layer of the decoder (embeddings and head stay bf16), bf16 compute, LoRA r=16
(alpha 32) on q, k, v, o, gate, up, down, 8-bit AdamW on the adapters; batch 4 x 1024 tokens
*per GPU*. Each GPU count runs in its own process (``CUDA_VISIBLE_DEVICES`` = the first n
GPUs) so that every device's peak-memory counter belongs to that run alone; all runs happen in
one invocation, one after the other, on the same machine.

Per run: median step time over the timed steps, tokens/s (global tokens per step / median),
each device's peak memory (``memory_stats()['peak_bytes_in_use']``) and the bytes of the
quantized base weights each device holds. Layouts: ``fsdp`` (``make_mesh(data=1, fsdp=n)``:
the 4-bit weights split n ways, the batch too) and ``dp`` (``data=n``: weights replicated).
Optionally (``--bf16``) the same step with bf16 base weights on one GPU (plain LoRA) as the
same-run baseline.

Usage (GPU)::

  python benchmarks/qlora_sharded.py --gpus 1,2 --out benchmarks/results/qlora_sharded.json

On CPU (fake devices, ``--config tiny``) the same code paths run in seconds: that is how the
script is tested before a GPU run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {
    # TARGETS.md W6: TinyLlama-1.1B (jaxquant.models.LlamaConfig.tinyllama_1_1b).
    "tinyllama": dict(),
    # CPU smoke test of the same code.
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                 num_heads=4, num_kv_heads=2, max_position=1024),
}


@dataclasses.dataclass(frozen=True)
class Run:
  gpus: int
  layout: str  # "fsdp" or "dp"
  quantized: bool = True

  @property
  def name(self) -> str:
    return f"{'qlora' if self.quantized else 'bf16-lora'}-{self.layout}-{self.gpus}"


# -- child: one run ------------------------------------------------------------------------


def _model(cfg: dict, quantized: bool, attention: str | None, remat: str = "full"):
  import jax.numpy as jnp
  from flax import nnx

  import jaxquant.nn as jqnn
  from jaxquant.models import LLAMA_LORA_TARGETS, LlamaConfig, LlamaForCausalLM

  config = LlamaConfig.tinyllama_1_1b(**cfg, attention_impl=attention, remat=remat)
  model = LlamaForCausalLM(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                           rngs=nnx.Rngs(0))
  if quantized:
    jqnn.quantize_model(model, jqnn.QuantConfig(
        load_in_4bit=True, quant_type="nf4", double_quant=True, compute_dtype=jnp.bfloat16,
        skip_modules=("embed_tokens", "lm_head")))
  jqnn.add_lora(model, jqnn.LoraConfig(r=16, alpha=32, target_modules=LLAMA_LORA_TARGETS,
                                       dtype=jnp.bfloat16), rngs=1)
  return model, config


def _loss(model, batch):
  from jaxquant.models import causal_lm_loss
  return causal_lm_loss(model(batch["ids"]), batch["ids"])


def child(args) -> dict:
  import jax
  import numpy as np

  from jax.sharding import PartitionSpec

  import jaxquant.optim as jqoptim
  import jaxquant.sharding as js
  from jaxquant.quant_state import QuantState

  run = Run(args.gpus_child, args.layout, not args.bf16_child)
  cfg = CONFIGS[args.config]
  devices = jax.devices()
  if len(devices) < run.gpus:
    raise SystemExit(f"run {run.name} needs {run.gpus} devices, this process sees {len(devices)}")
  devices = devices[:run.gpus]
  mesh = (js.make_mesh(data=1, fsdp=run.gpus, devices=devices) if run.layout == "fsdp"
          else js.make_mesh(data=run.gpus, fsdp=1, devices=devices))
  batch_size = args.batch_per_gpu * run.gpus
  vocab = CONFIGS[args.config].get("vocab_size", 32000)
  ids = np.random.default_rng(0).integers(0, vocab, (batch_size, args.seq))
  host_batch = {"ids": ids.astype(np.int32)}
  # The requested layout first; should it fail to compile on this machine: replicated adapters,
  # then XLA attention, then the jnp reference of the 4-bit matmul (recorded in the result).
  attempts = [(args.lora, None, None)]
  if args.lora != "replicate":
    attempts.append(("replicate", None, None))
  attempts += [("replicate", None, "xla"), ("replicate", "xla", "xla")]
  failures = []
  for lora, backend, attention in attempts:
    if backend:
      os.environ["JAXQUANT_BACKEND"] = backend
    try:
      t0 = time.perf_counter()
      model, config = _model(cfg, run.quantized, attention, args.remat)
      tx = jqoptim.adamw8bit(2e-4, weight_decay=0.0)
      rules = js.PartitionRules(lora=lora, overrides=tuple(
          (pattern, PartitionSpec()) for pattern in args.replicate))
      trainer = js.make_train_step(model, tx, _loss, mesh, rules)
      state = trainer.init(model)
      del model
      batch = trainer.place_batch(host_batch)
      jax.block_until_ready(state)
      build_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      step = trainer.step.lower(state, batch).compile()
      state, loss = step(state, batch)
      first_loss = float(loss)
      compile_s = time.perf_counter() - t0
      break
    except Exception as err:  # noqa: BLE001 -- try the next layout, report all
      failures.append(f"lora={lora} backend={backend or 'auto'} attention={attention}: "
                      f"{type(err).__name__}: "
                      f"{str(err)[:500]}")
      print(failures[-1], file=sys.stderr, flush=True)
      state = trainer = None
  else:
    raise RuntimeError("every layout failed:\n" + "\n".join(failures))
  for _ in range(args.warmup):
    state, loss = step(state, batch)
  loss.block_until_ready()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, loss = step(state, batch)
    loss.block_until_ready()
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  weights = [x for x in jax.tree.leaves(state.frozen, is_leaf=lambda x: isinstance(
      x, QuantState)) if isinstance(x, QuantState)]
  weight_bytes = js.per_device_bytes(weights)
  peaks = []
  for d in devices:
    stats = d.memory_stats() or {}
    peaks.append(stats.get("peak_bytes_in_use"))
  return dict(
      run=run.name, gpus=run.gpus, layout=run.layout, quantized=run.quantized,
      lora_layout=lora, replicated=list(args.replicate), matmul_backend=backend or "auto", failed_attempts=failures,
      attention=config.attention_impl or "default (cudnn on GPU for bf16, else xla)",
      device=getattr(devices[0], "device_kind", str(devices[0])),
      jax=jax.__version__, tokens_per_step=batch_size * args.seq,
      step_ms_median=median * 1e3, step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3,
      tokens_per_s=batch_size * args.seq / median,
      tokens_per_s_per_gpu=batch_size * args.seq / median / run.gpus,
      remat=args.remat, steps=args.steps, warmup=args.warmup, first_loss=first_loss,
      last_loss=float(loss),
      compile_s=compile_s, build_s=build_s,
      peak_bytes_per_device=peaks,
      step_bytes_per_device=_step_bytes(step),
      quantized_weight_bytes_per_device=[weight_bytes.get(d, 0) for d in devices],
      quantized_weight_bytes_total=sum(w.nbytes for w in weights))


def _step_bytes(compiled) -> int | None:
  """Device bytes one step needs, per device, from XLA's memory analysis of the compiled step
  (arguments + outputs - donated aliases + temporaries). The runtime peak above also counts
  the model's construction (bf16 weights quantized on the first device before placement)."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)
  except Exception:  # noqa: BLE001 -- not every backend reports it
    return None


# -- parent: all runs, one after the other -------------------------------------------------


def _env_for(run: Run, cpu: bool) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("PYTHONUNBUFFERED", "1")
  if cpu:
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={run.gpus}").strip()
  else:
    visible = env.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(run.gpus)]
    env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:run.gpus])
  return env


def parent(args) -> dict:
  runs = [Run(g, args.layout) for g in args.gpus]
  if args.dp:
    runs += [Run(g, "dp") for g in args.gpus if g > 1]
  if args.bf16:
    runs.append(Run(1, args.layout, quantized=False))
  deadline = time.monotonic() + args.deadline
  results, errors = [], []
  for run in runs:
    left = deadline - time.monotonic()
    need = 1.1 * max([r["wall_s"] for r in results], default=20.0)
    if left < need:
      errors.append(f"{run.name}: skipped, {left:.0f} s left of the {args.deadline:.0f} s "
                    f"deadline and a run takes about {need:.0f} s")
      continue
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--gpus-child", str(run.gpus),
           "--layout", run.layout, "--config", args.config, "--batch-per-gpu",
           str(args.batch_per_gpu), "--seq", str(args.seq), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--lora", args.lora, "--remat", args.remat]
    for pattern in args.replicate:
      cmd += ["--replicate", pattern]
    if not run.quantized:
      cmd.append("--bf16-child")
    t0 = time.monotonic()
    try:
      out = subprocess.run(cmd, env=_env_for(run, args.cpu), capture_output=True, text=True,
                           timeout=left)
    except subprocess.TimeoutExpired:
      errors.append(f"{run.name}: killed at the deadline")
      continue
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not line:
      errors.append(f"{run.name}: exit {out.returncode}: {(out.stderr or out.stdout)[-1500:]}")
      print(errors[-1], file=sys.stderr)
      continue
    res = json.loads(line[-1][len("RESULT "):])
    res["wall_s"] = time.monotonic() - t0
    results.append(res)
    if args.out:
      _write(args.out, _summary(args, results, errors, quiet=True))
    print(f"{res['run']:>18}: {res['tokens_per_s']:9.0f} tok/s  step {res['step_ms_median']:7.1f}"
          f" ms  peak/dev {_gb(res['peak_bytes_per_device'])} GB  step/dev "
          f"{_gb([res['step_bytes_per_device']])} GB  4-bit weights/dev "
          f"{_gb(res['quantized_weight_bytes_per_device'])} GB  (compile {res['compile_s']:.0f}"
          f" s)", flush=True)
  return _summary(args, results, errors)


def _gb(values) -> str:
  return "/".join("-" if v is None else f"{v / 1e9:.2f}" for v in values)


def _write(path: str, summary: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(summary, f, indent=1)


def _summary(args, results, errors, quiet: bool = False) -> dict:
  by = {(r["gpus"], r["layout"], r["quantized"]): r for r in results}
  one = by.get((1, args.layout, True))
  scaling = {}
  for r in results:
    if r["quantized"] and r["gpus"] > 1 and one:
      scaling[r["run"]] = dict(
          speedup=r["tokens_per_s"] / one["tokens_per_s"],
          target=1.8 if r["gpus"] == 2 else 3.5 if r["gpus"] == 4 else None,
          weight_bytes_per_device_ratio=(max(r["quantized_weight_bytes_per_device"]) /
                                         max(one["quantized_weight_bytes_per_device"])))
  bf16 = by.get((1, args.layout, False))
  for name, s in scaling.items():
    if quiet:
      break
    print(f"{name}: {s['speedup']:.2f}x the tokens/s of 1 GPU (target {s['target']}), "
          f"4-bit weight bytes per device x{s['weight_bytes_per_device_ratio']:.3f}")
  if bf16 and one and not quiet:
    print(f"1 GPU QLoRA / bf16-LoRA tokens/s: {one['tokens_per_s'] / bf16['tokens_per_s']:.2f}")
  return dict(workload="W6 sharded QLoRA step", config=args.config, model=CONFIGS[args.config],
              batch_per_gpu=args.batch_per_gpu, seq=args.seq, layout=args.layout,
              runs=results, scaling=scaling, errors=errors,
              date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gpus", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
  p.add_argument("--layout", choices=("fsdp", "dp"), default="fsdp")
  p.add_argument("--dp", action="store_true", help="also run the data-parallel layout")
  p.add_argument("--bf16", action="store_true", help="also run bf16-base LoRA on 1 GPU")
  p.add_argument("--lora", choices=("follow", "replicate"), default="follow")
  p.add_argument("--replicate", action="append", default=[], metavar="REGEX",
                 help="keep the variables whose path matches REGEX whole on every device "
                      "(e.g. 'embed_tokens|lm_head'); repeatable")
  p.add_argument("--remat", default="full", help="per-block nnx.remat policy, as W6 "
                 "(benchmarks/qlora_step.py): none, full, dots")
  p.add_argument("--config", choices=sorted(CONFIGS), default="tinyllama")
  p.add_argument("--batch-per-gpu", type=int, default=4)
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--deadline", type=float, default=3600.0, help="seconds for all runs")
  p.add_argument("--cpu", action="store_true", help="fake CPU devices instead of GPUs")
  p.add_argument("--out", default=None)
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--gpus-child", type=int, help=argparse.SUPPRESS)
  p.add_argument("--bf16-child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    try:
      print("RESULT " + json.dumps(child(args)), flush=True)
    except Exception:  # noqa: BLE001 -- reported to the parent
      traceback.print_exc()
      raise SystemExit(1)
    return
  summary = parent(args)
  if args.out:
    _write(args.out, summary)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
