"""W5: one optimizer step on 1.07 B float32 parameters (16 x 8192^2), gradients given.

Measured in one run, on the same device (median step time, state bytes per parameter). Each
step is timed alone (launched, then waited for: ``median_ms``) and, as a training loop runs it,
back to back without waiting in between (``back_to_back_ms``, the device time per step):

* ``optax.adamw`` (float32 state), jitted ``update`` + ``apply_updates``, params and state
  donated: the baseline.
* ``jaxquant.optim.adamw8bit`` through ``update_and_apply`` (fused kernel writes the new
  parameters) and through the plain Optax path (``update`` + ``apply_updates``).
* the same with ``offload=True`` (state in ``pinned_host``, streamed leaf by leaf), beside the
  host-link floor: the state bytes moved each way divided by the measured host<->device
  bandwidth (the link is full duplex, so the floor is the slower direction). The link section
  also times both directions at once inside one program (do they overlap?). Device memory
  during the offloaded step: XLA's own peak of the compiled step, its temporaries (state
  staged on the device) and the runtime's peak counter (the offload section runs first).
* the kernel alone on one 8192^2 leaf for a few launch configurations (the best one is used),
  beside an I/O-only kernel with the same loads and stores (the roofline of this access
  pattern) and the XLA reference, for each encoder (``KernelConfig.encoder``). Per-call time
  of back-to-back calls.

Usage: ``python benchmarks/optim_step.py [--leaves 16] [--dim 8192] [--out results.json]
[--sections sweep,link,offload,fused,plain,optax] [--prefetch 1,none] [--encoders masked,fixed]``.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._timing import report_env  # noqa: E402
import jaxquant.optim as jo  # noqa: E402
import pallas_kernels  # noqa: E402
from jaxquant.optim import _offload, _state  # noqa: E402
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


def _back_to_back_ms(fn, carry, calls: int, reps: int = 5):
  """Median over ``reps`` of (wall time of ``calls`` chained calls, not waited for in between)
  / ``calls``: the device time per call."""
  carry = fn(carry)
  _block(carry)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(calls):
      carry = fn(carry)
    _block(carry)
    times.append((time.perf_counter() - t0) * 1e3 / calls)
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


def _stat(name: str) -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get(name)


def host_link(nbytes: int, reps: int = 5) -> dict:
  """Host<->device bandwidth for ``nbytes`` with ``jax.device_put`` between memory kinds, each
  direction alone and both at once inside one jitted program."""
  dev = jax.devices()[0]
  host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
  devs = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
  x_dev = jnp.ones((nbytes,), jnp.uint8)
  x_host = jax.device_put(x_dev, host)
  _block((x_dev, x_host))
  both = jax.jit(lambda h, d: (jax.device_put(h, jax.memory.Space.Device),
                               jax.device_put(d, jax.memory.Space.Host)))
  _block(both(x_host, x_dev))
  h2d, d2h, duplex = [], [], []
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
    t0 = time.perf_counter()
    _block(both(x_host, x_dev))
    duplex.append(time.perf_counter() - t0)
  del x_dev, x_host
  h2d_s, d2h_s, both_s = (statistics.median(v) for v in (h2d, d2h, duplex))
  return {"bytes": nbytes, "h2d_ms": h2d_s * 1e3, "d2h_ms": d2h_s * 1e3,
          "h2d_gbps": nbytes / h2d_s / 1e9, "d2h_gbps": nbytes / d2h_s / 1e9,
          "both_directions_in_one_jit_ms": both_s * 1e3,
          "floor_ms": max(h2d_s, d2h_s) * 1e3}


def hbm_copy_tbps(n: int = 1 << 30) -> float:
  x = jnp.ones((n,), jnp.float32)
  f = jax.jit(lambda a: a * 1.0000001)
  t, _, _ = _median_ms(lambda c: f(c), x, steps=10, warmup=2)
  return 2 * 4 * n / (t * 1e-3) / 1e12


def _adam_leaf(dim: int):
  g = 1e-3 * jax.random.normal(jax.random.key(3), (dim * dim // 256, 256), jnp.float32)
  p = 0.02 * jax.random.normal(jax.random.key(4), g.shape, jnp.float32)
  m = _state.zeros_8bit(p, True, 256)
  v = _state.zeros_8bit(p, False, 256)
  codes = (m.data, v.data)
  absmax = (m.absmax.reshape(-1), v.absmax.reshape(-1))
  fam = families.FAMILIES["adam"]
  hp = np.zeros(families.HP_SIZE, np.float32)
  for name, val in dict(lr=1e-3, wd=1e-4, gscale=1.0, b1=0.9, b2=0.999, omb1=0.1, omb2=1e-3,
                        eps=1e-8, c1=10.0, c2=1000.0, c1_next=5.0).items():
    hp[families.hparam_index(fam, name)] = val
  return g, p, codes, absmax, (m.code, v.code), jnp.asarray(hp)


def _io_kernel(g_ref, p_ref, q1_ref, q2_ref, a1_ref, a2_ref, po_ref, q1o_ref, q2o_ref,
               a1o_ref, a2o_ref, *, rows, tiles):
  """The fused kernel's loads and stores (same tiles) with next to no arithmetic."""
  view = lambda ref, start: ref if tiles == 1 else ref.at[pl.ds(start, rows)]  # noqa: E731
  ins = (g_ref, p_ref, q1_ref, q2_ref, a1_ref, a2_ref)

  def process(g, p, q1, q2, a1, a2, start=0):
    view(po_ref, start)[...] = p + g
    view(q1o_ref, start)[...] = q1 + 1
    view(q2o_ref, start)[...] = q2 + 1
    view(a1o_ref, start)[...] = a1 * 2
    view(a2o_ref, start)[...] = a2 * 2

  kernel._for_each_tile(rows, tiles, [lambda s, r=r: view(r, s)[...] for r in ins], process)


