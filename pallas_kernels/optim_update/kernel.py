"""Fused 8-bit optimizer update as one Pallas (Triton) kernel per family.

One program handles ``rows`` quantization blocks of 256 elements: it loads the gradient, the
parameter (when needed), each state's codes and absmax, decodes the states, runs the family's
math (``families.py``, the same code as the reference), writes the update or the new parameter,
takes each new state's block absmax and writes its codes. Each byte of gradient, parameter and
state is read once and each output byte written once: for AdamW with ``write="param"`` that is
4 + 4 + 2 bytes read and 4 + 2 written per parameter, plus 16 bytes of absmax per block.

States are decoded and encoded arithmetically (``codec.py``, no table lookups) or, with
``decode="table"``, decoded by indexing the 256-entry map (a gather per element and state).
Both produce the dynamic maps' codes; the encoder agrees with the reference's binary search
except within float rounding of a midpoint (one code step).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.optim_update import codec, families

__all__ = ["KernelConfig", "update_8bit", "rows_per_program"]


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static launch parameters.

  Attributes:
    max_rows: most quantization blocks per program (a power of two); the kernel takes the
      largest power of two ``<= max_rows`` that divides the number of blocks.
    num_warps: Triton warps per program.
    num_stages: Triton pipelining stages.
    decode: ``"table"`` (gather from the 256-entry map), ``"segments"`` (two lookups into
      32-entry tables, ``codec.decode_segments``) or ``"arith"`` (``codec.decode``).
    encode: ``"segments"`` (five lookups into 32-entry tables, ``codec.encode_segments``) or
      ``"arith"`` (``codec.encode``).
    fast_log: with ``encode="arith"``, the bit-level ``log2`` instead of ``log2``.
    alias: update parameters (``write="param"``) and state in place (``input_output_aliases``);
      without donation of those buffers by the caller XLA then copies them first.
  """
  max_rows: int = 2
  num_warps: int = 2
  num_stages: int = 1
  decode: str = "table"
  encode: str = "segments"
  fast_log: bool = True
  alias: bool = True


DEFAULT_CONFIG = KernelConfig()


def rows_per_program(n_blocks: int, max_rows: int) -> int:
  """Largest power of two ``<= max_rows`` dividing ``n_blocks`` (so no program overhangs)."""
  rows = 1
  while rows * 2 <= max_rows and n_blocks % (rows * 2) == 0:
    rows *= 2
  return rows


def _quantize(s, signed, fast_log, tables):
  absmax = jnp.max(jnp.abs(s), axis=1)
  safe = jnp.where(absmax > 0, absmax, 1.0)
  recip = jnp.where(absmax > 0, 1.0 / safe, 0.0)
  scaled = s * recip[:, None]
  if tables is None:
    codes = codec.encode(scaled, signed, fast_log)
  else:
    codes = codec.encode_segments(scaled, signed, lambda name, i: tables[name][i])
  return codes.astype(jnp.uint8), absmax


def _body(*refs, fam, flags, write, has_p, table, n_states, fast_log, segments, decode):
  it = iter(refs)
  hp_ref, g_ref = next(it), next(it)
  p_ref = next(it) if has_p else None
  map_refs = [next(it) for _ in range(n_states)] if table else [None] * n_states
  seg_refs = {}
  if segments:
    for signed in sorted(set(fam.signed)):
      seg_refs[signed] = {name: next(it) for name in codec.TABLE_NAMES}
  dec_refs = {}
  if decode == "segments":
    for signed in sorted(set(fam.signed)):
      dec_refs[signed] = {name: next(it) for name in codec.DECODE_TABLE_NAMES}
  q_refs = [next(it) for _ in range(n_states)]
  a_refs = [next(it) for _ in range(n_states)]
  out_ref = next(it)
  qo_refs = [next(it) for _ in range(n_states)]
  ao_refs = [next(it) for _ in range(n_states)]

  h = fam.unpack(lambda i: hp_ref[i])
  g = g_ref[...].astype(jnp.float32) * h["gscale"]
  p = p_ref[...].astype(jnp.float32) if has_p else None
  states = []
  for k in range(n_states):
    q = q_refs[k][...].astype(jnp.int32)
    if table:
      values = map_refs[k][q]
    elif decode == "segments":
      refs_k = dec_refs[fam.signed[k]]
      values = codec.decode_segments(q, fam.signed[k], lambda name, i: refs_k[name][i])
    else:
      values = codec.decode(q, fam.signed[k])
    states.append(values * a_refs[k][...][:, None])
  direction, new = fam.step(g, tuple(states), h, flags)
  u = families.epilogue(direction, p, h)
  out_ref[...] = (p + u).astype(out_ref.dtype) if write == "param" else u.astype(out_ref.dtype)
  for k in range(n_states):
    codes, absmax = _quantize(new[k], fam.signed[k], fast_log,
                              seg_refs.get(fam.signed[k]) if segments else None)
    qo_refs[k][...] = codes
    ao_refs[k][...] = absmax


