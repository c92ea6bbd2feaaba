"""Fused 8-bit optimizer update as one Pallas (Triton) kernel per family.

A program handles ``tiles_per_program`` tiles of ``elems_per_program // 256`` quantization blocks,
issuing the next tile's loads before it processes the current one (``blockwise_quant._common``).
Per tile it loads the gradient, the parameter (when needed), each state's codes and absmax,
decodes the states (a gather from the 256-entry map, exact), runs the family's math
(``families.py``, the same code as the reference), writes the update or the new parameter, takes
each new state's block absmax (NaN-propagating) and its correctly rounded reciprocal, and writes
the codes of the scaled state from ``exact.encode``: byte for byte bitsandbytes' binary search,
computed with four small-table lookups and a fused multiply-add. Each byte of gradient,
parameter and state is read once and each output byte written once: for AdamW with
``write="param"`` that is 4 + 4 + 2 bytes read and 4 + 2 written per parameter, plus 16 bytes of
absmax per block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.blockwise_quant import _common
from pallas_kernels.optim_update import exact, families

__all__ = ["KernelConfig", "DEFAULT_CONFIG", "update_8bit", "BLOCKSIZE"]

BLOCKSIZE = 256


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static launch parameters.

  Attributes:
    elems_per_program: elements per tile (a power of two, a multiple of 256).
    tiles_per_program: tiles one program processes, the next one's loads in flight while it
      computes the current one.
    num_warps: Triton warps per program.
    num_stages: Triton pipelining stages.
    alias: update parameters (``write="param"``) and state in place (``input_output_aliases``);
      without donation of those buffers by the caller XLA then copies them first.
  """
  elems_per_program: int = 1024
  tiles_per_program: int = 4
  num_warps: int = 4
  num_stages: int = 1
  alias: bool = True

  def __post_init__(self):
    if not _common.is_power_of_two(self.elems_per_program) or self.elems_per_program < BLOCKSIZE:
      raise ValueError(f"elems_per_program must be a power of two >= {BLOCKSIZE}, got "
                       f"{self.elems_per_program!r}")
    for name in ("tiles_per_program", "num_warps", "num_stages"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")

  def launch(self) -> _common.KernelConfig:
    return _common.KernelConfig(elems_per_program=self.elems_per_program,
                                tiles_per_program=self.tiles_per_program,
                                num_warps=self.num_warps, num_stages=self.num_stages)


DEFAULT_CONFIG = KernelConfig()


def _encoder(map_ref, table_refs, interpret: bool):
  """``(lookup, midpoint)`` callbacks of ``exact.encode`` reading kernel refs."""

  def lookup(name, i):
    return table_refs[name][i]

  def midpoint(b, mask):
    if interpret:  # the interpreter's masked gather is the plain one
      lo, hi = map_ref[b - 1], map_ref[b]
    else:  # only the lanes near a midpoint read the map
      lo = pltriton.load(map_ref.at[b - 1], mask=mask, other=0.0)
      hi = pltriton.load(map_ref.at[b], mask=mask, other=0.0)
    return (lo + hi) * jnp.float32(0.5)

  return lookup, midpoint


def _quantize(s, map_ref, table_refs, signed, interpret):
  absmax = _common.row_absmax(s)
  recip = jnp.where(absmax > 0, _common.reciprocal(absmax, interpret), 0.0)
  lookup, midpoint = _encoder(map_ref, table_refs, interpret)
  codes = exact.encode(s * recip[:, None], signed, lookup, midpoint)
  return codes.astype(jnp.uint8), absmax


def _body(*refs, fam, flags, write, has_p, prog, interpret):
  n_states = fam.n_states
  it = iter(refs)
  hp_ref, g_ref = next(it), next(it)
  p_ref = next(it) if has_p else None
  map_refs = [next(it) for _ in range(n_states)]
  table_refs = {signed: {name: next(it) for name in exact.TABLE_NAMES}
                for signed in sorted(set(fam.signed))}
  q_refs = [next(it) for _ in range(n_states)]
  a_refs = [next(it) for _ in range(n_states)]
  out_ref = next(it)
  qo_refs = [next(it) for _ in range(n_states)]
  ao_refs = [next(it) for _ in range(n_states)]

  h = fam.unpack(lambda i: hp_ref[i])
  tile = lambda ref: lambda t: _common.load_tile(ref, prog, t, prog.elems, prog.n)  # noqa: E731
  row = lambda ref: lambda t: _common.load_tile(ref, prog, t, prog.rows, prog.n_blocks)  # noqa
  loads = [tile(g_ref)] + ([tile(p_ref)] if has_p else [])
  loads += [tile(r) for r in q_refs] + [row(r) for r in a_refs]
  shape = (prog.rows, prog.blocksize)

  def process(t, *values):
    g = values[0].astype(jnp.float32).reshape(shape) * h["gscale"]
    p = values[1].astype(jnp.float32).reshape(shape) if has_p else None
    rest = values[1 + has_p:]
    states = tuple(map_refs[k][rest[k].astype(jnp.int32).reshape(shape)]
                   * rest[n_states + k][:, None] for k in range(n_states))
    direction, new = fam.step(g, states, h, flags)
    u = families.epilogue(direction, p, h)
    out = p + u if write == "param" else u
    _common.store_tile(out_ref, out.astype(out_ref.dtype).reshape(prog.elems), prog, t, prog.n)
    for k in range(n_states):
      codes, absmax = _quantize(new[k], map_refs[k], table_refs[fam.signed[k]], fam.signed[k],
                                interpret)
      _common.store_tile(qo_refs[k], codes.reshape(prog.elems), prog, t, prog.n)
      _common.store_tile(ao_refs[k], absmax, prog, t, prog.n_blocks)

  prog.for_each_tile(loads, process)


def out_dtype_for(write: str, g: jax.Array, p: jax.Array | None):
  return p.dtype if write == "param" else g.dtype


def update_8bit(g: jax.Array, p: jax.Array | None, codes: tuple[jax.Array, ...],
                absmax: tuple[jax.Array, ...], maps: tuple[jax.Array, ...], hparams: jax.Array,
                *, family: str, flags: tuple[tuple[str, bool], ...] = (), write: str = "update",
                max_unorm: float = 0.0, interpret: bool = False,
                config: KernelConfig = DEFAULT_CONFIG):
  """The fused kernel; same contract as ``reference.update_8bit`` for flat arrays.

  Args:
    g: gradient ``(n,)``, ``n`` a multiple of 256; ``p`` and each of ``codes`` the same.
    absmax: per state ``float32 (n // 256,)``; ``maps`` per state the sorted dynamic map.

  ``max_unorm`` must be 0 (a whole-tensor norm needs a second pass; ``api.supports`` sends
  such calls to the reference).
  """
  if max_unorm:
    raise NotImplementedError("the fused kernel does not implement max_unorm; use the reference")
  if write not in ("update", "param"):
    raise ValueError(f"write must be 'update' or 'param', got {write!r}")
  if write == "param" and p is None:
    raise ValueError("write='param' needs the parameters (p), got p=None")
  if g.ndim != 1 or g.size % BLOCKSIZE:
    raise ValueError(f"g must be flat with a multiple of {BLOCKSIZE} elements, got {g.shape}")
  fam = families.FAMILIES[family]
  n_states = fam.n_states
  prog = _common.Program.make(g.size, BLOCKSIZE, config.launch())
  has_p = p is not None

  whole = lambda n: pl.BlockSpec((n,), lambda i: (0,))  # noqa: E731
  elems, rows = prog.spec(prog.elems), prog.spec(prog.rows)
  args = [hparams.astype(jnp.float32), g] + ([p] if has_p else [])
  in_specs = [whole(families.HP_SIZE), elems] + ([elems] if has_p else [])
  args += [m.astype(jnp.float32) for m in maps]
  in_specs += [whole(256)] * n_states
  for signed in sorted(set(fam.signed)):
    for name in exact.TABLE_NAMES:
      table = exact.tables(signed)[name]
      args.append(jnp.asarray(table))
      in_specs.append(whole(table.size))
  first_state = len(args)
  args += list(codes) + list(absmax)
  in_specs += [elems] * n_states + [rows] * n_states
  out_dtype = out_dtype_for(write, g, p)
  aliases = {}
  if config.alias:
    aliases = {first_state + k: 1 + k for k in range(2 * n_states)}
    if write == "param" and p.dtype == out_dtype:
      aliases[2] = 0

  out_shape = ([jax.ShapeDtypeStruct(g.shape, out_dtype)]
               + [jax.ShapeDtypeStruct(g.shape, jnp.uint8)] * n_states
               + [jax.ShapeDtypeStruct((prog.n_blocks,), jnp.float32)] * n_states)
  out_specs = [elems] * (1 + n_states) + [rows] * n_states
  body = functools.partial(_body, fam=fam, flags=families.flag_dict(fam, flags), write=write,
                           has_p=has_p, prog=prog, interpret=interpret)
  _common.silence_triton_deprecation()
  outs = pl.pallas_call(
      body, out_shape=out_shape, grid=prog.grid, in_specs=in_specs, out_specs=out_specs,
      interpret=interpret, name=f"optim_{family}_8bit", input_output_aliases=aliases,
      compiler_params=_common.compiler_params(config.launch()),
  )(*args)
  out, rest = outs[0], outs[1:]
  return out, tuple(rest[:n_states]), tuple(rest[n_states:])
