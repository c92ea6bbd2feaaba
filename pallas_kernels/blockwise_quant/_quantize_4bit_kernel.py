"""Pallas kernel: blockwise 4-bit (NF4 / FP4) quantization, bytes identical to ``reference.py``.

One program reads ``rows`` blocks (``rows * blocksize`` elements of the flat input), computes
each block's absmax (float32, NaN-propagating), scales by the correctly rounded reciprocal,
encodes (``_encode4.py``), packs two codes per byte (first element in the high nibble) and
writes ``rows * blocksize / 2`` bytes and ``rows`` absmax values. Everything is read and written
once. The tile is held as vector rows (``_rows.py``) when ``n`` allows, so no data moves
between threads but the absmax; other sizes use a flat ``(rows, blocksize)`` tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.blockwise_quant import _common, _encode4, _rows
from pallas_kernels.blockwise_quant._common import KernelConfig, Program

__all__ = ["quantize_4bit", "supports_quantize_4bit", "KERNEL_NAME", "DEFAULT_CONFIG"]

KERNEL_NAME = "jaxquant_quantize_4bit"
# The fastest of the sweep in benchmarks/results/blockwise_quant.json (H100, 8192 x 8192 bf16,
# median us): vector rows 84.9 (4 warps: 85.9; flat tiles 91.7; the earlier table encoder on
# flat tiles 108.8).
DEFAULT_CONFIG = KernelConfig(elems_per_program=2048, num_warps=8, encoder="clamp",
                              pairs="split", layout="rows")
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
# Absmax bit patterns for which the table encoder is valid: finite normal floats whose
# reciprocal is normal too (2**-126 <= absmax <= 2**125).
_NORMAL_MIN_BITS = 0x00800000
_NORMAL_MAX_BITS = 0x7C000000


def supports_quantize_4bit(x, *, blocksize: int, quant_type: str, **_) -> bool:
  """Whether the kernel handles this input (else callers use the reference)."""
  return (hasattr(x, "dtype") and jnp.dtype(x.dtype) in _DTYPES
          and 0 < x.size < _common.INDEX_LIMIT
          and _common.is_power_of_two(blocksize) and 32 <= blocksize <= 4096
          and quant_type in ("nf4", "fp4"))


def _pack_pairs(codes: jax.Array, pairs: str) -> jax.Array:
  """int32 codes ``(a, w)`` → bytes ``(a, w // 2)`` as int32, element 2i in the high nibble."""
  a, w = codes.shape
  split = codes.reshape(a, w // 2, 2)
  if pairs == "split":
    high, low = jax.lax.unstack(split, axis=2)
    return (high << 4) | low
  shift = jnp.where(jax.lax.broadcasted_iota(jnp.int32, split.shape, 2) == 0, 4, 0)
  return jnp.sum(split << shift, axis=2)


def _encode(s: jax.Array, absmax: jax.Array, tables, *, quant_type: str, encoder: str,
            interpret: bool) -> jax.Array:
  """int32 codes of the scaled values ``s`` (float32, any 2-D shape) of blocks whose absmax
  are ``absmax`` (the guarded encoders check them)."""
  if encoder == "compare":
    return _encode4.encode_compare(s, quant_type)
  if encoder == "clamp":
    clamp = _encode4.clamp_select if interpret else _common.clamp_unit
    return _encode4.encode_poly(s, *tables, quant_type, clamp=clamp)
  if encoder == "clamp_select":
    return _encode4.encode_poly(s, *tables, quant_type, clamp=_encode4.clamp_select)
  bits = jax.lax.bitcast_convert_type(absmax, jnp.int32)
  normal = (bits >= _NORMAL_MIN_BITS) & (bits <= _NORMAL_MAX_BITS)
  all_normal = jnp.min(normal.astype(jnp.int32)) == 1
  if encoder == "poly":
    fast = lambda v: _encode4.encode_poly(v, *tables, quant_type)
  else:
    fast = lambda v: _encode4.encode_table(v, *tables, quant_type)
  return jax.lax.cond(all_normal, fast, lambda v: _encode4.encode_compare(v, quant_type), s)


def _tables(quant_type: str, encoder: str) -> list[jax.Array]:
  """Lookup tables the encoder reads (kernel operands)."""
  if encoder in ("poly", "clamp", "clamp_select"):
    return [jnp.asarray(_encode4.poly_table(quant_type))]
  if encoder == "table":
    return [jnp.asarray(t) for t in _encode4.encoder_tables(quant_type)]
  if encoder == "compare":
    return []
  raise ValueError("encoder must be 'clamp', 'clamp_select', 'poly', 'table' or 'compare', "
                   f"got {encoder!r}")


def _kernel_flat(x_ref, *rest, prog: Program, quant_type: str, config: KernelConfig,
                 interpret: bool):
  """Tiles as ``(rows, blocksize)``; any ``n`` (an odd one ends in the code of 0.0)."""
  *tables, q_ref, absmax_ref = rest

  def load(t):
    return _common.load_tile(x_ref, prog, t, prog.elems, prog.n,
                             eviction_policy=config.eviction_policy)

  def process(t, x):
    x = x.astype(jnp.float32).reshape(prog.rows, prog.blocksize)
    absmax = _common.row_absmax(x)
    s = x * _common.reciprocal(absmax, interpret)[:, None]
    codes = _encode(s, absmax, tables, quant_type=quant_type, encoder=config.encoder,
                    interpret=interpret)
    if prog.n % 2:
      # The odd tail's last nibble holds the code of 0.0, whatever the block's absmax.
      codes = jnp.where(prog.element_index(t) < prog.n, codes, _encode4.pad_code(quant_type))
    packed = _pack_pairs(codes, config.pairs).reshape(prog.elems // 2).astype(jnp.uint8)
    _common.store_tile(q_ref, packed, prog, t, (prog.n + 1) // 2)
    _common.store_tile(absmax_ref, absmax, prog, t, prog.n_blocks)

  prog.for_each_tile([load], process)


def _kernel_rows(x_ref, *rest, prog: Program, vec: int, quant_type: str,
                 config: KernelConfig, interpret: bool):
  """Tiles as vector rows ``(elems // vec, vec)`` (see ``_rows.py``); ``n % vec == 0``."""
  *tables, q_ref, absmax_ref = rest
  rows, group, n_rows = prog.elems // vec, prog.blocksize // vec, prog.n // vec

  def load(t):
    return _rows.load_rows(x_ref, prog, t, rows, n_rows, eviction_policy=config.eviction_policy)

  def process(t, x):
    x = x.astype(jnp.float32)
    absmax = _rows.block_absmax(x, group)
    s = x * _rows.per_row(_common.reciprocal(absmax, interpret), group)[:, None]
    codes = _encode(s, absmax, tables, quant_type=quant_type, encoder=config.encoder,
                    interpret=interpret)
    _rows.store_rows(q_ref, _pack_pairs(codes, config.pairs).astype(jnp.uint8), prog, t,
                     n_rows)
    _common.store_tile(absmax_ref, absmax, prog, t, prog.n_blocks)

  prog.for_each_tile([load], process)


@functools.partial(jax.jit, static_argnames=("blocksize", "quant_type", "interpret", "config"))
def quantize_4bit(x: jax.Array, *, blocksize: int, quant_type: str, interpret: bool = False,
                  config: KernelConfig | None = None,
                  initial_outputs: tuple[jax.Array, jax.Array] | None = None,
                  ) -> tuple[jax.Array, jax.Array]:
  """Blockwise 4-bit quantization (same contract as ``reference.quantize_4bit``).

  Args:
    x: any shape, float32/float16/bfloat16, read flat; ``n = x.size``.
    blocksize: elements per block, a power of two in 32..4096.
    quant_type: ``"nf4"`` or ``"fp4"``.
    interpret: run the kernel in the Pallas interpreter (any backend) instead of compiling it
      for the GPU.
    config: launch parameters; default :data:`DEFAULT_CONFIG`.
    initial_outputs: for tests, ``(packed, absmax)`` to start from (see ``_common.launch``).

  Returns:
    ``(packed, absmax)``: ``uint8 ((n + 1) // 2,)`` and ``float32 (ceil(n / blocksize),)``.
  """
  if not supports_quantize_4bit(x, blocksize=blocksize, quant_type=quant_type):
    raise ValueError(f"quantize_4bit kernel does not support x {x.dtype}{tuple(x.shape)}, "
                     f"blocksize={blocksize!r}, quant_type={quant_type!r}")
  config = config or DEFAULT_CONFIG
  prog = Program.make(x.size, blocksize, config)
  tables = _tables(quant_type, config.encoder)
  n = prog.n
  vec = _rows.vector_width(x.dtype)
  table_specs = [pl.BlockSpec(t.shape, lambda i: (0,)) for t in tables]
  absmax_out = jax.ShapeDtypeStruct((prog.n_blocks,), jnp.float32)
  kw = dict(prog=prog, quant_type=quant_type, config=config, interpret=interpret)
  if config.layout == "rows" and _rows.supported(n, blocksize, vec):
    kernel = functools.partial(_kernel_rows, vec=vec, **kw)
    operands = [x.reshape(n // vec, vec)]
    in_specs = [_rows.spec(prog, prog.elems // vec, vec)]
    out_specs = [_rows.spec(prog, prog.elems // vec, vec // 2)]
    packed_out = jax.ShapeDtypeStruct((n // vec, vec // 2), jnp.uint8)
  else:
    kernel = functools.partial(_kernel_flat, **kw)
    operands, in_specs = [x.reshape(-1)], [prog.spec(prog.elems)]
    out_specs = [prog.spec(prog.elems // 2)]
    packed_out = jax.ShapeDtypeStruct(((n + 1) // 2,), jnp.uint8)
  if initial_outputs is not None:
    initial_outputs = [initial_outputs[0].reshape(packed_out.shape), initial_outputs[1]]
  packed, absmax = _common.launch(
      kernel, prog=prog, operands=operands + tables, in_specs=in_specs + table_specs,
      out_specs=out_specs + [prog.spec(prog.rows)], out_shape=[packed_out, absmax_out],
      config=config, interpret=interpret, name=KERNEL_NAME, initial_outputs=initial_outputs)
  packed = packed.reshape((n + 1) // 2)
  return packed, absmax
