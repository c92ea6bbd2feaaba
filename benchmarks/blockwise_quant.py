"""W3 of TARGETS.md: quantize / dequantize one 8192x8192 bf16 weight to NF4, blocksize 64.

Prints, per operation, the median time of jaxquant's Pallas kernels, of the naive jnp
reference and of a bf16 copy of the weight measured in the same run, next to the floor
(bytes moved / 3.0 TB/s) and the target. Beside them, the same bytes in and out moved by a
memory-only Pallas kernel and by an XLA elementwise op (what a kernel of this shape can stream
on this machine), quantize without the returned code table (the copy of that constant is a
launch of its own), a sweep of kernel configurations and code paths (``--sweep``; ``--tune``
makes the fastest of each op the default of the run and records it), the 8-bit blockwise
kernels (``--no-8bit`` skips them) and the relative Frobenius error on N(0, 0.02^2) weights.

Run on the GPU from the repository root (the committed JSON)::

  PYTHONPATH=$PWD python3 benchmarks/blockwise_quant.py --sweep short --tune --no-8bit \\
      --out benchmarks/results/blockwise_quant.json

``benchmarks/results/blockwise_quant_sweep.json`` is an earlier exploration (flat tiles only).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

import jaxquant as jq
from benchmarks._timing import distinct_inputs, report_env, time_calls, time_interleaved
from pallas_kernels.blockwise_quant import (_common,
                                            _dequantize_4bit_kernel, _quantize_4bit_kernel)
from pallas_kernels.blockwise_quant import api as blockwise_api
from pallas_kernels.blockwise_quant import reference
from pallas_kernels.blockwise_quant._common import KernelConfig

SIZE = 8192  # W3: one 8192 x 8192 weight
BLOCKSIZE = 64
HBM_BYTES_PER_S = 3.0e12  # TARGETS.md ceiling (bytes read + written)
TARGET_US = {"quantize": 80.0, "dequantize": 70.0}


def _q(elems, warps, encoder="clamp", pairs="split", layout="rows", **kw) -> dict:
  return dict(elems_per_program=elems, num_warps=warps, encoder=encoder, pairs=pairs,
              layout=layout, **kw)


def _dq(elems, warps, pairs="reduce", layout="rows", **kw) -> dict:
  return dict(elems_per_program=elems, num_warps=warps, pairs=pairs, layout=layout, **kw)


# Kernel configurations timed against each other (--sweep short|full); with --tune the
# fastest of each op becomes the default for the rest of the run.
QUANTIZE_SWEEP_SHORT = [
    _q(1024, 4), _q(2048, 4), _q(2048, 8), _q(4096, 4), _q(4096, 8),
    _q(2048, 4, "clamp_select"), _q(2048, 4, pairs="reduce"), _q(2048, 4, layout="flat"),
    _q(2048, 4, "clamp_select", layout="flat"), _q(2048, 4, "table", "reduce", "flat"),
    _q(2048, 4, eviction_policy="evict_first")]
DEQUANTIZE_SWEEP_SHORT = [
    _dq(2048, 4), _dq(4096, 4), _dq(8192, 4), _dq(8192, 8), _dq(16384, 8),
    _dq(2048, 4, "split"), _dq(8192, 8, "split"), _dq(8192, 4, layout="flat"),
    _dq(8192, 4, "split", "flat"), _dq(4096, 8), _dq(8192, 8, eviction_policy="evict_first")]
QUANTIZE_SWEEP = QUANTIZE_SWEEP_SHORT + [
    _q(1024, 2), _q(8192, 8), _q(2048, 4, tiles_per_program=4), _q(2048, 4, "poly"),
    _q(2048, 4, "table"),
    _q(2048, 4, "compare")]
DEQUANTIZE_SWEEP = DEQUANTIZE_SWEEP_SHORT + [
    _dq(1024, 4), _dq(16384, 16),
    _dq(2048, 4, tiles_per_program=4), _dq(2048, 4, layout="flat")]

def _stream_kernel(x_ref, o_ref, *, shrink: bool):
  x = x_ref[...]
  if shrink:  # bf16 → one byte per pair, same bytes as 4-bit quantize's data
    v = jax.lax.bitcast_convert_type(x, jnp.int16).astype(jnp.int32)
    o_ref[...] = jnp.sum(v.reshape(-1, 2), axis=1).astype(jnp.uint8)
  else:  # byte → two bf16, same bytes as 4-bit dequantize
    v = jnp.broadcast_to(x.astype(jnp.float32).reshape(-1, 1), (x.shape[0], 2))
    o_ref[...] = v.reshape(-1).astype(jnp.bfloat16)


def stream(x, *, shrink: bool, elems: int = 8192, num_warps: int = 4, interpret: bool = False):
  """Memory-only Pallas kernel with quantize's (``shrink``) or dequantize's bytes in and out."""
  n_in = x.size
  block_in = elems if shrink else elems // 2
  block_out = elems // 2 if shrink else elems
  out = ((n_in // 2,), jnp.uint8) if shrink else ((n_in * 2,), jnp.bfloat16)
  return pl.pallas_call(
      functools.partial(_stream_kernel, shrink=shrink), grid=(n_in // block_in,),
      in_specs=[pl.BlockSpec((block_in,), lambda i: (i,))],
      out_specs=pl.BlockSpec((block_out,), lambda i: (i,)),
      out_shape=jax.ShapeDtypeStruct(*out),
      compiler_params=_common.compiler_params(KernelConfig(num_warps=num_warps)),
      interpret=interpret, name="bench_stream")(x.reshape(-1))


def xla_same_bytes(x, *, shrink: bool):
  """XLA elementwise op with quantize's (``shrink``: bf16 → one byte per pair) or dequantize's
  (byte → two bf16) bytes in and out: what XLA's own generated kernels stream at."""
  if shrink:
    v = jax.lax.bitcast_convert_type(x.reshape(-1, 2), jnp.uint16).astype(jnp.uint32)
    return (v[:, 0] ^ v[:, 1]).astype(jnp.uint8)
  v = x.reshape(-1, 1).astype(jnp.bfloat16)
  return jnp.concatenate([v, -v], axis=1).reshape(-1)


