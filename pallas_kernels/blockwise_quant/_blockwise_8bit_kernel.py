"""Pallas kernels: blockwise 8-bit quantization into any sorted 256-entry code, and its inverse.

Quantize: one program reads ``rows`` blocks, computes each block's absmax (float32,
NaN-propagating), scales by the correctly rounded reciprocal and finds each value's code index
with bitsandbytes' CUDA search, step for step as ``reference.encode_8bit``: seven halving steps
from index 127, then a comparison with the midpoints to the bracketing neighbours. The code is
read from memory by index (a gather from a 1 KiB table that stays in L1). Dequantize:
``dtype(code[q] * absmax[block])``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.blockwise_quant import _common
from pallas_kernels.blockwise_quant._common import KernelConfig, Program

__all__ = ["quantize_8bit", "dequantize_8bit", "supports_quantize_8bit",
           "supports_dequantize_8bit", "QUANTIZE_KERNEL_NAME", "DEQUANTIZE_KERNEL_NAME",
           "DEFAULT_CONFIG"]

QUANTIZE_KERNEL_NAME = "jaxquant_quantize_8bit"
DEQUANTIZE_KERNEL_NAME = "jaxquant_dequantize_8bit"
DEFAULT_CONFIG = KernelConfig(elems_per_program=4096, num_warps=4)
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _supported_geometry(n: int, blocksize: int) -> bool:
  return 0 < n < _common.INDEX_LIMIT and _common.is_power_of_two(blocksize) and \
      16 <= blocksize <= 4096


def supports_quantize_8bit(x, code, *, blocksize: int, **_) -> bool:
  """Whether the quantize kernel handles these arguments (else callers use the reference)."""
  return (hasattr(x, "dtype") and jnp.dtype(x.dtype) in _DTYPES and code.size == 256
          and _supported_geometry(x.size, blocksize))


def supports_dequantize_8bit(codes, absmax, code, *, blocksize: int, dtype, **_) -> bool:
  """Whether the dequantize kernel handles these arguments."""
  return (jnp.dtype(dtype) in _DTYPES and jnp.dtype(codes.dtype) == jnp.dtype(jnp.uint8)
          and code.size == 256 and absmax.size == -(-codes.size // blocksize)
          and _supported_geometry(codes.size, blocksize))


def _search(s: jax.Array, code_ref) -> jax.Array:
  """Nearest-code index (int32) of scaled values ``s``: ``reference.encode_8bit``'s search."""
  lowest = code_ref[jnp.zeros(s.shape, jnp.int32)]
  highest = code_ref[jnp.full(s.shape, 255, jnp.int32)]
  pivot = jnp.full(s.shape, 127, jnp.int32)
  upper_pivot = jnp.full(s.shape, 255, jnp.int32)
  lower_pivot = jnp.zeros(s.shape, jnp.int32)
  upper, lower = highest, lowest
  val = code_ref[pivot]
  step = 64
  while step > 0:
    up = s > val
    lower_pivot = jnp.where(up, pivot, lower_pivot)
    lower = jnp.where(up, val, lower)
    upper_pivot = jnp.where(up, upper_pivot, pivot)
    upper = jnp.where(up, upper, val)
    pivot = jnp.where(up, pivot + step, pivot - step)
    val = code_ref[pivot]
    step //= 2
  upper = jnp.where(upper_pivot == 255, highest, upper)
  lower = jnp.where(lower_pivot == 0, lowest, lower)
  mid_up = (upper + val) * jnp.float32(0.5)
  mid_down = (lower + val) * jnp.float32(0.5)
  return jnp.where(s > val, jnp.where(s > mid_up, upper_pivot, pivot),
                   jnp.where(s < mid_down, lower_pivot, pivot))


def _quantize_kernel(x_ref, code_ref, q_ref, absmax_ref, *, prog: Program, interpret: bool):
  def load(t):
    return _common.load_tile(x_ref, prog, t, prog.elems, prog.n)

  def process(t, x):
    x = x.astype(jnp.float32).reshape(prog.rows, prog.blocksize)
    absmax = _common.row_absmax(x)
    s = x * _common.reciprocal(absmax, interpret)[:, None]
    q = _search(s, code_ref).astype(jnp.uint8).reshape(prog.elems)
    _common.store_tile(q_ref, q, prog, t, prog.n)
    _common.store_tile(absmax_ref, absmax, prog, t, prog.n_blocks)

  prog.for_each_tile([load], process)


def _dequantize_kernel(q_ref, absmax_ref, code_ref, out_ref, *, prog: Program, dtype):
  def process(t, q, absmax):
    q = q.astype(jnp.int32).reshape(prog.rows, prog.blocksize)
    values = code_ref[q] * absmax[:, None]
    _common.store_tile(out_ref, values.astype(dtype).reshape(prog.elems), prog, t, prog.n)

  prog.for_each_tile([lambda t: _common.load_tile(q_ref, prog, t, prog.elems, prog.n),
                      lambda t: _common.load_tile(absmax_ref, prog, t, prog.rows, prog.n_blocks)],
                     process)


