"""W5: one optimizer step on 1.07 B float32 parameters (16 x 8192^2), gradients given.

Measured in one run, on the same device (median step time, state bytes per parameter):

* ``optax.adamw`` (float32 state), jitted ``update`` + ``apply_updates``, params and state
  donated: the baseline.
* ``jaxquant.optim.adamw8bit`` through ``update_and_apply`` (fused kernel writes the new
  parameters) and through the plain Optax path (``update`` + ``apply_updates``).
* the same with ``offload=True`` (state in ``pinned_host``, streamed leaf by leaf), beside the
  host-link floor: the state bytes moved each way divided by the measured host<->device
  bandwidth (the link is full duplex, so the floor is the slower direction).
* the kernel alone on one 8192^2 leaf for a few launch configurations (the best one is used).

The offload section runs first so the device's peak-memory counter reflects it.

Usage: ``python benchmarks/optim_step.py [--leaves 16] [--dim 8192] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._timing import report_env  # noqa: E402
import jaxquant.optim as jo  # noqa: E402
import pallas_kernels  # noqa: E402
from jaxquant.optim import _state  # noqa: E402
from pallas_kernels.optim_update import families, kernel  # noqa: E402

HBM_TBPS = 3.0  # TARGETS.md ceiling, bytes read + written


def _block(tree):
  jax.tree.map(lambda a: a.block_until_ready(), tree)


def _median_ms(fn, carry, steps: int, warmup: int):
  """Run ``carry = fn(carry)`` warmup + steps times; median ms of the timed steps."""
  for _ in range(warmup):
    carry = fn(carry)
    _block(carry)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    carry = fn(carry)
    _block(carry)
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times), min(times), carry


def _params(leaves: int, dim: int, seed: int, scale: float):
  keys = jax.random.split(jax.random.key(seed), leaves)
  make = jax.jit(lambda k: scale * jax.random.normal(k, (dim, dim), jnp.float32))
  out = {f"w{i:02d}": make(k) for i, k in enumerate(keys)}
  _block(out)
  return out


def _memory_analysis(compiled) -> dict:
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  keys = [k for k in dir(ma) if k.endswith("_in_bytes")]
  return {k: int(getattr(ma, k)) for k in keys}


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _in_use() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_in_use")


def host_link(nbytes: int, reps: int = 5) -> dict:
  """Host<->device bandwidth for ``nbytes`` with ``jax.device_put`` between memory kinds."""
  dev = jax.devices()[0]
  host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
  devs = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
  x_dev = jnp.ones((nbytes,), jnp.uint8)
  x_host = jax.device_put(x_dev, host)
  _block((x_dev, x_host))
  h2d, d2h = [], []
  for _ in range(reps):
    t0 = time.perf_counter()
    y = jax.device_put(x_host, devs)
    y.block_until_ready()
    h2d.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    z = jax.device_put(x_dev, host)
    z.block_until_ready()
    d2h.append(time.perf_counter() - t0)
    del y, z
  del x_dev, x_host
  h2d_s, d2h_s = statistics.median(h2d), statistics.median(d2h)
  return {"bytes": nbytes, "h2d_ms": h2d_s * 1e3, "d2h_ms": d2h_s * 1e3,
          "h2d_gbps": nbytes / h2d_s / 1e9, "d2h_gbps": nbytes / d2h_s / 1e9,
          "floor_ms": max(h2d_s, d2h_s) * 1e3}


def hbm_copy_tbps(n: int = 1 << 30) -> float:
  x = jnp.ones((n,), jnp.float32)
  f = jax.jit(lambda a: a * 1.0000001)
  t, _, _ = _median_ms(lambda c: f(c), x, steps=10, warmup=2)
  return 2 * 4 * n / (t * 1e-3) / 1e12


def kernel_sweep(dim: int, configs) -> list[dict]:
  """The fused AdamW kernel alone on one ``dim x dim`` leaf, per launch configuration."""
  key = jax.random.key(3)
  g = 1e-3 * jax.random.normal(key, (dim * dim // 256, 256), jnp.float32)
  p = 0.02 * jax.random.normal(jax.random.key(4), g.shape, jnp.float32)
  m = _state.zeros_8bit(p, True, 256)
  v = _state.zeros_8bit(p, False, 256)
  codes = (m.data, v.data)
  absmax = (m.absmax.reshape(-1), v.absmax.reshape(-1))
  maps = (m.code, v.code)
  fam = families.FAMILIES["adam"]
  hp = np.zeros(families.HP_SIZE, np.float32)
  for name, val in dict(lr=1e-3, wd=1e-4, gscale=1.0, b1=0.9, b2=0.999, omb1=0.1, omb2=1e-3,
                        eps=1e-8,
                        c1=10.0, c2=1000.0, c1_next=5.0).items():
    hp[families.hparam_index(fam, name)] = val
  hp = jnp.asarray(hp)
  n = g.size
  out = []
  impls = [("pallas", c) for c in configs] + [("xla", None)]
  for impl, cfg in impls:
    label = "xla reference" if cfg is None else (
        f"decode={cfg.decode} encode={cfg.encode} rows={cfg.max_rows} warps={cfg.num_warps}")
    try:
      kw = dict(family="adam", write="param", codebook="dynamic")
      if cfg is not None:
        kw["config"] = cfg
      # Parameter and state donated, as in a training step (the kernel updates them in place).
      fn = jax.jit(functools.partial(pallas_kernels.get("optim_update_8bit", impl).fn, **kw),
                   donate_argnums=(1, 2, 3))

      def step(c, fn=fn):
        pp, cc, aa = c
        return fn(g, pp, cc, aa, maps, hp)

      start = (p + 0, tuple(c + 0 for c in codes), tuple(a + 0 for a in absmax))
      t, tmin, _ = _median_ms(step, start, steps=10 if cfg else 3, warmup=2)
      gbytes = n * (4 + 4 + 4 + 2 + 2) + 4 * 4 * (n // 256)
      out.append({"config": label, "median_ms": t, "min_ms": tmin,
                  "tbps": gbytes / (t * 1e-3) / 1e12, "cfg": None if cfg is None else
                  dict(max_rows=cfg.max_rows, num_warps=cfg.num_warps, decode=cfg.decode,
                       encode=cfg.encode, fast_log=cfg.fast_log)})
    except Exception as e:  # noqa: BLE001  (report every configuration)
      out.append({"config": label, "error": f"{type(e).__name__}: {e}"[:600]})
    print(out[-1], flush=True)
  return out


def run_adamw8bit(params, grads, n_params, *, fused: bool, config, offload=False,
                  chunk=1 << 22, steps=20, warmup=3) -> dict:
  tx = jo.adamw8bit(1e-3, weight_decay=1e-4, kernel_config=config, offload=offload,
                    offload_chunk=chunk)
  in_use0 = _in_use()
  state = tx.init(params)
  _block(state)
  in_use1 = _in_use()
  kinds = jo.memory_kinds(state)
  if fused:
    step = jax.jit(lambda p, g, s: jo.update_and_apply(tx, g, s, p),
                   donate_argnums=(0,) if offload else (0, 2))
  else:
    def plain(p, g, s):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    step = jax.jit(plain, donate_argnums=(0,) if offload else (0, 2))
  compiled = step.lower(params, grads, state).compile()
  mem = _memory_analysis(compiled)
  t, tmin, (params, state) = _median_ms(
      lambda c: compiled(c[0], grads, c[1]), (params, state), steps=steps, warmup=warmup)
  state_bytes = jo.state_nbytes(state)
  device_state = jo.memory_kinds(state).get("device", 0)
  res = {"median_ms": t, "min_ms": tmin, "state_bytes_per_param": state_bytes / n_params,
         "device_state_bytes_per_param": device_state / n_params,
         "state_memory_kinds_after_init": kinds, "memory_analysis": mem,
         "device_bytes_in_use_delta_from_init": (None if in_use0 is None else in_use1 - in_use0),
         "peak_bytes_in_use": _peak_bytes(), "steps": steps}
  return res, params


def run_optax_adamw(params, grads, n_params, steps=20, warmup=3) -> dict:
  tx = optax.adamw(1e-3, weight_decay=1e-4)
  state = tx.init(params)

  def step(p, g, s):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  compiled = jax.jit(step, donate_argnums=(0, 2)).lower(params, grads, state).compile()
  t, tmin, (params, state) = _median_ms(
      lambda c: compiled(c[0], grads, c[1]), (params, state), steps=steps, warmup=warmup)
  res = {"median_ms": t, "min_ms": tmin,
         "state_bytes_per_param": jo.state_nbytes(state) / n_params}
  del state
  return res, params


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--leaves", type=int, default=16)
  ap.add_argument("--dim", type=int, default=8192)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "optim_step.json"))
  ap.add_argument("--skip-offload", action="store_true")
  args = ap.parse_args()
  results: dict = {"env": report_env(), "shape": f"{args.leaves} x {args.dim}^2 float32"}

  def save():
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1, default=str)

  def section(name, fn):
    t0 = time.perf_counter()
    try:
      results[name] = fn()
    except Exception as e:  # noqa: BLE001  (keep the other sections)
      results[name] = {"error": f"{type(e).__name__}: {e}"[:2000],
                       "trace": traceback.format_exc()[-3000:]}
    results[name + "_wall_s"] = time.perf_counter() - t0
    print(name, json.dumps(results[name], default=str)[:1500], flush=True)
    save()

  n_params = args.leaves * args.dim * args.dim
  results["n_params"] = n_params
  params = _params(args.leaves, args.dim, 0, 0.02)
  grads = _params(args.leaves, args.dim, 1, 1e-3)
  state_bytes = 2 * n_params + 2 * 4 * (n_params // 256)  # codes + absmax of mu and nu

  configs = [kernel.KernelConfig(max_rows=r, num_warps=w, decode=d, encode="segments")
             for d in ("table", "segments") for r, w in ((1, 2), (2, 2), (2, 4), (4, 4))]
  configs += [kernel.KernelConfig(max_rows=2, num_warps=2, encode="arith", fast_log=True)]
  best = {"cfg": None}

  def sweep():
    rows = kernel_sweep(args.dim, configs)
    ok = [r for r in rows if "median_ms" in r and r["cfg"] is not None]
    if ok:
      best["cfg"] = min(ok, key=lambda r: r["median_ms"])["cfg"]
    return {"runs": rows, "best": best["cfg"]}

  section("kernel_sweep_one_leaf", sweep)
  cfg = kernel.KernelConfig(**best["cfg"]) if best["cfg"] else None

  if not args.skip_offload:
    section("host_link", lambda: host_link(state_bytes))
    for chunk in (None,):
      def off(chunk=chunk):
        nonlocal params
        res, params = run_adamw8bit(params, grads, n_params, fused=True, config=cfg,
                                    offload=True, chunk=chunk, steps=5, warmup=2)
        link = results.get("host_link", {})
        if "floor_ms" in link:
          floor = link["floor_ms"]  # the whole state in one direction, the slower one
          res["host_link_floor_ms"] = floor
          res["ratio_to_floor"] = res["median_ms"] / floor
        return res
      section(f"adamw8bit_offload_chunk_{chunk}", off)

  def fused():
    nonlocal params
    res, params = run_adamw8bit(params, grads, n_params, fused=True, config=cfg)
    return res

  def plain():
    nonlocal params
    res, params = run_adamw8bit(params, grads, n_params, fused=False, config=cfg)
    return res

  def baseline():
    nonlocal params
    res, params = run_optax_adamw(params, grads, n_params)
    return res

  section("hbm_copy_tbps", hbm_copy_tbps)
  section("adamw8bit_fused", fused)
  section("adamw8bit_update_plus_apply", plain)
  section("optax_adamw_fp32", baseline)
  floor_bytes = n_params * (4 + 4 + 4 + 2 + 2) + n_params // 256 * 4 * 4
  results["floor_8bit_ms_at_3TBps"] = floor_bytes / (HBM_TBPS * 1e12) * 1e3
  save()


if __name__ == "__main__":
  main()