@functools.cache
def _silence_triton_deprecation() -> None:
  warnings.filterwarnings("ignore", message=r"(?s).*Triton.*deprecated",
                          category=DeprecationWarning)


def out_dtype_for(write: str, g: jax.Array, p: jax.Array | None):
  return p.dtype if write == "param" else g.dtype


def update_8bit(g: jax.Array, p: jax.Array | None, codes: tuple[jax.Array, ...],
                absmax: tuple[jax.Array, ...], maps: tuple[jax.Array, ...], hparams: jax.Array,
                *, family: str, flags: tuple[tuple[str, bool], ...] = (), write: str = "update",
                max_unorm: float = 0.0, interpret: bool = False,
                config: KernelConfig = DEFAULT_CONFIG):
  """The fused kernel; same contract as ``reference.update_8bit`` for ``g (n_blocks, 256)``.

  ``max_unorm`` must be 0 (a whole-tensor norm needs a second pass; ``api.supports`` sends
  such calls to the reference).
  """
  if max_unorm:
    raise NotImplementedError("the fused kernel does not implement max_unorm; use the reference")
  if write not in ("update", "param"):
    raise ValueError(f"write must be 'update' or 'param', got {write!r}")
  if config.decode not in ("arith", "table", "segments"):
    raise ValueError(f"decode must be 'arith', 'table' or 'segments', got {config.decode!r}")
  if config.encode not in ("arith", "segments"):
    raise ValueError(f"encode must be 'arith' or 'segments', got {config.encode!r}")
  fam = families.FAMILIES[family]
  n_states = fam.n_states
  n_blocks, bs = g.shape
  rows = rows_per_program(n_blocks, config.max_rows)
  has_p = p is not None
  table = config.decode == "table"
  if write == "param" and not has_p:
    raise ValueError("write='param' needs the parameters (p), got p=None")

  tile = pl.BlockSpec((rows, bs), lambda i: (i, 0))
  row = pl.BlockSpec((rows,), lambda i: (i,))
  whole = lambda n: pl.BlockSpec((n,), lambda i: (0,))  # noqa: E731
  args = [hparams.astype(jnp.float32), g]
  in_specs = [whole(families.HP_SIZE), tile]
  if has_p:
    args.append(p)
    in_specs.append(tile)
  if table:
    args += [m.astype(jnp.float32) for m in maps]
    in_specs += [whole(256)] * n_states
  segments = config.encode == "segments"
  if segments:
    for signed in sorted(set(fam.signed)):
      tables = codec.encode_tables(signed)
      args += [jnp.asarray(tables[name]) for name in codec.TABLE_NAMES]
      in_specs += [whole(codec.N_TABLE)] * len(codec.TABLE_NAMES)
  if config.decode == "segments":
    for signed in sorted(set(fam.signed)):
      tables = codec.decode_tables(signed)
      args += [jnp.asarray(tables[name]) for name in codec.DECODE_TABLE_NAMES]
      in_specs += [whole(codec.N_TABLE)] * len(codec.DECODE_TABLE_NAMES)
  first_state = len(args)
  args += list(codes) + [a.reshape(n_blocks) for a in absmax]
  in_specs += [tile] * n_states + [row] * n_states
  aliases = {}
  if config.alias:
    aliases = {first_state + k: 1 + k for k in range(2 * n_states)}
    if write == "param" and p.dtype == out_dtype_for(write, g, p):
      aliases[2] = 0

  out_dtype = out_dtype_for(write, g, p)
  out_shape = ([jax.ShapeDtypeStruct((n_blocks, bs), out_dtype)]
               + [jax.ShapeDtypeStruct((n_blocks, bs), jnp.uint8)] * n_states
               + [jax.ShapeDtypeStruct((n_blocks,), jnp.float32)] * n_states)
  out_specs = [tile] + [tile] * n_states + [row] * n_states
  body = functools.partial(_body, fam=fam, flags=families.flag_dict(fam, flags), write=write,
                           has_p=has_p, table=table, n_states=n_states,
                           fast_log=config.fast_log, segments=segments,
                           decode=config.decode)
  _silence_triton_deprecation()
  outs = pl.pallas_call(
      body, out_shape=out_shape, grid=(n_blocks // rows,), in_specs=in_specs,
      out_specs=out_specs, interpret=interpret, name=f"optim_{family}_8bit",
      input_output_aliases=aliases,
      compiler_params=pltriton.CompilerParams(num_warps=config.num_warps,
                                              num_stages=config.num_stages),
  )(*args)
  out, rest = outs[0], outs[1:]
  return out, tuple(rest[:n_states]), tuple(rest[n_states:])
