"""W6 of TARGETS.md: one QLoRA fine-tuning step of a TinyLlama-1.1B-shaped model, end to end.

Random weights in the TinyLlama-1.1B shape (hidden 2048, MLP 5632, 22 layers, 32 heads, 4 KV
heads, vocab 32000), batch 4 x 1024 tokens, LoRA r=16 alpha=32 on q, k, v, o, gate, up, down;
base weights NF4 + double quant (``qlora``) or bfloat16 (``bf16``, the plain-LoRA baseline of
the same run); bf16 compute; 8-bit AdamW on the adapters with its state offloaded to host memory
when the backend has one ("paged"). Each mode runs in its own process so that
``peak_bytes_in_use`` is that mode's own peak.

Reports the median step time over ``--steps`` steps after ``--warmup``, tokens/s and peak device
memory, and writes ``benchmarks/results/qlora_step.json``.

  python benchmarks/qlora_step.py                       # both modes, W6 shape
  python benchmarks/qlora_step.py --config tiny --seq 64 --steps 3   # smoke test on a CPU

``make_train_step`` and ``build`` are importable; ``--devices N`` runs data-parallel over an
N-device mesh (batch sharded, weights replicated) as a starting point for sharded runs.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant import nn as jqnn
from jaxquant import optim as jqoptim
from jaxquant.models import LLAMA_LORA_TARGETS, LlamaConfig, LlamaForCausalLM, causal_lm_loss

as_pure = getattr(nnx, "as_pure", None) or nnx.pure
RESULTS = pathlib.Path(__file__).parent / "results" / "qlora_step.json"
TARGET_TOKENS_PER_S = 25_600
TARGET_PEAK_GB = 12.0
BNB = {"qlora": {"tokens_per_s": 12_800, "peak_gb": 29.4},
       "bf16": {"tokens_per_s": 21_100, "peak_gb": 16.1}}


def build(cfg: LlamaConfig, mode: str, *, rank: int = 16, alpha: float = 32.0, seed: int = 0):
  """The model to fine-tune: bf16 weights (random), NF4+DQ in ``qlora`` mode (``lm_head`` and
  the embedding stay bf16, as in bitsandbytes' QLoRA), LoRA adapters (float32 params, bf16
  compute) on the seven projections. Returns ``(graphdef, lora, rest, summary)``."""
  model = LlamaForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                           rngs=nnx.Rngs(seed))
  summary = None
  if mode == "qlora":
    qcfg = jqnn.QuantConfig(load_in_4bit=True, quant_type="nf4", double_quant=True,
                            compute_dtype=jnp.bfloat16, skip_modules=("lm_head",),
                            quantize_embeddings=False)
    _, summary = jqnn.quantize_model(model, qcfg, return_summary=True)
  elif mode != "bf16":
    raise ValueError(f"mode must be 'qlora' or 'bf16', got {mode!r}")
  jqnn.add_lora(model, jqnn.LoraConfig(r=rank, alpha=alpha, target_modules=LLAMA_LORA_TARGETS,
                                       param_dtype=jnp.float32, dtype=jnp.bfloat16),
                rngs=seed + 1)
  graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  return graphdef, as_pure(lora), rest, summary


def make_train_step(graphdef, tx, *, batch_sharding=None):
  """``step(lora, opt_state, rest, ids) -> (lora, opt_state, loss)``, jitted, donating the
  adapters and optimizer state. ``batch_sharding``: a sharding for ``ids`` (data parallel)."""

  def loss_fn(lora, rest, ids):
    if batch_sharding is not None:
      ids = jax.lax.with_sharding_constraint(ids, batch_sharding)
    logits = nnx.merge(graphdef, lora, rest)(ids)
    return causal_lm_loss(logits, ids)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(lora, opt_state, rest, ids):
    loss, grads = jax.value_and_grad(loss_fn)(lora, rest, ids)
    lora, opt_state = jqoptim.update_and_apply(tx, grads, opt_state, lora)
    return lora, opt_state, loss

  return step


def _median_ms(fn, *args, n: int = 3) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def breakdown(graphdef, tx, lora, opt_state, rest, ids) -> dict:
  """Where a step's time goes: the forward pass (loss) alone, the forward + backward
  (gradients of the adapters) and the optimizer update alone, each compiled on its own."""
  def loss_fn(lora, rest, ids):
    return causal_lm_loss(nnx.merge(graphdef, lora, rest)(ids), ids)

  fwd = jax.jit(loss_fn)
  fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))
  grads = jax.tree.map(jnp.zeros_like, lora)
  opt = jax.jit(lambda g, s, p: jqoptim.update_and_apply(tx, g, s, p))
  return dict(forward_ms=_median_ms(fwd, lora, rest, ids),
              forward_backward_ms=_median_ms(fwd_bwd, lora, rest, ids),
              optimizer_ms=_median_ms(opt, grads, opt_state, lora))


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def run_mode(args) -> dict:
  """Build, compile and time one mode in this process."""
  cfg = (LlamaConfig.tinyllama_1_1b if args.config == "tinyllama" else LlamaConfig.tiny)(
      remat=args.remat, max_position=max(args.seq, 128))
  t0 = time.perf_counter()
  graphdef, lora, rest, summary = build(cfg, args.mode, rank=args.rank, alpha=args.alpha)
  offload = args.offload == "on" or (args.offload == "auto" and jqoptim.host_memory_supported()
                                     and jax.default_backend() == "gpu")
  tx = jqoptim.adamw8bit(1e-4, weight_decay=0.0, offload=offload)
  opt_state = tx.init(lora)
  sharding = None
  if args.devices > 1:
    mesh = jax.make_mesh((args.devices,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  step = make_train_step(graphdef, tx, batch_sharding=sharding)
  ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size)
  build_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  lora, opt_state, loss = step(lora, opt_state, rest, ids)
  first_loss = float(loss)
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    lora, opt_state, loss = step(lora, opt_state, rest, ids)
    jax.block_until_ready(loss)
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  peak = _peak_bytes()
  lora_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora))
  tokens_per_s = args.batch * args.seq / med
  missed = tokens_per_s < TARGET_TOKENS_PER_S or (peak or 0) > TARGET_PEAK_GB * 1e9
  parts = None
  if args.breakdown == "on" or (args.breakdown == "auto" and args.mode == "qlora" and missed):
    parts = breakdown(graphdef, tx, lora, opt_state, rest, ids)
  return dict(
      mode=args.mode, median_step_ms=1e3 * med, min_step_ms=1e3 * min(times),
      tokens_per_s=tokens_per_s, breakdown=parts,
      peak_bytes=peak, peak_gb=None if peak is None else peak / 1e9,
      loss_first=first_loss, loss_last=float(loss), steps_timed=len(times),
      compile_s=compile_s, build_s=build_s, lora_params=lora_params,
      base_weight_bytes=None if summary is None else summary.bytes_after,
      optimizer_state_bytes=jqoptim.state_nbytes(opt_state), optimizer_offloaded=offload)


def _child(args, mode: str) -> dict:
  """Run one mode in a fresh process (its own peak memory)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "r.json"
    cmd = [sys.executable, __file__, "--mode", mode, "--child-out", str(out),
           "--config", args.config, "--batch", str(args.batch), "--seq", str(args.seq),
           "--rank", str(args.rank), "--alpha", str(args.alpha), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--remat", args.remat, "--offload", args.offload,
           "--devices", str(args.devices), "--breakdown", args.breakdown]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
      return dict(mode=mode, error=(proc.stderr or proc.stdout)[-3000:])
    return json.loads(out.read_text())


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--mode", choices=("both", "qlora", "bf16"), default="both")
  p.add_argument("--config", choices=("tinyllama", "tiny"), default="tinyllama")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--alpha", type=float, default=32.0)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--remat", default="full", help="none, full, dots (per-block nnx.remat)")
  p.add_argument("--offload", choices=("auto", "on", "off"), default="auto",
                 help="8-bit AdamW state in host memory (auto: on a GPU with pinned_host)")
  p.add_argument("--devices", type=int, default=1, help="data-parallel devices (mesh hook)")
  p.add_argument("--breakdown", choices=("auto", "on", "off"), default="auto",
                 help="also time forward / forward+backward / optimizer alone (auto: when the "
                      "QLoRA mode misses a target)")
  p.add_argument("--out", default=str(RESULTS))
  p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child_out:
    pathlib.Path(args.child_out).write_text(json.dumps(run_mode(args)))
    return
  modes = ("qlora", "bf16") if args.mode == "both" else (args.mode,)
  results = {m: _child(args, m) for m in modes}
  record = dict(
      workload="W6 QLoRA step", date=datetime.date.today().isoformat(),
      device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
      jax=jax.__version__, shape=args.config, batch=args.batch, seq=args.seq, rank=args.rank,
      alpha=args.alpha, remat=args.remat, results=results,
      targets=dict(tokens_per_s=TARGET_TOKENS_PER_S, peak_gb=TARGET_PEAK_GB),
      bitsandbytes_reference=BNB)
  q, b = results.get("qlora", {}), results.get("bf16", {})
  if "tokens_per_s" in q and "tokens_per_s" in b:
    record["qlora_vs_bf16_speed"] = q["tokens_per_s"] / b["tokens_per_s"]
  print(f"{'mode':<8} {'step ms':>9} {'tokens/s':>10} {'peak GB':>8}  target")
  for m, r in results.items():
    if "error" in r:
      print(f"{m:<8} FAILED: {r['error'][-800:]}")
      continue
    peak = "n/a" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
    tgt = (f">= {TARGET_TOKENS_PER_S:,} tok/s, <= {TARGET_PEAK_GB} GB" if m == "qlora"
           else "(baseline, same run)")
    print(f"{m:<8} {r['median_step_ms']:>9.1f} {r['tokens_per_s']:>10,.0f} {peak:>8}  {tgt}")
    if r.get("breakdown"):
      print("         " + ", ".join(f"{k} {v:.1f}" for k, v in r["breakdown"].items()))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(record, indent=2) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
