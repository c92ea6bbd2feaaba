"""Kernel and block-size choice per shape, cached.

A :class:`Config` names the kernel (``"gemv"``: FMA over a row block, for a few rows of ``x``;
``"gemm"``: tensor-core tiles; ``"dq_dot"``: decode the weight once, then XLA's dot, for
large M; ``"xla"``: the reference, where no kernel beats it) and its tile sizes.
:func:`forward_config` and :func:`grad_config` look a shape up, in order, in a process cache,
then in the table tuned on this GPU model (``tuned.json`` beside this module, written by
``benchmarks/fourbit_matmul.py``), then fall back to a heuristic. Shapes are keyed
with ``M`` rounded up to a power of two, so batch sizes of one bucket share one choice.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any

import jax

from pallas_kernels.fourbit_matmul import _pairs

__all__ = ["Config", "forward_config", "grad_config", "valid", "shape_key", "record",
           "TABLE_PATH"]

TABLE_PATH = pathlib.Path(__file__).with_name("tuned.json")
KERNELS = ("gemv", "gemm", "dq_dot", "xla")
MAX_GEMV_M = 8


@dataclasses.dataclass(frozen=True)
class Config:
  """One kernel choice.

  Attributes:
    kernel: ``"gemv"``, ``"gemm"``, ``"dq_dot"`` or ``"xla"``.
    block_m: rows of ``x`` (or of ``dy``) per program (gemm).
    block_n: weight rows per program (forward) or per reduction step (backward).
    block_k: reduction (forward) or output (backward) columns per step, a power of two that
      is a multiple or a divisor of the blocksize.
    split_k: programs sharing one output tile's reduction (gemv, gemm; float32 partial sums
      added after).
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining depth.
    w_lhs: the decoded weight tile is the left operand of the tensor-core product (stays in
      registers; the output tile is transposed on store).
    group_m: programs along M sharing one weight column of tiles, for L2 reuse (gemm).
    pairs: bfloat16/float16 ``x`` only (ignored otherwise): keep even and odd columns apart
      (:mod:`._pairs`), ``x`` split outside the kernel; gemv fuses its FMAs into the decode.
    prefetch: gemv with ``pairs``: load step ``t + 1`` while step ``t`` computes.
    x_reuse: gemv with ``pairs``: 8-byte groups, so ``x`` needs no layout conversion.
  """
  kernel: str = "gemm"
  block_m: int = 64
  block_n: int = 64
  block_k: int = 64
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 3
  w_lhs: bool = False
  group_m: int = 8
  pairs: bool = False
  prefetch: bool = False
  x_reuse: bool = False

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "Config":
    return cls(**d)


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def valid(cfg: Config, m: int, n: int, k: int, blocksize: int) -> bool:
  """Whether ``cfg`` computes this shape correctly (sizes, divisibility, Triton's rules)."""
  del m, n
  if cfg.kernel == "xla":
    return True
  bk = cfg.block_k
  pow2 = all(v > 0 and v & (v - 1) == 0 for v in (cfg.block_m, cfg.block_n, bk, cfg.split_k))
  if cfg.kernel not in KERNELS or not pow2 or k % bk:
    return False
  if not (bk % blocksize == 0 or blocksize % bk == 0) or min(bk, blocksize) < 32:
    return False
  if (k // bk) % cfg.split_k:
    return False
  if cfg.kernel in ("gemv", "dq_dot"):
    return True
  return min(cfg.block_m, cfg.block_n, bk) >= 16


def _block_k(k: int, blocksize: int, preferred: int) -> int:
  bk = preferred
  while bk > 32 and (k % bk or not (bk % blocksize == 0 or blocksize % bk == 0)):
    bk //= 2
  return bk


def _split(programs: int, steps: int) -> int:
  """Split-K factor bringing the grid to about four programs per SM of an H100 (132 SMs)."""
  s = 1
  while programs * s < 4 * 132 and s < 8 and steps % (2 * s) == 0:
    s *= 2
  return s


# The heuristics below follow the H100 measurements of benchmarks/fourbit_matmul.py (8192²):
# the FMA kernel for a few rows, tensor-core tiles with split-K up to a few hundred rows,
# decode-then-dot beyond (the in-kernel decode costs more than the product there).
def _heuristic_forward(m: int, n: int, k: int, blocksize: int) -> Config:
  if m <= MAX_GEMV_M:
    return Config("gemv", block_m=1, block_n=2, block_k=_block_k(k, blocksize, 2048),
                  num_warps=4, num_stages=1, pairs=True, prefetch=True)
  if m > 256:
    return Config("dq_dot", block_n=32, block_k=_block_k(k, blocksize, 512), num_warps=4,
                  num_stages=1)
  small = m <= 64
  bm = max(16, min(_pow2_at_least(m), 16 if small else 128))
  bn = min(64 if small else 128, max(16, _pow2_at_least(n)))
  bk = _block_k(k, blocksize, 128 if small else 64)
  programs = -(-m // bm) * -(-n // bn)
  pairs = m <= 16  # even/odd decode, decoded tile as the left operand: faster at M = 16 only
  return Config("gemm", block_m=bm, block_n=bn, block_k=bk, split_k=_split(programs, k // bk),
                num_warps=4 if small else 8, num_stages=1 if pairs else 4 if small else 3,
                w_lhs=pairs, pairs=pairs, prefetch=pairs)


def _heuristic_grad(m: int, n: int, k: int, blocksize: int) -> Config:
  if m > 256:
    return Config("dq_dot", block_n=64, block_k=_block_k(k, blocksize, 128), num_warps=4,
                  num_stages=1)
  bm = min(128, max(16, _pow2_at_least(m)))
  bk = min(128, _block_k(k, blocksize, 128))
  bn = min(64, max(16, _pow2_at_least(n)))
  return Config("gemm", block_m=bm, block_n=bn, block_k=bk, num_warps=4 if bm * bk <= 4096
                else 8, num_stages=3)


def shape_key(m: int, n: int, k: int, blocksize: int, dtype) -> str:
  """Table key: ``M`` rounded up to a power of two, the weight shape, blocksize, dtype."""
  return f"{_pow2_at_least(m)},{n},{k},{blocksize},{jax.numpy.dtype(dtype).name}"


@functools.cache
def _device_kind() -> str:
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return "none"
  return device.device_kind if device.platform == "gpu" else device.platform


@functools.cache
def _shipped_table() -> dict[str, dict[str, dict[str, Any]]]:
  if not TABLE_PATH.exists():
    return {}
  return json.loads(TABLE_PATH.read_text()).get(_device_kind(), {})


_CACHE: dict[tuple[str, str], Config] = {}


def record(op: str, key: str, cfg: Config) -> None:
  """Cache ``cfg`` as the choice for ``op`` at table key ``key`` (used by the tuner)."""
  _CACHE[(op, key)] = cfg


def _lookup(op: str, m: int, n: int, k: int, blocksize: int, dtype, heuristic) -> Config:
  key = shape_key(m, n, k, blocksize, dtype)
  cfg = _CACHE.get((op, key))
  if cfg is None:
    entry = _shipped_table().get(op, {}).get(key)
    cfg = Config.from_json(entry) if entry is not None else None
    if cfg is None or not valid(cfg, m, n, k, blocksize):
      cfg = heuristic(m, n, k, blocksize)
    if cfg.pairs and not _pairs.MULTI_RESULT_ASM:
      cfg = dataclasses.replace(cfg, pairs=False, prefetch=False, x_reuse=False)
    _CACHE[(op, key)] = cfg
  return cfg


def forward_config(m: int, n: int, k: int, blocksize: int, dtype) -> Config:
  """The choice for ``x (m, k) @ W (n, k).T``."""
  return _lookup("matmul_4bit", m, n, k, blocksize, dtype, _heuristic_forward)


def grad_config(m: int, n: int, k: int, blocksize: int, dtype) -> Config:
  """The choice for ``dy (m, n) @ W (n, k)``."""
  return _lookup("matmul_4bit_grad_input", m, n, k, blocksize, dtype, _heuristic_grad)