@functools.partial(jax.jit, static_argnames=("blocksize", "interpret", "config"))
def quantize_8bit(x: jax.Array, code: jax.Array, *, blocksize: int, interpret: bool = False,
                  config: KernelConfig | None = None,
                  initial_outputs: tuple[jax.Array, jax.Array] | None = None,
                  ) -> tuple[jax.Array, jax.Array]:
  """Blockwise 8-bit quantization (same contract as ``reference.quantize_8bit``).

  Args:
    x: any shape, float32/float16/bfloat16, read flat; ``n = x.size``.
    code: ``float32 (256,)``, sorted ascending.
    blocksize: elements per block, a power of two in 16..4096.
    interpret: run in the Pallas interpreter instead of compiling for the GPU.
    config: launch parameters; default :data:`DEFAULT_CONFIG`.
    initial_outputs: for tests, ``(codes, absmax)`` to start from (see ``_common.launch``).

  Returns:
    ``(codes, absmax)``: ``uint8 (n,)`` and ``float32 (ceil(n / blocksize),)``.
  """
  if not supports_quantize_8bit(x, code, blocksize=blocksize):
    raise ValueError(f"quantize_8bit kernel does not support x {x.dtype}{tuple(x.shape)}, "
                     f"code {tuple(code.shape)}, blocksize={blocksize!r}")
  config = config or DEFAULT_CONFIG
  prog = Program.make(x.size, blocksize, config)
  q, absmax = _common.launch(
      functools.partial(_quantize_kernel, prog=prog, interpret=interpret),
      prog=prog,
      operands=[x.reshape(-1), code.astype(jnp.float32).reshape(-1)],
      in_specs=[prog.spec(prog.elems), pl.BlockSpec((256,), lambda i: (0,))],
      out_specs=[prog.spec(prog.elems), prog.spec(prog.rows)],
      out_shape=[jax.ShapeDtypeStruct((prog.n,), jnp.uint8),
                 jax.ShapeDtypeStruct((prog.n_blocks,), jnp.float32)],
      config=config, interpret=interpret, name=QUANTIZE_KERNEL_NAME,
      initial_outputs=initial_outputs)
  return q, absmax


@functools.partial(jax.jit, static_argnames=("blocksize", "dtype", "interpret", "config"))
def dequantize_8bit(codes: jax.Array, absmax: jax.Array, code: jax.Array, *, blocksize: int,
                    dtype, interpret: bool = False, config: KernelConfig | None = None,
                    initial_output: jax.Array | None = None) -> jax.Array:
  """Inverse of :func:`quantize_8bit` (same contract as ``reference.dequantize_8bit``).

  Args:
    codes: ``uint8 (n,)``, any shape, read flat.
    absmax: ``float32 (ceil(n / blocksize),)``, any shape, read flat.
    code: ``float32 (256,)``.
    blocksize: elements per block, a power of two in 16..4096.
    dtype: output dtype (float32/float16/bfloat16).
    interpret: run in the Pallas interpreter instead of compiling for the GPU.
    config: launch parameters; default :data:`DEFAULT_CONFIG`.
    initial_output: for tests, ``(n,)`` of ``dtype`` to start from (see ``_common.launch``).

  Returns:
    ``(n,)`` of ``dtype``: ``dtype(code[q] * absmax[i // blocksize])``.
  """
  dtype = jnp.dtype(dtype)
  if not supports_dequantize_8bit(codes, absmax, code, blocksize=blocksize, dtype=dtype):
    raise ValueError(f"dequantize_8bit kernel does not support codes {codes.dtype}"
                     f"{tuple(codes.shape)}, absmax {tuple(absmax.shape)}, "
                     f"blocksize={blocksize!r}, dtype={dtype}")
  config = config or DEFAULT_CONFIG
  prog = Program.make(codes.size, blocksize, config)
  [out] = _common.launch(
      functools.partial(_dequantize_kernel, prog=prog, dtype=dtype),
      prog=prog,
      operands=[codes.reshape(-1), absmax.astype(jnp.float32).reshape(-1),
                code.astype(jnp.float32).reshape(-1)],
      in_specs=[prog.spec(prog.elems), prog.spec(prog.rows),
                pl.BlockSpec((256,), lambda i: (0,))],
      out_specs=[prog.spec(prog.elems)],
      out_shape=[jax.ShapeDtypeStruct((prog.n,), dtype)],
      config=config, interpret=interpret, name=DEQUANTIZE_KERNEL_NAME,
      initial_outputs=None if initial_output is None else [initial_output])
  return out
