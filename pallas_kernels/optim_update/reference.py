"""Pure-jnp optimizer update with blockwise 8-bit state: the fallback and the oracle of the kernel.

Semantics (bitsandbytes' ``kOptimizerStatic8bit{1,2}StateBlockwise``, with Optax's formulas, see
``families.py``), per block of ``blocksize`` consecutive elements:

1. dequantize each state: ``s = code[q] * absmax[block]`` (float32);
2. ``g = float32(grad) * gscale`` (percentile clipping folds its factor in here);
3. update the states and compute the direction ``d`` in float32;
4. re-quantize each new state with the block's *new* absmax ``max |s|``: ``s * (1 / absmax)``
   rounded to the nearest code of its map (bitsandbytes' binary search, ``encode_8bit``); an
   all-zero block keeps absmax 0 and the code of 0.0; for signed maps a negative value never
   takes the code of +0 (bitsandbytes' sign guard: it moves one code down);
5. ``u = -lr * (d + wd * p)``; the output is ``u`` (``write="update"``) or ``p + u``
   (``write="param"``).

Optionally (``max_unorm > 0``, LAMB/LARS-style, bitsandbytes' 32-bit semantics) ``d`` is scaled
by ``max_unorm * |p| / |d|`` when ``|d| > max_unorm * |p|`` (norms over the whole tensor).

Arrays come in the blocked layout ``(..., blocksize)`` with absmax ``(...)``; the caller owns the
reshape. Elements past the end of a tensor (padding of its last block) must be zero in ``g``,
``p`` and the states; they then stay zero and do not change any norm or absmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.blockwise_quant.reference import encode_8bit
from pallas_kernels.optim_update import families

__all__ = ["update_8bit", "update_fp32", "quantize_state", "dequantize_state"]

Flags = tuple[tuple[str, bool], ...]


def dequantize_state(codes: jax.Array, absmax: jax.Array, code: jax.Array) -> jax.Array:
  """``code[q] * absmax[..., None]``: float32 of ``codes.shape``."""
  return code.astype(jnp.float32)[codes.astype(jnp.int32)] * absmax[..., None]


def quantize_state(s: jax.Array, code: jax.Array, signed: bool) -> tuple[jax.Array, jax.Array]:
  """Blockwise 8-bit codes of ``s (..., bs)`` float32 with a fresh absmax ``(...)``.

  Returns:
    ``(codes uint8 (..., bs), absmax float32 (...))``.
  """
  absmax = jnp.max(jnp.abs(s), axis=-1)
  recip = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
  scaled = s * recip[..., None]
  idx = encode_8bit(scaled, code).astype(jnp.int32)
  if signed:
    wrong_sign = (scaled < 0) & (code.astype(jnp.float32)[idx] >= 0)
    idx = jnp.where(wrong_sign, idx - 1, idx)
  return idx.astype(jnp.uint8), absmax


def _hparams(fam: families.Family, hparams: jax.Array) -> dict[str, jax.Array]:
  hparams = hparams.astype(jnp.float32)
  return fam.unpack(lambda i: hparams[i])


def _finish(fam, direction, g, p, h, write, max_unorm):
  pf = None if p is None else p.astype(jnp.float32)
  if max_unorm > 0:
    if pf is None:
      raise ValueError("max_unorm > 0 needs the parameters (p), got p=None")
    unorm = jnp.sqrt(jnp.sum(direction * direction))
    limit = jnp.float32(max_unorm) * jnp.sqrt(jnp.sum(pf * pf))
    scale = jnp.where(unorm > limit, limit / jnp.where(unorm > 0, unorm, 1.0), 1.0)
    direction = direction * scale
  u = families.epilogue(direction, pf, h)
  if write == "param":
    if p is None:
      raise ValueError("write='param' needs the parameters (p), got p=None")
    return (pf + u).astype(p.dtype)
  return u.astype(g.dtype)


def _check_write(write: str) -> None:
  if write not in ("update", "param"):
    raise ValueError(f"write must be 'update' or 'param', got {write!r}")


def update_8bit(g: jax.Array, p: jax.Array | None, codes: tuple[jax.Array, ...],
                absmax: tuple[jax.Array, ...], maps: tuple[jax.Array, ...], hparams: jax.Array,
                *, family: str, flags: Flags = (), write: str = "update",
                max_unorm: float = 0.0) -> tuple[jax.Array, tuple[jax.Array, ...],
                                                 tuple[jax.Array, ...]]:
  """One optimizer step on 8-bit blockwise state.

  Args:
    g: gradient ``(..., bs)``, float32/bfloat16/float16.
    p: parameter of the same shape, or ``None`` when the update does not need it
      (no weight decay, ``write="update"``, no ``max_unorm``).
    codes: per state, uint8 ``(..., bs)``.
    absmax: per state, float32 ``(...)``.
    maps: per state, float32 ``(256,)`` sorted codebook (signed map for signed states).
    hparams: float32 ``(HP_SIZE,)`` laid out as ``families.FAMILIES[family]`` says.
    family: a key of ``families.FAMILIES``.
    flags: static ``(name, bool)`` pairs (``nesterov``, ``eps_in_sqrt``).
    write: ``"update"`` or ``"param"``.
    max_unorm: clip the direction's norm to ``max_unorm * |p|`` (0 disables).

  Returns:
    ``(out, new_codes, new_absmax)``: ``out`` is the update (dtype of ``g``) or the new
    parameter (dtype of ``p``), with the new codes and absmax per state.
  """
  _check_write(write)
  fam = families.FAMILIES[family]
  h = _hparams(fam, hparams)
  states = tuple(dequantize_state(q, a, c) for q, a, c in zip(codes, absmax, maps))
  gf = g.astype(jnp.float32) * h["gscale"]
  direction, new = fam.step(gf, states, h, families.flag_dict(fam, flags))
  out = _finish(fam, direction, g, p, h, write, max_unorm)
  quantized = [quantize_state(s, c, signed) for s, c, signed in zip(new, maps, fam.signed)]
  return out, tuple(q for q, _ in quantized), tuple(a for _, a in quantized)


def update_fp32(g: jax.Array, p: jax.Array | None, states: tuple[jax.Array, ...],
                hparams: jax.Array, *, family: str, flags: Flags = (), write: str = "update",
                max_unorm: float = 0.0) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """The same step with float32 state (leaves kept in 32 bits), any shape.

  Returns:
    ``(out, new_states)`` with the new states float32 of ``g.shape``.
  """
  _check_write(write)
  fam = families.FAMILIES[family]
  h = _hparams(fam, hparams)
  gf = g.astype(jnp.float32) * h["gscale"]
  states = tuple(s.astype(jnp.float32) for s in states)
  direction, new = fam.step(gf, states, h, families.flag_dict(fam, flags))
  return _finish(fam, direction, g, p, h, write, max_unorm), tuple(new)