def _data_absmax(state):
  return state.data, state.absmax


def _quantize_with(cfg: KernelConfig, interpret: bool):
  return jax.jit(functools.partial(_quantize_4bit_kernel.quantize_4bit, blocksize=BLOCKSIZE,
                                   quant_type="nf4", config=cfg, interpret=interpret))


def _dequantize_with(cfg: KernelConfig, n: int, interpret: bool):
  def run(s):
    return _dequantize_4bit_kernel.dequantize_4bit(
        s.data, s.absmax, s.code, *((s.nested_absmax, s.nested_code, s.offset)
                                    if s.nested else ()),
        blocksize=BLOCKSIZE, n=n, dtype=jnp.bfloat16, config=cfg, interpret=interpret)
  return jax.jit(run)


def sweep(flat, dq_states, dq_nested, n: int, *, reps: int, interpret: bool,
          quantize_cases, dequantize_cases) -> list[dict]:
  """Kernel configurations and code paths (dicts of :class:`KernelConfig` fields), all timed
  in alternation; one row per case, the configuration's fields and its median / min."""
  cases, labels = {}, {}
  for fields in quantize_cases:
    cfg = KernelConfig(**fields)
    cases[f"quantize {cfg}"] = (_quantize_with(cfg, interpret), flat)
    labels[f"quantize {cfg}"] = {"op": "quantize", **fields}
  for fields in dequantize_cases:
    cfg = KernelConfig(**fields)
    for nested, sts in (("no", dq_states), ("yes", dq_nested)):
      name = f"dequantize nested={nested} {cfg}"
      cases[name] = (_dequantize_with(cfg, n, interpret), sts)
      labels[name] = {"op": "dequantize", "nested": nested, **fields}
  swept = time_interleaved(cases, reps=reps)
  return [{**labels[k], "median_us": t.median_us, "min_us": t.min_us}
          for k, t in swept.items()]


def tune(rows: list[dict]) -> dict[str, dict]:
  """The fastest configuration of each op in a :func:`sweep` (dequantize: of the plain, not
  double-quantized, absmax), made the kernels' default for the rest of this process."""
  best = {}
  for op, keep in (("quantize", lambda r: True), ("dequantize", lambda r: r["nested"] == "no")):
    row = min((r for r in rows if r["op"] == op and keep(r)), key=lambda r: r["median_us"])
    best[op] = {k: v for k, v in row.items() if k in KernelConfig.__dataclass_fields__}
  _quantize_4bit_kernel.DEFAULT_CONFIG = KernelConfig(**best["quantize"])
  _dequantize_4bit_kernel.DEFAULT_CONFIG = KernelConfig(**best["dequantize"])
  return best


