"""Pallas kernel: blockwise 4-bit dequantization, with double-quantized absmax decoded on the fly.

One program reads ``rows * blocksize / 2`` packed bytes and ``rows`` absmax entries, splits each
byte into its two nibbles (high first), looks the nibble up in the 16-entry code, multiplies by
the block's float32 absmax and writes ``rows * blocksize`` values of ``dtype``. With double
quantization the absmax entry is a uint8 code: the kernel computes
``nested_code[q] * nested_absmax[block // nested_blocksize] + offset`` in float32 (product and
sum each rounded, as the reference does), so the float32 absmax never goes through memory.
When ``n`` allows, the tile is held as vector rows of the output (``_rows.py``: each thread
turns 4 packed bytes into one 16-byte row of 8 values, nothing moves between threads); other
sizes use a flat ``(rows, blocksize)`` tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.blockwise_quant import _common, _rows
from pallas_kernels.blockwise_quant._common import KernelConfig, Program

__all__ = ["dequantize_4bit", "supports_dequantize_4bit", "KERNEL_NAME", "DEFAULT_CONFIG"]

KERNEL_NAME = "jaxquant_dequantize_4bit"
# The fastest of the sweep in benchmarks/results/blockwise_quant.json (H100, 8192 x 8192 bf16,
# median us): vector rows 79.5 (8192 elements, 8 warps, broadcast split: 79.6; flat tiles 83.4).
DEFAULT_CONFIG = KernelConfig(elems_per_program=2048, num_warps=4, pairs="split",
                              layout="rows")
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def supports_dequantize_4bit(packed, absmax, code, nested_absmax=None, nested_code=None,
                             offset=None, *, blocksize: int, n: int, dtype,
                             nested_blocksize: int = 256, **_) -> bool:
  """Whether the kernel handles these arguments (else callers use the reference)."""
  nested = nested_absmax is not None
  return (jnp.dtype(dtype) in _DTYPES and 0 < n < _common.INDEX_LIMIT
          and _common.is_power_of_two(blocksize) and 32 <= blocksize <= 4096
          and packed.size == (n + 1) // 2 and code.size == 16
          and absmax.size == -(-n // blocksize)
          and jnp.dtype(absmax.dtype) == jnp.dtype(jnp.uint8 if nested else jnp.float32)
          and (not nested or (nested_code is not None and nested_code.size == 256
                              and offset is not None and offset.size == 1
                              and isinstance(nested_blocksize, int) and nested_blocksize > 0
                              and nested_absmax.size == -(-absmax.size // nested_blocksize))))


def unpack_nibbles(packed: jax.Array) -> jax.Array:
  """int32 bytes ``(a, w)`` → int32 codes ``(a, 2 * w)``, high nibble first."""
  a, w = packed.shape
  pairs = jnp.broadcast_to(packed.reshape(a, w, 1), (a, w, 2))
  shift = jnp.where(jax.lax.broadcasted_iota(jnp.int32, pairs.shape, 2) == 0, 4, 0)
  return ((pairs >> shift) & 15).reshape(a, 2 * w)


def _decode_values(packed: jax.Array, absmax: jax.Array, code_ref, dtype, pairs: str
                   ) -> jax.Array:
  """Bytes ``(a, w)`` (int32) whose rows have absmax ``absmax (a,)`` → ``(a, 2 * w)`` values
  ``dtype(code[q] * absmax)``."""
  a, w = packed.shape
  scale = absmax[:, None]
  if pairs == "split":
    # Both nibbles of a byte decoded side by side, then interleaved in registers.
    high = (code_ref[packed >> 4] * scale).astype(dtype)
    low = (code_ref[packed & 15] * scale).astype(dtype)
    return jax.lax.stack([high, low], axis=2).reshape(a, 2 * w)
  return (code_ref[unpack_nibbles(packed)] * scale).astype(dtype)


def decode_absmax(absmax: jax.Array, prog: Program, t, nested_refs, nested_blocksize: int,
                  interpret: bool) -> jax.Array:
  """float32 absmax ``(rows,)`` of tile ``t`` from its stored entries ``(rows,)``."""
  if nested_refs is None:
    return absmax.astype(jnp.float32)
  nested_absmax_ref, nested_code_ref, offset_ref = nested_refs
  n_nested = nested_absmax_ref.shape[0]
  group = jnp.minimum(prog.block_index(t) // nested_blocksize, n_nested - 1)
  scale = nested_absmax_ref[group]
  value = nested_code_ref[absmax.astype(jnp.int32)]
  return _common.mul_rn(value, scale, interpret) + offset_ref[...]


def _kernel(packed_ref, absmax_ref, code_ref, *rest, prog: Program, vec: int | None, dtype,
            nested: bool, nested_blocksize: int, config: KernelConfig, interpret: bool):
  """``vec`` set: tiles as vector rows ``(elems // vec, vec)`` of the output (``_rows.py``);
  ``None``: flat tiles ``(rows, blocksize)``."""
  *nested_refs, out_ref = rest
  n_bytes = (prog.n + 1) // 2
  if vec is not None:
    rows, group, n_rows = prog.elems // vec, prog.blocksize // vec, prog.n // vec

  def load_packed(t):
    if vec is not None:
      return _rows.load_rows(packed_ref, prog, t, rows, n_rows,
                             eviction_policy=config.eviction_policy)
    return _common.load_tile(packed_ref, prog, t, prog.elems // 2, n_bytes,
                             eviction_policy=config.eviction_policy)

  def load_absmax(t):
    return _common.load_tile(absmax_ref, prog, t, prog.rows, prog.n_blocks)

  def process(t, packed, stored):
    absmax = decode_absmax(stored, prog, t, nested_refs if nested else None, nested_blocksize,
                           interpret)
    packed = packed.astype(jnp.int32)
    if vec is not None:
      values = _decode_values(packed, _rows.per_row(absmax, group), code_ref, dtype,
                              config.pairs)
      _rows.store_rows(out_ref, values, prog, t, n_rows)
      return
    values = _decode_values(packed.reshape(prog.rows, prog.blocksize // 2), absmax, code_ref,
                            dtype, config.pairs)
    _common.store_tile(out_ref, values.reshape(prog.elems), prog, t, prog.n)

  prog.for_each_tile([load_packed, load_absmax], process)


@functools.partial(jax.jit, static_argnames=("blocksize", "n", "dtype", "nested_blocksize",
                                             "interpret", "config"))
def dequantize_4bit(packed: jax.Array, absmax: jax.Array, code: jax.Array,
                    nested_absmax: jax.Array | None = None, nested_code: jax.Array | None = None,
                    offset: jax.Array | None = None, *, blocksize: int, n: int, dtype,
                    nested_blocksize: int = 256, interpret: bool = False,
                    config: KernelConfig | None = None,
                    initial_output: jax.Array | None = None) -> jax.Array:
  """Inverse of 4-bit quantization (same contract as ``reference.dequantize_4bit``).

  Args:
    packed: ``uint8 ((n + 1) // 2,)``, any shape, read flat.
    absmax: ``float32 (ceil(n / blocksize),)``, or ``uint8`` codes when double quantized.
    code: ``float32 (16,)`` value of each nibble.
    nested_absmax: ``float32 (ceil(absmax.size / nested_blocksize),)`` or ``None``.
    nested_code: ``float32 (256,)`` code of the absmax bytes, with ``nested_absmax``.
    offset: ``float32 ()`` added to the decoded absmax, with ``nested_absmax``.
    blocksize: elements per block, a power of two in 32..4096.
    n: number of elements.
    dtype: output dtype (float32/float16/bfloat16).
    nested_blocksize: absmax entries per ``nested_absmax`` value.
    interpret: run in the Pallas interpreter instead of compiling for the GPU.
    config: launch parameters; default :data:`DEFAULT_CONFIG`.
    initial_output: for tests, ``(n,)`` of ``dtype`` to start from (see ``_common.launch``).

  Returns:
    ``(n,)`` of ``dtype``: ``dtype(code[q] * absmax[i // blocksize])``.
  """
  dtype = jnp.dtype(dtype)
  args = (packed, absmax, code, nested_absmax, nested_code, offset)
  if not supports_dequantize_4bit(*args, blocksize=blocksize, n=n, dtype=dtype,
                                  nested_blocksize=nested_blocksize):
    raise ValueError(f"dequantize_4bit kernel does not support packed {packed.dtype}"
                     f"{tuple(packed.shape)}, absmax {absmax.dtype}{tuple(absmax.shape)}, "
                     f"n={n}, blocksize={blocksize}, dtype={dtype}")
  config = config or DEFAULT_CONFIG
  prog = Program.make(n, blocksize, config)
  nested = nested_absmax is not None
  vec = _rows.vector_width(dtype)
  if config.layout != "rows" or not _rows.supported(n, blocksize, vec):
    vec = None
  if vec is None:
    data, data_spec, out_spec = packed.reshape(-1), prog.spec(prog.elems // 2), \
        prog.spec(prog.elems)
    out_shape = jax.ShapeDtypeStruct((n,), dtype)
  else:
    data = packed.reshape(n // vec, vec // 2)
    data_spec = _rows.spec(prog, prog.elems // vec, vec // 2)
    out_spec = _rows.spec(prog, prog.elems // vec, vec)
    out_shape = jax.ShapeDtypeStruct((n // vec, vec), dtype)
  operands = [data, absmax.reshape(-1), code.astype(jnp.float32).reshape(-1)]
  in_specs = [data_spec, prog.spec(prog.rows), pl.BlockSpec((16,), lambda i: (0,))]
  if nested:
    operands += [nested_absmax.astype(jnp.float32).reshape(-1),
                 nested_code.astype(jnp.float32).reshape(-1),
                 offset.astype(jnp.float32).reshape(1)]
    in_specs += [pl.BlockSpec((operands[3].size,), lambda i: (0,)),
                 pl.BlockSpec((256,), lambda i: (0,)),
                 pl.BlockSpec((1,), lambda i: (0,))]
  [out] = _common.launch(
      functools.partial(_kernel, prog=prog, vec=vec, dtype=dtype, nested=nested,
                        nested_blocksize=nested_blocksize, config=config, interpret=interpret),
      prog=prog, operands=operands, in_specs=in_specs, out_specs=[out_spec],
      out_shape=[out_shape], config=config, interpret=interpret, name=KERNEL_NAME,
      initial_outputs=None if initial_output is None else
      [initial_output.reshape(out_shape.shape)])
  out = out.reshape(n)
  return out
