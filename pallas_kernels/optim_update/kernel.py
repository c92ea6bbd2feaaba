"""Fused 8-bit optimizer update as one Pallas (Triton) kernel per family.

Arrays come in the blocked layout ``(n_blocks, 256)``. A program handles ``tiles_per_program``
tiles of ``rows`` blocks (2-D tiles: a row is a block, so block reductions need no reshape),
issuing the next tile's loads before it processes the current one. Per tile it loads the
gradient, the parameter (when needed), each state's codes and absmax, decodes the states (a
gather from the 256-entry map, exact), runs the family's math (``families.py``, the same code as
the reference), writes the update or the new parameter, takes each new state's block absmax
(NaN-propagating) and its correctly rounded reciprocal, and writes the codes of the scaled
state from ``exact.encode_fixed`` (or ``exact.encode``, ``KernelConfig.encoder``): byte for
byte bitsandbytes' binary search, from small-table lookups and a multiply-add (plus a read of
the map near midpoints). Each byte of gradient, parameter and state is read once and each
output byte written once: for AdamW with
``write="param"`` that is 4 + 4 + 2 bytes read and 4 + 2 written per parameter, plus 16 bytes of
absmax per block.

On an H100 the default kernel runs at the speed of memory: 0.395 ms per 8192^2 AdamW leaf
against 0.397 ms for a kernel with the same loads and stores and no arithmetic
(``benchmarks/optim_step.py``, same run). Compiled for sm_90, the AdamW program runs 129
instructions per element with the fixed-point encoder (29 per encoded value) in tiles with no
value near a midpoint (about 94% of them); ``encoder="masked"`` (``exact.encode``) runs 187
(58 per value) and takes 0.474 ms, issue-bound.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.blockwise_quant import _common
from pallas_kernels.optim_update import exact, families

__all__ = ["KernelConfig", "DEFAULT_CONFIG", "update_8bit", "geometry", "BLOCKSIZE"]

BLOCKSIZE = 256
# KernelConfig.encoder -> the tables its encoder reads (exact.encode / exact.encode_fixed)
ENCODERS = {"masked": exact.tables, "fixed": exact.fixed_tables}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static launch parameters.

  Attributes:
    rows: quantization blocks per tile (a power of two).
    tiles_per_program: tiles one program processes (a power of two), the next one's loads in
      flight while it computes the current one. A program covers ``rows * tiles_per_program``
      blocks, or the largest power of two below that which divides the block count.
    num_warps: Triton warps per program.
    num_stages: Triton pipelining stages.
    alias: update parameters (``write="param"``) and state in place (``input_output_aliases``);
      without donation of those buffers by the caller XLA then copies them first.
    encoder: ``"masked"`` (``exact.encode``: every tile reads the map near midpoints through
      masked loads) or ``"fixed"`` (``exact.encode_fixed``: a fixed-point candidate in about
      half the instructions, and a branch that reads the map only in tiles holding a value
      within 2**-13 of a midpoint). Both write the reference's bytes.
  """
  rows: int = 1
  tiles_per_program: int = 1
  num_warps: int = 1
  num_stages: int = 1
  alias: bool = True
  encoder: str = "fixed"

  def __post_init__(self):
    for name in ("rows", "tiles_per_program"):
      if not _common.is_power_of_two(getattr(self, name)):
        raise ValueError(f"{name} must be a power of two, got {getattr(self, name)!r}")
    for name in ("num_warps", "num_stages"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
    if self.encoder not in ENCODERS:
      raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {self.encoder!r}")


def geometry(n_blocks: int, config: KernelConfig) -> tuple[int, int]:
  """``(rows, tiles)`` of a launch over ``n_blocks``: the blocks per program are the largest
  power of two ``<= rows * tiles_per_program`` dividing ``n_blocks`` (no program overhangs)."""
  per_program = 1
  while per_program * 2 <= config.rows * config.tiles_per_program and \
      n_blocks % (per_program * 2) == 0:
    per_program *= 2
  rows = min(config.rows, per_program)
  return rows, per_program // rows


# The fastest of benchmarks/optim_step.py's sweep on an H100 (results/optim_step_sweep.json):
# one block per program on one warp with the fixed-point encoder, 0.395 ms per 8192^2 AdamW
# leaf, the time of a kernel with the same loads and stores and no arithmetic (0.397 ms); the
# "masked" encoder in the same run: 0.474 ms.
DEFAULT_CONFIG = KernelConfig()


@functools.cache
def packed_tables(encoder: str, signed: bool) -> tuple[np.ndarray, dict[str, int]]:
  """The encoder's tables end to end in one float32 array (zero-padded to a power of two) and
  each table's offset in it: one base address for all lookups, constant offsets folded into
  the loads."""
  tables = ENCODERS[encoder](signed)
  offsets, parts, size = {}, [], 0
  for name in exact.TABLE_NAMES:
    offsets[name] = size
    parts.append(tables[name])
    size += tables[name].size
  packed = np.zeros(1 << (size - 1).bit_length(), np.float32)
  packed[:size] = np.concatenate(parts)
  return packed, offsets


def _encoder(map_ref, table_ref, offsets: dict[str, int], interpret: bool):
  """``(lookup, midpoint)`` callbacks of the ``exact`` encoders reading kernel refs."""

  def lookup(name, i):
    return table_ref[i + offsets[name]]

  def midpoint(b, mask):
    if interpret:  # the interpreter's masked gather is the plain one
      lo, hi = map_ref[b - 1], map_ref[b]
    else:  # only the lanes near a midpoint read the map
      lo = pltriton.load(map_ref.at[b - 1], mask=mask, other=0.0)
      hi = pltriton.load(map_ref.at[b], mask=mask, other=0.0)
    return (lo + hi) * jnp.float32(0.5)

  return lookup, midpoint


def _tie_break_if_any(near, decide, candidate):
  """``decide()`` where some lane of the tile is ``near``, else ``candidate`` (a branch)."""
  flag = near.astype(jnp.int32)
  while flag.ndim:
    flag = jnp.max(flag, axis=-1)
  return jax.lax.cond(flag > 0, decide, lambda: candidate)


def _quantize(s, map_ref, table_ref, signed, interpret, encoder):
  absmax = _common.row_absmax(s)
  recip = jnp.where(absmax > 0, _common.reciprocal(absmax, interpret), 0.0)
  lookup, midpoint = _encoder(map_ref, table_ref, packed_tables(encoder, signed)[1], interpret)
  x = s * recip[:, None]
  if encoder == "fixed":
    codes = exact.encode_fixed(x, signed, lookup, midpoint, _tie_break_if_any)
  else:
    codes = exact.encode(x, signed, lookup, midpoint)
  return codes.astype(jnp.uint8), absmax


def _for_each_tile(rows: int, tiles: int, loads, process) -> None:
  """``process(*[load(start) for load in loads])`` for each tile of this program (``start``:
  its first row in the program's block); the next tile's loads are issued first."""
  if tiles == 1:
    process(*[load(0) for load in loads])
    return

  def body(t, current):
    upcoming = tuple(load(jnp.minimum(t + 1, tiles - 1) * rows) for load in loads)
    process(*current, start=t * rows)
    return upcoming

  jax.lax.fori_loop(0, tiles, body, tuple(load(0) for load in loads))


def _body(*refs, fam, flags, write, has_p, rows, tiles, interpret, encoder):
  n_states = fam.n_states
  it = iter(refs)
  hp_ref, g_ref = next(it), next(it)
  p_ref = next(it) if has_p else None
  map_refs = [next(it) for _ in range(n_states)]
  table_refs = {signed: next(it) for signed in sorted(set(fam.signed))}
  q_refs = [next(it) for _ in range(n_states)]
  a_refs = [next(it) for _ in range(n_states)]
  out_ref = next(it)
  qo_refs = [next(it) for _ in range(n_states)]
  ao_refs = [next(it) for _ in range(n_states)]

  h = fam.unpack(lambda i: hp_ref[i])
  view = lambda ref, start: ref if tiles == 1 else ref.at[pl.ds(start, rows)]  # noqa: E731
  loads = [lambda s, r=r: view(r, s)[...] for r in
           [g_ref] + ([p_ref] if has_p else []) + q_refs + a_refs]

  def process(*values, start=0):
    g = values[0].astype(jnp.float32) * h["gscale"]
    p = values[1].astype(jnp.float32) if has_p else None
    rest = values[1 + has_p:]
    states = tuple(map_refs[k][rest[k].astype(jnp.int32)] * rest[n_states + k][:, None]
                   for k in range(n_states))
    direction, new = fam.step(g, states, h, flags)
    u = families.epilogue(direction, p, h)
    out = p + u if write == "param" else u
    view(out_ref, start)[...] = out.astype(out_ref.dtype)
    for k in range(n_states):
      codes, absmax = _quantize(new[k], map_refs[k], table_refs[fam.signed[k]], fam.signed[k],
                                interpret, encoder)
      view(qo_refs[k], start)[...] = codes
      view(ao_refs[k], start)[...] = absmax

  _for_each_tile(rows, tiles, loads, process)


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
  if write == "param" and p is None:
    raise ValueError("write='param' needs the parameters (p), got p=None")
  if g.ndim != 2 or g.shape[1] != BLOCKSIZE:
    raise ValueError(f"g must have shape (n_blocks, {BLOCKSIZE}), got {g.shape}")
  fam = families.FAMILIES[family]
  n_states = fam.n_states
  n_blocks = g.shape[0]
  rows, tiles = geometry(n_blocks, config)
  has_p = p is not None

  whole = lambda n: pl.BlockSpec((n,), lambda i: (0,))  # noqa: E731
  tile = pl.BlockSpec((rows * tiles, BLOCKSIZE), lambda i: (i, 0))
  row = pl.BlockSpec((rows * tiles,), lambda i: (i,))
  args = [hparams.astype(jnp.float32), g] + ([p] if has_p else [])
  in_specs = [whole(families.HP_SIZE), tile] + ([tile] if has_p else [])
  args += [m.astype(jnp.float32) for m in maps]
  in_specs += [whole(256)] * n_states
  for signed in sorted(set(fam.signed)):
    table = packed_tables(config.encoder, signed)[0]
    args.append(jnp.asarray(table))
    in_specs.append(whole(table.size))
  first_state = len(args)
  args += list(codes) + [a.reshape(n_blocks) for a in absmax]
  in_specs += [tile] * n_states + [row] * n_states
  out_dtype = out_dtype_for(write, g, p)
  aliases = {}
  if config.alias:
    aliases = {first_state + k: 1 + k for k in range(2 * n_states)}
    if write == "param" and p.dtype == out_dtype:
      aliases[2] = 0

  out_shape = ([jax.ShapeDtypeStruct(g.shape, out_dtype)]
               + [jax.ShapeDtypeStruct(g.shape, jnp.uint8)] * n_states
               + [jax.ShapeDtypeStruct((n_blocks,), jnp.float32)] * n_states)
  out_specs = [tile] * (1 + n_states) + [row] * n_states
  body = functools.partial(_body, fam=fam, flags=families.flag_dict(fam, flags), write=write,
                           has_p=has_p, rows=rows, tiles=tiles, interpret=interpret,
                           encoder=config.encoder)
  _common.silence_triton_deprecation()
  outs = pl.pallas_call(
      body, out_shape=out_shape, grid=(n_blocks // (rows * tiles),), in_specs=in_specs,
      out_specs=out_specs, interpret=interpret, name=f"optim_{family}_8bit",
      input_output_aliases=aliases,
      compiler_params=pltriton.CompilerParams(num_warps=config.num_warps,
                                              num_stages=config.num_stages),
  )(*args)
  out, rest = outs[0], outs[1:]
  return out, tuple(rest[:n_states]), tuple(rest[n_states:])