def _fmt(row):
  return " | ".join(str(v) for v in row)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/blockwise_quant.json")
  parser.add_argument("--reps", type=int, default=30)
  parser.add_argument("--sweep", choices=("full", "short", "none"), default="full",
                      help="launch configurations to time: all, the defaults' neighbours, none")
  parser.add_argument("--tune", action="store_true",
                      help="make the sweep's fastest configurations the defaults of this run")
  parser.add_argument("--no-8bit", action="store_true", help="skip the 8-bit kernels' figures")
  parser.add_argument("--size", type=int, default=SIZE, help="rows = columns (smoke tests)")
  parser.add_argument("--interpret", action="store_true", help="smoke tests on CPU only")
  args = parser.parse_args(argv)
  reps = args.reps
  size = args.size
  it = args.interpret

  weights = distinct_inputs(
      lambda k: (0.02 * jax.random.normal(k, (size, size), jnp.float32)).astype(jnp.bfloat16), 8)
  ws = [(w,) for w in weights]
  results = {"env": report_env(), "shape": [size, size], "blocksize": BLOCKSIZE,
             "quant_type": "nf4"}

  copy_bytes = 2 * size * size * 2
  n = size * size
  q_bytes = n * 2 + n // 2 + (n // BLOCKSIZE) * 4  # read bf16, write nibbles + f32 absmax
  dq_bytes_nested = n // 2 + n // BLOCKSIZE + n * 2

  naive_q = jax.jit(lambda w: jq.quantize_4bit(w, BLOCKSIZE, False, "nf4", backend="xla"))
  flat = [(w.reshape(-1),) for w in weights]
  if args.sweep != "none":
    # First, before any call traces the kernels' default configuration (--tune changes it).
    naive_q_dq = jax.jit(lambda w: jq.quantize_4bit(w, BLOCKSIZE, True, "nf4", backend="xla"))
    short = args.sweep == "short"
    results["sweep"] = sweep(
        flat, [(naive_q(w),) for w in weights], [(naive_q_dq(w),) for w in weights], n,
        reps=max(1, reps // 2), interpret=it,
        quantize_cases=QUANTIZE_SWEEP_SHORT if short else QUANTIZE_SWEEP,
        dequantize_cases=DEQUANTIZE_SWEEP_SHORT if short else DEQUANTIZE_SWEEP)
    print("sweep (median us, measured in alternation):")
    for row in results["sweep"]:
      print("  ", row)
    if args.tune:
      results["tuned_defaults"] = tune(results["sweep"])
      print("defaults of this run (fastest in the sweep):", results["tuned_defaults"])
  results["default_configs"] = {
      "quantize": dataclasses.asdict(_quantize_4bit_kernel.DEFAULT_CONFIG),
      "dequantize": dataclasses.asdict(_dequantize_4bit_kernel.DEFAULT_CONFIG)}

  quantize = jax.jit(lambda w: jq.quantize_4bit(w, BLOCKSIZE, False, "nf4"))
  quantize_dq = jax.jit(lambda w: jq.quantize_4bit(w, BLOCKSIZE, True, "nf4"))
  states = [quantize(w) for w in weights]
  states_dq = [quantize_dq(w) for w in weights]
  dequantize = jax.jit(jq.dequantize_4bit)
  naive_dq = jax.jit(lambda s: jq.dequantize_4bit(s, backend="xla"))

  # Correctness on the benchmark weights: the kernels' bytes equal the reference's.
  ref_state = naive_q(weights[0])
  exact = {
      "quantize_data": bool(jnp.array_equal(states[0].data, ref_state.data)),
      "quantize_absmax": bool(jnp.array_equal(states[0].absmax, ref_state.absmax)),
      "dequantize": bool(jnp.array_equal(dequantize(states_dq[0]), naive_dq(states_dq[0]))),
  }
  cpu = jax.devices("cpu")[0]
  w_cpu = jax.device_put(weights[0], cpu)
  with jax.default_device(cpu):
    cpu_packed, cpu_absmax = jax.jit(functools.partial(
        reference.quantize_4bit, blocksize=BLOCKSIZE, quant_type="nf4"))(w_cpu)
  exact["quantize_vs_cpu_reference"] = bool(
      np.array_equal(np.asarray(states[0].data).ravel(), np.asarray(cpu_packed))
      and np.array_equal(np.asarray(states[0].absmax).ravel(), np.asarray(cpu_absmax)))
  results["exact"] = exact

  def in_program(fn, arg, op):
    return blockwise_api.KERNEL_NAMES[op] in jax.jit(fn).lower(arg).compile().as_text()
  def ops(fn, arg):
    text = jax.jit(fn).lower(arg).compile().as_text()
    entry = text[text.find("ENTRY"):]
    return [ln.strip()[:160] for ln in entry.splitlines()[1:] if " = " in ln]
  results["compiled_entry_ops"] = {"quantize": ops(quantize, weights[0]),
                                   "dequantize": ops(dequantize, states_dq[0])}
  print("compiled ops:", json.dumps(results["compiled_entry_ops"], indent=1))
  results["kernel_in_compiled_hlo"] = {
      "quantize_4bit": in_program(quantize, weights[0], "quantize_4bit"),
      "dequantize_4bit": in_program(dequantize, states_dq[0], "dequantize_4bit"),
  }

  direct = jax.jit(lambda v: _quantize_4bit_kernel.quantize_4bit(
      v, blocksize=BLOCKSIZE, quant_type="nf4", interpret=it))
  dq_states = [(s,) for s in states]
  dq_nested = [(s,) for s in states_dq]
  # All figures of one table measured in alternation (see time_interleaved).
  timings = time_interleaved({
      "bf16_copy": (jax.jit(lambda w: -w), ws),
      "quantize": (quantize, ws),
      "quantize_kernel_flat_input": (direct, flat),
      "quantize_double_quant": (quantize_dq, ws),
      "quantize_naive_jnp": (naive_q, ws),
      "quantize_data_absmax_only": (jax.jit(lambda w: _data_absmax(quantize(w))), ws),
      "quantize_stream_only": (jax.jit(functools.partial(stream, shrink=True, interpret=it)), ws),
      "quantize_xla_same_bytes": (jax.jit(functools.partial(xla_same_bytes, shrink=True)), ws),
      "dequantize": (dequantize, dq_states),
      "dequantize_double_quant": (dequantize, dq_nested),
      "dequantize_naive_jnp": (naive_dq, dq_nested),
      "dequantize_stream_only": (jax.jit(functools.partial(stream, shrink=False, interpret=it)),
                                 [(s.data,) for s in states]),
      "dequantize_xla_same_bytes": (jax.jit(functools.partial(xla_same_bytes, shrink=False)),
                                    [(s.data,) for s in states]),
  }, reps=reps)
  copy_t = timings["bf16_copy"]
  results["bf16_copy"] = {**copy_t.as_dict(), "bytes": copy_bytes,
                          "tb_per_s": copy_bytes / copy_t.median_us / 1e6}
  results["timings_us"] = {k: v.as_dict() for k, v in timings.items()}

  w32 = weights[0].astype(jnp.float32)
  for name, st in (("nf4", states[0]), ("nf4_double_quant", states_dq[0])):
    err = jnp.linalg.norm(dequantize(st).astype(jnp.float32) - w32) / jnp.linalg.norm(w32)
    results.setdefault("rel_frobenius_error", {})[name] = float(err)

  floors = {"quantize": q_bytes / HBM_BYTES_PER_S * 1e6,
            "dequantize": dq_bytes_nested / HBM_BYTES_PER_S * 1e6}
  results["floor_us"] = floors
  results["target_us"] = TARGET_US
  print(f"W3 on {results['env']['device']} (jax {results['env']['jax']}): "
        f"{size}x{size} bf16 -> NF4,"
        f" blocksize 64; median us over {reps} reps x 8 weights")
  # TARGETS.md's times come from a machine whose bf16 copy of this weight is at its 3.0 TB/s
  # ceiling; judged by the ratio to the copy measured here, a target is target / that copy.
  copy_at_ceiling_us = copy_bytes / HBM_BYTES_PER_S * 1e6
  results["ratio_to_bf16_copy"], results["target_ratio_to_bf16_copy"] = {}, {}
  print(_fmt(["op", "jaxquant", "kernel (flat input)", "+double quant", "naive jnp",
              "memory-only Pallas", "memory-only XLA", "bf16 copy", "jaxquant / copy",
              "target / copy", "floor",
              "target", "met (abs)", "met (ratio)"]))
  for op in ("quantize", "dequantize"):
    t = timings[op].median_us
    ratio, target_ratio = t / copy_t.median_us, TARGET_US[op] / copy_at_ceiling_us
    results["ratio_to_bf16_copy"][op] = ratio
    results["target_ratio_to_bf16_copy"][op] = target_ratio
    flat_t = timings.get(op + "_kernel_flat_input")
    print(_fmt([op, f"{t:.1f}", f"{flat_t.median_us:.1f}" if flat_t else "-",
                f"{timings[op + '_double_quant'].median_us:.1f}",
                f"{timings[op + '_naive_jnp'].median_us:.1f}",
                f"{timings[op + '_stream_only'].median_us:.1f}",
                f"{timings[op + '_xla_same_bytes'].median_us:.1f}", f"{copy_t.median_us:.1f}",
                f"{ratio:.2f}", f"{target_ratio:.2f}", f"{floors[op]:.1f}",
                f"<= {TARGET_US[op]:.0f}", t <= TARGET_US[op], ratio <= target_ratio]))
  print("relative Frobenius error:", results["rel_frobenius_error"])
  print("exact:", exact, "kernel in compiled HLO:", results["kernel_in_compiled_hlo"])

  if not args.no_8bit:
    q8 = jax.jit(lambda w: jq.quantize_blockwise(w, blocksize=256))
    q8_naive = jax.jit(lambda w: jq.quantize_blockwise(w, blocksize=256, backend="xla"))
    s8 = [q8(w) for w in weights]
    results["blockwise8_bs256_us"] = {
        "quantize": time_calls(q8, ws, reps=10).as_dict(),
        "quantize_naive_jnp": time_calls(q8_naive, ws, reps=3, warmup=1).as_dict(),
        "dequantize": time_calls(jax.jit(jq.dequantize_blockwise), [(s,) for s in s8],
                                 reps=reps).as_dict(),
        "dequantize_naive_jnp": time_calls(
            jax.jit(lambda s: jq.dequantize_blockwise(s, backend="xla")), [(s,) for s in s8],
            reps=reps).as_dict(),
    }
    ref8 = q8_naive(weights[0])
    with jax.default_device(cpu):
      cpu8, cpu8_absmax = jax.jit(functools.partial(reference.quantize_8bit, blocksize=256))(
          w_cpu, jax.device_put(s8[0].code, cpu))
    k8, r8, c8 = (np.asarray(a).ravel() for a in (s8[0].data, ref8.data, cpu8))
    bad = np.flatnonzero(k8 != c8)
    w_host = np.asarray(weights[0].astype(jnp.float32)).ravel()
    results["blockwise8_bs256_exact"] = {
        "kernel_vs_xla_gpu_mismatches": int((k8 != r8).sum()),
        "kernel_vs_cpu_mismatches": int(bad.size),
        "xla_gpu_vs_cpu_mismatches": int((r8 != c8).sum()),
        "absmax_kernel_vs_cpu_equal": bool(np.array_equal(np.asarray(s8[0].absmax).ravel(),
                                                          np.asarray(cpu8_absmax))),
        "first": [dict(i=int(i), x=float(w_host[i]), kernel=int(k8[i]), xla_gpu=int(r8[i]),
                       cpu=int(c8[i]), absmax=float(np.asarray(cpu8_absmax)[i // 256]))
                  for i in bad[:5]],
    }
    print("8-bit exactness:", results["blockwise8_bs256_exact"])
    print("8-bit blockwise (dynamic map, blocksize 256):",
          {k: (round(v["median_us"], 1) if isinstance(v, dict) else v)
           for k, v in results["blockwise8_bs256_us"].items()})

  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=1))
  print("wrote", out)


if __name__ == "__main__":
  main()
