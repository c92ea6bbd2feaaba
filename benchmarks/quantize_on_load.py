"""Peak host memory of quantize-on-load (``load_in_4bit`` for JAX) on a bf16 checkpoint.

Writes a Llama-shaped bfloat16 checkpoint of a few hundred MB as sharded safetensors (with
``model.safetensors.index.json``, as transformers saves it), then loads it in fresh processes:

* ``quantize_on_load``: :func:`jaxquant.interop.bnb.quantize_on_load` (NF4, double quant,
  blocksize 64): tensor by tensor, large weights in slices of rows;
* ``load_then_quantize`` (the baseline): read every tensor first (``bnb.load``), then quantize
  the linear weights.

Each load runs in a fresh process. Memory is its resident set (``/proc/self/status``; on the
CPU backend JAX arrays live in host memory, so it counts them): ``peak`` = the high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs`` just before loading) minus the RSS before
loading; ``kept after free`` = what the process still holds once the result is deleted (the
compiled quantizers and the runtime's state, ~130 MB, independent of the checkpoint's size);
``data peak`` = peak - kept after free: what the checkpoint's tensors needed at the worst
moment, to compare with the quantized result plus one tensor.

Usage::

  python benchmarks/quantize_on_load.py [--layers 4] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1 << 20


def _status(field: str) -> int:
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
  with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
    f.write("5")


def llama_shapes(layers: int, hidden: int, intermediate: int, vocab: int,
                 kv_hidden: int) -> dict[str, tuple[int, ...]]:
  """transformers' LlamaForCausalLM tensor names and shapes."""
  shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
  for i in range(layers):
    p = f"model.layers.{i}"
    shapes.update({
        f"{p}.self_attn.q_proj.weight": (hidden, hidden),
        f"{p}.self_attn.k_proj.weight": (kv_hidden, hidden),
        f"{p}.self_attn.v_proj.weight": (kv_hidden, hidden),
        f"{p}.self_attn.o_proj.weight": (hidden, hidden),
        f"{p}.mlp.gate_proj.weight": (intermediate, hidden),
        f"{p}.mlp.up_proj.weight": (intermediate, hidden),
        f"{p}.mlp.down_proj.weight": (hidden, intermediate),
        f"{p}.input_layernorm.weight": (hidden,),
        f"{p}.post_attention_layernorm.weight": (hidden,),
    })
  shapes["model.norm.weight"] = (hidden,)
  shapes["lm_head.weight"] = (vocab, hidden)
  return shapes