def io_only(cfg: kernel.KernelConfig):
  def fn(g, p, codes, absmax, maps, hp):
    del maps, hp
    rows, tiles = kernel.geometry(g.shape[0], cfg)
    t = pl.BlockSpec((rows * tiles, 256), lambda i: (i, 0))
    r = pl.BlockSpec((rows * tiles,), lambda i: (i,))
    outs = pl.pallas_call(
        functools.partial(_io_kernel, rows=rows, tiles=tiles),
        out_shape=[jax.ShapeDtypeStruct(g.shape, jnp.float32)]
        + [jax.ShapeDtypeStruct(g.shape, jnp.uint8)] * 2
        + [jax.ShapeDtypeStruct(absmax[0].shape, jnp.float32)] * 2,
        grid=(g.shape[0] // (rows * tiles),), in_specs=[t, t, t, t, r, r],
        out_specs=[t, t, t, r, r], input_output_aliases={1: 0, 2: 1, 3: 2, 4: 3, 5: 4},
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages),
        name="io_only")(g, p, *codes, *absmax)
    return outs[0], tuple(outs[1:3]), tuple(outs[3:])

  return fn


def kernel_sweep(dim: int, configs) -> list[dict]:
  """The fused AdamW kernel alone on one ``dim x dim`` leaf, per launch configuration, with
  the I/O-only kernel and the XLA reference."""
  g, p, codes, absmax, maps, hp = _adam_leaf(dim)
  n = g.size
  gbytes = n * (4 + 4 + 4 + 2 + 2) + 4 * 4 * (n // 256)
  out = []
  runs = [("pallas", c) for c in configs] + [("io_only", c) for c in configs[:2]]
  runs += [("xla", None)]
  for impl, cfg in runs:
    label = impl if cfg is None else f"{impl} {cfg}"
    try:
      kw = dict(family="adam", write="param", codebook="dynamic")
      if impl == "io_only":
        raw = io_only(cfg)
      else:
        raw = functools.partial(pallas_kernels.get("optim_update_8bit", impl).fn, **kw,
                                **({"config": cfg} if cfg is not None else {}))
      # Parameter and state donated, as in a training step (the kernel updates them in place).
      fn = jax.jit(lambda pp, cc, aa, raw=raw: raw(g, pp, cc, aa, maps, hp),
                   donate_argnums=(0, 1, 2))
      start = (p + 0, tuple(c + 0 for c in codes), tuple(a + 0 for a in absmax))
      t, tmin, _ = _back_to_back_ms(lambda c, fn=fn: fn(*c), start, calls=16 if cfg else 2,
                                    reps=5 if cfg else 2)
      out.append({"impl": impl, "config": label, "median_ms": t, "min_ms": tmin,
                  "tbps": gbytes / (t * 1e-3) / 1e12,
                  "cfg": None if cfg is None or impl != "pallas" else dict(
                      rows=cfg.rows, tiles_per_program=cfg.tiles_per_program,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                      encoder=cfg.encoder)})
    except Exception as e:  # noqa: BLE001  (report every configuration)
      out.append({"impl": impl, "config": label, "error": f"{type(e).__name__}: {e}"[:600]})
    print(out[-1], flush=True)
  return out


def run_adamw8bit(params, grads, n_params, *, fused: bool, config, offload=False,
                  chunk=None, steps=20, warmup=3) -> dict:
  tx = jo.adamw8bit(1e-3, weight_decay=1e-4, kernel_config=config, offload=offload,
                    offload_chunk=chunk)
  in_use0 = _stat("bytes_in_use")
  state = tx.init(params)
  _block(state)
  in_use1 = _stat("bytes_in_use")
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
  t_chain, _, (params, state) = _back_to_back_ms(
      lambda c: compiled(c[0], grads, c[1]), (params, state), calls=10, reps=3)
  state_bytes = jo.state_nbytes(state)
  device_state = jo.memory_kinds(state).get("device", 0)
  res = {"median_ms": t, "min_ms": tmin, "back_to_back_ms": t_chain,
         "state_bytes_per_param": state_bytes / n_params,
         "device_state_bytes_per_param": device_state / n_params,
         "state_memory_kinds_after_init": kinds, "memory_analysis": mem,
         "device_bytes_in_use_delta_from_init": (None if in_use0 is None else in_use1 - in_use0),
         "device_bytes_in_use_before_init": in_use0,
         "peak_bytes_in_use": _stat("peak_bytes_in_use"), "steps": steps}
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
  t_chain, _, (params, state) = _back_to_back_ms(
      lambda c: compiled(c[0], grads, c[1]), (params, state), calls=10, reps=3)
  res = {"median_ms": t, "min_ms": tmin, "back_to_back_ms": t_chain,
         "state_bytes_per_param": jo.state_nbytes(state) / n_params}
  del state
  return res, params


SWEEP = [kernel.KernelConfig(rows=r, tiles_per_program=t, num_warps=w)
         for r, t, w in ((4, 4, 4), (1, 1, 1), (4, 1, 4), (2, 4, 2), (8, 1, 4), (8, 2, 8),
                         (2, 8, 2), (4, 2, 2), (1, 8, 1), (2, 1, 1), (1, 4, 1))]


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--leaves", type=int, default=16)
  ap.add_argument("--dim", type=int, default=8192)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "optim_step.json"))
  ap.add_argument("--sections", default="sweep,link,offload,fused,plain,optax")
  ap.add_argument("--prefetch", default="1",
                  help="offload prefetch depths to run, e.g. '1,none' ('none': XLA's order)")
  ap.add_argument("--no-sweep-configs", action="store_true",
                  help="sweep only the default configuration (with io-only and xla)")
  ap.add_argument("--encoders", default=",".join(kernel.ENCODERS),
                  help="KernelConfig.encoder values to sweep, e.g. 'masked,fixed'")
  args = ap.parse_args()
  sections = set(args.sections.split(","))
  results: dict = {"env": report_env(), "shape": f"{args.leaves} x {args.dim}^2 float32",
                   "argv": sys.argv[1:]}

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
  state_bytes = 2 * n_params + 2 * 4 * (n_params // 256)  # codes + absmax of mu and nu
  best = {"cfg": None}

  if "sweep" in sections:
    def sweep():
      base = [kernel.DEFAULT_CONFIG] if args.no_sweep_configs else [kernel.DEFAULT_CONFIG] + SWEEP
      rows = kernel_sweep(args.dim, [dataclasses.replace(c, encoder=e)
                                     for e in args.encoders.split(",") for c in base])
      ok = [r for r in rows if "median_ms" in r and r["cfg"] is not None]
      if ok:
        best["cfg"] = min(ok, key=lambda r: r["median_ms"])["cfg"]
      return {"runs": rows, "best": best["cfg"]}
    section("kernel_sweep_one_leaf", sweep)
  cfg = kernel.KernelConfig(**best["cfg"]) if best["cfg"] else None
  results["config_used"] = str(cfg or kernel.DEFAULT_CONFIG)

  params = _params(args.leaves, args.dim, 0, 0.02)
  grads = _params(args.leaves, args.dim, 1, 1e-3)
  if "link" in sections or "offload" in sections:
    section("host_link", lambda: host_link(state_bytes))
  if "offload" in sections:
    for depth in args.prefetch.split(","):
      def off(depth=depth):
        nonlocal params
        _offload.PREFETCH = None if depth == "none" else int(depth)
        try:
          res, params = run_adamw8bit(params, grads, n_params, fused=True, config=cfg,
                                      offload=True, steps=5, warmup=2)
        finally:
          _offload.PREFETCH = 1
        link = results.get("host_link", {})
        if "floor_ms" in link:
          floor = link["floor_ms"]  # the whole state in one direction, the slower one
          res["host_link_floor_ms"] = floor
          res["ratio_to_floor"] = res["median_ms"] / floor
        res["device_bytes_of_params_and_grads"] = 2 * 4 * n_params
        return res
      section(f"adamw8bit_offload_prefetch_{depth}", off)

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
  for name, fn in (("fused", fused), ("plain", plain), ("optax", baseline)):
    if name in sections:
      section({"fused": "adamw8bit_fused", "plain": "adamw8bit_update_plus_apply",
               "optax": "optax_adamw_fp32"}[name], fn)
  floor_bytes = n_params * (4 + 4 + 4 + 2 + 2) + n_params // 256 * 4 * 4
  results["floor_8bit_ms_at_3TBps"] = floor_bytes / (HBM_TBPS * 1e12) * 1e3
  save()


if __name__ == "__main__":
  main()
