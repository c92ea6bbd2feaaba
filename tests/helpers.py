"""Shared test utilities: golden-file loading, tolerance tables, HLO kernel-name counting."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

DATA = pathlib.Path(__file__).parent / "data"
BNB = DATA / "bnb"

# (rtol, atol) per activation dtype, for matmul outputs scaled by sqrt(K) where noted.
TOLERANCES = {
    jnp.dtype(jnp.float32): (1e-5, 1e-5),
    jnp.dtype(jnp.float16): (2e-3, 2e-3),
    jnp.dtype(jnp.bfloat16): (1.6e-2, 1.6e-2),
}


@functools.cache
def golden(name: str) -> dict[str, np.ndarray]:
  """The arrays of ``tests/data/bnb/<name>.npz`` (bitsandbytes CUDA reference vectors)."""
  with np.load(BNB / f"{name}.npz") as f:
    return {k: f[k] for k in f.files}


def rel_error(out, ref) -> float:
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def count_pallas_calls(fn, *args, name: str) -> int:
  """How many times a ``pallas_call`` named ``name`` appears in ``fn``'s lowered program."""
  text = jax.jit(fn).lower(*args).as_text()
  return text.count(name)