def write_checkpoint(directory: str, shapes: dict[str, tuple[int, ...]],
                     shard_bytes: int) -> int:
  """Random bf16 tensors, written shard by shard; returns the total bytes."""
  import ml_dtypes
  import safetensors.numpy
  rng = np.random.default_rng(0)
  weight_map, shard, used, total, files = {}, {}, 0, 0, []

  def flush():
    name = f"model-{len(files) + 1:05d}.safetensors"
    safetensors.numpy.save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
    files.append(name)
    weight_map.update({k: name for k in shard})

  for key, shape in shapes.items():
    a = (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    if shard and used + a.nbytes > shard_bytes:
      flush()
      shard, used = {}, 0
    shard[key] = a
    used += a.nbytes
    total += a.nbytes
  flush()
  # transformers' names: model-0000k-of-0000n.safetensors
  n = len(files)
  for i, name in enumerate(files):
    final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    os.rename(os.path.join(directory, name), os.path.join(directory, final))
    weight_map = {k: (final if v == name else v) for k, v in weight_map.items()}
  with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return total


def _nbytes(tree: dict[str, Any]) -> int:
  import jaxquant as jq
  return sum(v.nbytes if isinstance(v, jq.QuantState) else int(v.nbytes) for v in tree.values())


def child(mode: str, directory: str) -> dict[str, Any]:
  """Runs in a fresh process: one load with one strategy, and what it leaves behind."""
  import gc

  import jax
  import jaxquant as jq
  from jaxquant.interop import bnb

  def load() -> dict[str, Any]:
    if mode == "quantize_on_load":
      return bnb.quantize_on_load(directory, quant_type="nf4", blocksize=64,
                                  compress_statistics=True, progress=False)
    out = bnb.load(directory, progress=False)  # everything in memory, then quantize
    for k in list(out):
      if bnb.default_should_quantize(k, tuple(out[k].shape), out[k].dtype):
        out[k] = jq.quantize_4bit(out[k], 64, True, "nf4")
    return out

  bnb.release_host_memory()
  base = _status("VmRSS")
  _reset_peak()
  start = time.perf_counter()
  out = jax.block_until_ready(load())
  seconds = time.perf_counter() - start
  peak, held = _status("VmHWM") - base, _status("VmRSS") - base
  result = _nbytes(out)
  n_quantized = sum(isinstance(v, jq.QuantState) for v in out.values())
  del out
  gc.collect()
  bnb.release_host_memory()
  kept = _status("VmRSS") - base  # compiled quantizers, runtime state: not the checkpoint's
  return {"mode": mode, "seconds": round(seconds, 2), "rss_before_mb": round(base / MB, 1),
          "peak_above_start_mb": round(peak / MB, 1), "held_after_mb": round(held / MB, 1),
          "kept_after_free_mb": round(kept / MB, 1),
          "data_peak_mb": round((peak - kept) / MB, 1), "result_mb": round(result / MB, 1),
          "quantized_tensors": n_quantized}


def _run_child(mode: str, directory: str) -> dict[str, Any]:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run([sys.executable, __file__, "--child", mode, directory], env=env,
                        capture_output=True, text=True, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--hidden", type=int, default=2048)
  ap.add_argument("--intermediate", type=int, default=5632)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--kv-hidden", type=int, default=256)
  ap.add_argument("--shard-mb", type=int, default=100)
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                "quantize_on_load.json"))
  ap.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    print(json.dumps(child(*args.child)))
    return
  shapes = llama_shapes(args.layers, args.hidden, args.intermediate, args.vocab, args.kv_hidden)
  with tempfile.TemporaryDirectory(prefix="jaxquant-qol-") as d:
    total = write_checkpoint(d, shapes, args.shard_mb * MB)
    n_files = len([f for f in os.listdir(d) if f.endswith(".safetensors")])
    runs = [_run_child(mode, d) for mode in ("quantize_on_load", "load_then_quantize")]
  import jax
  largest = max(int(np.prod(s)) * 2 for s in shapes.values())
  result = {
      "benchmark": "quantize_on_load",
      "checkpoint": {"layout": "Llama", "layers": args.layers, "hidden": args.hidden,
                     "intermediate": args.intermediate, "vocab": args.vocab,
                     "kv_hidden": args.kv_hidden, "dtype": "bfloat16",
                     "size_mb": round(total / MB, 1), "files": n_files,
                     "largest_tensor_mb": round(largest / MB, 1)},
      "quantization": {"quant_type": "nf4", "blocksize": 64, "double_quant": True},
      "runs": runs,
      "env": {"jax": jax.__version__, "backend": "cpu", "cpu_count": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d")},
  }
  qol, base = runs
  ckpt = result["checkpoint"]
  print(f"checkpoint: {ckpt['size_mb']} MB bf16 in {n_files} shards, largest tensor "
        f"{ckpt['largest_tensor_mb']} MB; quantized result {qol['result_mb']} MB")
  print(f"{'mode':<20} {'peak':>10} {'kept after free':>16} {'data peak':>10} {'time':>6}")
  for r in runs:
    print(f"{r['mode']:<20} {r['peak_above_start_mb']:>7.1f} MB "
          f"{r['kept_after_free_mb']:>13.1f} MB {r['data_peak_mb']:>7.1f} MB "
          f"{r['seconds']:>5.1f}s")
  bound = qol["result_mb"] + ckpt["largest_tensor_mb"]
  result["summary"] = {
      "peak_mb": qol["peak_above_start_mb"],
      "data_peak_mb": qol["data_peak_mb"],
      "quantized_result_mb": qol["result_mb"],
      "largest_tensor_mb": ckpt["largest_tensor_mb"],
      "data_peak_over_result_plus_largest": round(qol["data_peak_mb"] / bound, 2),
      "baseline_peak_mb": base["peak_above_start_mb"],
      "baseline_data_peak_mb": base["data_peak_mb"],
  }
  print(f"quantize_on_load data peak / (result + largest tensor) = "
        f"{result['summary']['data_peak_over_result_plus_largest']:.2f}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
    f.write("\n")


if __name__ == "__main__":
  main()
