"""Backward-to-input kernel: ``dx = dy @ dequant(W)`` with the packed weight read in place.

Each program computes a ``(block_m, block_k)`` tile of ``dx``; its reduction runs over the
weight's rows (the output features) in steps of ``block_n``: the ``(block_n, block_k / 2)``
packed bytes are decoded in registers, exactly as the forward kernel does, and multiplied on
the tensor cores with the ``(block_m, block_n)`` tile of ``dy``. The dequantized weight never
reaches HBM. With ``w_lhs`` the decoded tile, transposed, is the left operand and the result
tile is transposed on store. Rows past ``n`` are masked to zero in both operands.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.fourbit_matmul import _decode
from pallas_kernels.fourbit_matmul._gemm import grouped_ids
from pallas_kernels.fourbit_matmul._tuning import Config

__all__ = ["grad_input", "KERNEL_NAME"]

KERNEL_NAME = "jaxquant_matmul_4bit_grad_input"


def _kernel(*refs, layout: _decode.Layout, m: int, cfg: Config, nested: bool,
            interpret: bool):
  g_ref, *rest = refs
  w, rest = _decode.split_refs(rest, nested)
  o_ref = rest[-1]
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  pid_m, pid_k = grouped_ids(pl.program_id(0), pl.cdiv(m, bm), layout.k // bk, cfg.group_m)
  m0 = pid_m * bm
  m_rows = m0 + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
  m_mask = m_rows < m if m % bm else None
  ragged_n = layout.n % bn != 0
  dtype = g_ref.dtype
  precision = _decode.dot_precision(dtype)
  decoder = _decode.Decoder.create(w, layout, dtype, interpret)

  def body(step, acc):
    r0 = step * bn
    r_rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)
    r_mask = r_rows < layout.n if ragged_n else None
    mask = None
    if m_mask is not None or r_mask is not None:
      mask = jnp.ones((bm, bn), jnp.bool_)
      if m_mask is not None:
        mask = mask & m_mask[:, None]
      if r_mask is not None:
        mask = mask & r_mask[None, :]
    gt = _decode.masked_load(g_ref.at[pl.ds(m0, bm), pl.ds(r0, bn)], mask)
    wt = decoder.tile(r0, bn, pid_k, r_mask)
    if cfg.w_lhs:
      return acc + jax.lax.dot_general(wt, gt, (((0,), (1,)), ((), ())), precision=precision,
                                        preferred_element_type=jnp.float32)
    return acc + jax.lax.dot_general(gt, wt, (((1,), (0,)), ((), ())), precision=precision,
                                      preferred_element_type=jnp.float32)

  shape = (bk, bm) if cfg.w_lhs else (bm, bk)
  acc = jax.lax.fori_loop(0, pl.cdiv(layout.n, bn), body, jnp.zeros(shape, jnp.float32))
  if cfg.w_lhs:
    acc = acc.T
  dest = o_ref.at[pl.ds(m0, bm), pl.ds(pid_k * bk, bk)]
  if m_mask is None:
    dest[...] = acc.astype(o_ref.dtype)
  else:
    pltriton.store(dest, acc.astype(o_ref.dtype), mask=m_mask[:, None])


def grad_input(g: jax.Array, weights: tuple[jax.Array, ...], *, layout: _decode.Layout,
               config: Config, interpret: bool = False, poison: bool = False) -> jax.Array:
  """``g (m, n) @ W (n, k)`` in ``g.dtype``.

  Args:
    g: ``(m, n)`` float32/float16/bfloat16 output cotangent.
    weights: :func:`_decode.operands` for ``layout``.
    layout: the weight layout; ``layout.block_k == config.block_k``.
    config: a ``"gemm"`` :class:`Config` (``block_n``: weight rows per reduction step).
    interpret: run the kernel in the Pallas interpreter.
    poison: fill the output with NaN first (tests: every element must be written).

  Returns:
    ``(m, k)`` in ``g.dtype``.
  """
  m = g.shape[0]
  kernel = functools.partial(_kernel, layout=layout, m=m, cfg=config, nested=len(weights) == 7,
                             interpret=interpret)
  grid = (pl.cdiv(m, config.block_m) * (layout.k // config.block_k),)
  return _decode.launch(kernel, jax.ShapeDtypeStruct((m, layout.k), g.dtype), grid,
                        (g, *weights), name=KERNEL_NAME, num_warps=config.num_warps,
                        num_stages=config.num_stages, interpret=interpret, poison=poison)
