"""Large-M fallback: decode the weight to ``(N, K)`` in one pass, then a library dot.

At large M the product is bound by the tensor cores, and a dot fed from a decoded-in-kernel
tile pays the decode once per row block of ``x``: with Triton's pipelining that costs more
than the product itself (see the tuning results). Where the tuning table finds it faster,
the packed weight is instead decoded once, with the same register decode as the fused kernels
(:class:`._decode.Decoder`), into a transient ``(N, K)`` array in the activation dtype that
XLA's dot (cuBLAS) consumes. It costs one extra write and read of the dense weight (``4 N K``
bytes in bf16). This writes the dequantized weight to HBM: only the tuning table chooses it,
per shape, and only where it is the faster path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.fourbit_matmul import _decode
from pallas_kernels.fourbit_matmul._tuning import Config

__all__ = ["dequantize", "dequantize_then_dot", "dequantize_then_dot_grad", "KERNEL_NAME"]

KERNEL_NAME = "jaxquant_matmul_4bit_dequant"


def _kernel(*refs, layout: _decode.Layout, block_n: int, nested: bool, interpret: bool):
  w, rest = _decode.split_refs(refs, nested)
  o_ref = rest[-1]
  n0 = pl.program_id(0) * block_n
  rows = n0 + jax.lax.broadcasted_iota(jnp.int32, (block_n,), 0)
  row_mask = rows < layout.n if layout.n % block_n else None
  decoder = _decode.Decoder.create(w, layout, o_ref.dtype, interpret)
  step = pl.program_id(1)
  tile = decoder.tile(n0, block_n, step, row_mask)
  dest = o_ref.at[pl.ds(n0, block_n), pl.ds(step * layout.block_k, layout.block_k)]
  if row_mask is None:
    dest[...] = tile
  else:
    pltriton.store(dest, tile, mask=row_mask[:, None])


def dequantize(weights: tuple[jax.Array, ...], dtype, *, layout: _decode.Layout,
               config: Config, interpret: bool = False, poison: bool = False) -> jax.Array:
  """The ``(n, k)`` weight in ``dtype``, decoded in ``(block_n, block_k)`` tiles.

  Args:
    weights: :func:`_decode.operands` for ``layout``.
    dtype: float32, float16 or bfloat16.
    layout: the weight layout; ``layout.block_k == config.block_k``.
    config: a ``"dq_dot"`` :class:`Config` (``block_n``, ``block_k``: the decode tile).
    interpret: run the kernel in the Pallas interpreter.
    poison: fill the output with NaN first (tests: every element must be written).
  """
  kernel = functools.partial(_kernel, layout=layout, block_n=config.block_n,
                             nested=len(weights) == 7, interpret=interpret)
  grid = (pl.cdiv(layout.n, config.block_n), layout.k // config.block_k)
  return _decode.launch(kernel, jax.ShapeDtypeStruct((layout.n, layout.k), dtype), grid,
                        weights, name=KERNEL_NAME, num_warps=config.num_warps,
                        num_stages=config.num_stages, interpret=interpret, poison=poison)


def dequantize_then_dot(x: jax.Array, weights: tuple[jax.Array, ...], bias: jax.Array | None, *,
                        layout: _decode.Layout, config: Config, interpret: bool = False,
                        poison: bool = False) -> jax.Array:
  """``x (m, k) @ W.T (+ bias)`` in ``x.dtype`` through a decoded ``(n, k)`` weight
  (arguments as :func:`dequantize`, ``bias``: ``(n,)`` or ``None``)."""
  w = dequantize(weights, x.dtype, layout=layout, config=config, interpret=interpret,
                 poison=poison)
  if bias is None:
    return _dot(x, w, ((1,), (1,)), x.dtype)
  # The bias joins the float32 product before its one rounding to x.dtype, as in the reference
  # and the fused kernels (added after a 16-bit result, it would leave up to one 16-bit ulp of
  # the product where the bias cancels it). This keeps the pass over the float32 (m, n).
  y = _dot(x, w, ((1,), (1,)), jnp.float32) + bias.astype(jnp.float32)[None, :]
  return y.astype(x.dtype)


def dequantize_then_dot_grad(g: jax.Array, weights: tuple[jax.Array, ...], *,
                             layout: _decode.Layout, config: Config, interpret: bool = False,
                             poison: bool = False) -> jax.Array:
  """``g (m, n) @ W (n, k)`` in ``g.dtype`` through a decoded weight (as :func:`dequantize`)."""
  w = dequantize(weights, g.dtype, layout=layout, config=config, interpret=interpret,
                 poison=poison)
  return _dot(g, w, ((1,), (0,)), g.dtype)


def _dot(a: jax.Array, w: jax.Array, contracting: tuple[tuple[int], tuple[int]],
         out_dtype) -> jax.Array:
  """``a`` times the decoded ``w`` with float32 accumulation, the result in ``out_dtype``
  straight from the dot (``a.dtype``: as ``jnp.matmul`` of two 16-bit arrays gives it; a
  float32 result converted afterwards costs a pass over ``(m, n)`` float32 where XLA does not
  fuse the conversion into the library GEMM: 62 µs per 8192² layer at M = 4096 on an H100,
  ``fourbit_profile.py``)."""
  return jax.lax.dot_general(a, w, (contracting, ((), ())),
                             precision=_decode.dot_precision(a.dtype),
                             preferred_element_type=out_dtype)
