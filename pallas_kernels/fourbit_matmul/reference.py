"""Pure-jnp 4-bit matmul: the CPU fallback and the oracle of the kernels.

The weight ``W`` has logical shape ``(N, K)`` (torch layout: ``(out_features, in_features)``)
and is stored as bitsandbytes stores it: flat row-major nibbles, high nibble first, one absmax
per ``blocksize`` consecutive elements, optionally double quantized (absmax as uint8 codes
into ``nested_code`` with one float32 scale per ``nested_blocksize`` codes, plus ``offset``).

``matmul_4bit`` computes ``(x @ dequant(W, x.dtype).T + bias)`` with float32 accumulation and
the result in ``x.dtype``; ``matmul_4bit_grad_input`` computes ``g @ dequant(W, g.dtype)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.blockwise_quant import reference as blockwise

__all__ = ["NestedAbsmax", "dequantize_absmax", "dequantize_weight", "matmul_4bit",
           "matmul_4bit_grad_input"]


class NestedAbsmax(NamedTuple):
  """Double-quantized absmax: ``absmax_f32 = nested_code[q] * nested_absmax[i // bs] + offset``.

  Attributes:
    nested_absmax: ``float32 (ceil(n_blocks / blocksize),)``.
    nested_code: ``float32 (256,)``.
    offset: ``float32 ()``.
    blocksize: codes per nested scale (static; bitsandbytes uses 256).
  """
  nested_absmax: jax.Array
  nested_code: jax.Array
  offset: jax.Array
  blocksize: int


def dequantize_absmax(absmax: jax.Array, nested: NestedAbsmax | None) -> jax.Array:
  """The float32 absmax, flat ``(n_blocks,)``: ``absmax`` itself or its double-quant decode."""
  if nested is None:
    return absmax.reshape(-1).astype(jnp.float32)
  return blockwise.decode_nested_absmax(absmax, nested.nested_absmax, nested.nested_code,
                                        nested.offset, nested_blocksize=nested.blocksize)


def dequantize_weight(packed, absmax, code, *, shape: tuple[int, int], blocksize: int,
                      nested: NestedAbsmax | None = None, dtype=jnp.float32) -> jax.Array:
  """``(N, K)`` weight in ``dtype`` from its packed 4-bit state."""
  n, k = shape
  flat = blockwise.dequantize_4bit(packed, dequantize_absmax(absmax, nested), code,
                                   blocksize=blocksize, n=n * k, dtype=dtype)
  return flat.reshape(n, k)


def matmul_4bit(x: jax.Array, packed: jax.Array, absmax: jax.Array, code: jax.Array,
                bias: jax.Array | None = None, *, shape: tuple[int, int], blocksize: int,
                nested: NestedAbsmax | None = None) -> jax.Array:
  """``x @ dequant(W).T + bias``.

  Args:
    x: ``(..., K)`` float32/float16/bfloat16.
    packed: ``uint8`` packed weight, ``N * K / 2`` bytes (any shape, read flat).
    absmax: ``float32`` per-block absmax, or ``uint8`` codes when ``nested`` is given.
    code: ``float32 (16,)``.
    bias: ``(N,)`` or ``None``.
    shape: ``(N, K)``.
    blocksize: elements per absmax.
    nested: the double quantization of ``absmax``, or ``None``.

  Returns:
    ``(..., N)`` in ``x.dtype``.
  """
  w = dequantize_weight(packed, absmax, code, shape=shape, blocksize=blocksize, nested=nested,
                        dtype=x.dtype)
  y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32).reshape((1,) * (y.ndim - 1) + (-1,))
  return y.astype(x.dtype)


def matmul_4bit_grad_input(g: jax.Array, packed: jax.Array, absmax: jax.Array, code: jax.Array,
                           *, shape: tuple[int, int], blocksize: int,
                           nested: NestedAbsmax | None = None) -> jax.Array:
  """``g @ dequant(W)``: ``(..., N)`` → ``(..., K)`` in ``g.dtype``."""
  w = dequantize_weight(packed, absmax, code, shape=shape, blocksize=blocksize, nested=nested,
                        dtype=g.dtype)
  y = jax.lax.dot_general(g, w, (((g.ndim - 1,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32)
  return y.astype(g.dtype)
