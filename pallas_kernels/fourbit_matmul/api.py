"""Entry points of the 4-bit matmul family (see ``reference.py`` for semantics).

Implementations of ``"matmul_4bit"`` and ``"matmul_4bit_grad_input"``:

- ``"xla"``: the pure-jnp reference.
- ``"pallas"``: the Triton kernels compiled for a CUDA GPU: :mod:`._gemv` for a few rows of
  ``x``, :mod:`._gemm` for more, :mod:`._dequant` (decode once, then XLA's dot) where the
  tuned table found that faster at large M, :mod:`._grad_input` for the backward pass (or,
  again where the table found it faster, decode-then-dot); the choice and block sizes come
  from :mod:`._tuning`. Where the table found the XLA reference
  faster for a shape, ``supports`` is false there and dispatch takes ``"xla"``.
- ``"interpret"``: the same kernels run by the Pallas interpreter (any backend).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import _registry
from pallas_kernels.fourbit_matmul import _decode, _tuning, reference
from pallas_kernels.fourbit_matmul._dequant import dequantize_then_dot, dequantize_then_dot_grad
from pallas_kernels.fourbit_matmul._gemm import gemm
from pallas_kernels.fourbit_matmul._gemv import gemv
from pallas_kernels.fourbit_matmul._grad_input import grad_input

__all__ = ["matmul_4bit", "matmul_4bit_grad_input", "kernel_supports", "grad_supports"]

_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _weight_ok(packed, absmax, code, shape, blocksize, nested) -> bool:
  n, k = shape
  if n < 1 or k < 1 or blocksize < 32 or blocksize & (blocksize - 1) or k % blocksize:
    return False
  if n * k // 2 >= 2**31 or packed.size * 2 != n * k or packed.dtype != jnp.uint8:
    return False
  if absmax.size != n * k // blocksize or code.size != 16:
    return False
  if nested is None:
    return jnp.issubdtype(absmax.dtype, jnp.floating)
  return (absmax.dtype == jnp.uint8 and nested.nested_code.size == 256
          and int(nested.blocksize) >= 1
          and nested.nested_absmax.size * nested.blocksize >= absmax.size)


def kernel_supports(x, packed, absmax, code, bias=None, *, shape: tuple[int, int],
                    blocksize: int, nested=None) -> bool:
  """Whether the forward kernels compute this case (else the reference must)."""
  if jnp.dtype(x.dtype) not in _FLOATS or x.ndim < 1 or x.size == 0 or x.shape[-1] != shape[1]:
    return False
  if bias is not None and tuple(bias.shape) != (shape[0],):
    return False
  return _weight_ok(packed, absmax, code, shape, blocksize, nested)


def grad_supports(g, packed, absmax, code, *, shape: tuple[int, int], blocksize: int,
                  nested=None) -> bool:
  """Whether the backward kernel computes this case."""
  if jnp.dtype(g.dtype) not in _FLOATS or g.ndim < 1 or g.size == 0 or g.shape[-1] != shape[0]:
    return False
  return _weight_ok(packed, absmax, code, shape, blocksize, nested)


def _layout(shape, blocksize, nested, block_k) -> _decode.Layout:
  return _decode.Layout(shape[0], shape[1], blocksize,
                        None if nested is None else int(nested.blocksize), block_k)


def matmul_4bit(x: jax.Array, packed: jax.Array, absmax: jax.Array, code: jax.Array,
                bias: jax.Array | None = None, *, shape: tuple[int, int], blocksize: int,
                nested: reference.NestedAbsmax | None = None, interpret: bool = False,
                config: _tuning.Config | None = None, poison: bool = False) -> jax.Array:
  """``x @ dequant(W).T + bias`` through the kernels (arguments as in ``reference``).

  Args:
    x: ``(..., K)`` float32/float16/bfloat16.
    packed, absmax, code, bias, shape, blocksize, nested: as :func:`reference.matmul_4bit`.
    interpret: run the kernels in the Pallas interpreter.
    config: force a kernel and block sizes (tests, tuning); default: :mod:`._tuning`.
    poison: fill the kernel's output with NaN first (tests: every element must be written).

  Returns:
    ``(..., N)`` in ``x.dtype``.
  """
  n, k = shape
  x2 = x.reshape(-1, k)
  cfg = config or _tuning.forward_config(x2.shape[0], n, k, blocksize, x.dtype)
  if cfg.kernel == "xla":
    return reference.matmul_4bit(x, packed, absmax, code, bias, shape=shape,
                                 blocksize=blocksize, nested=nested)
  layout = _layout(shape, blocksize, nested, cfg.block_k)
  weights = _decode.operands(packed, absmax, code, nested, layout, x.dtype)
  kernel = {"gemv": gemv, "gemm": gemm, "dq_dot": dequantize_then_dot}[cfg.kernel]
  y = kernel(x2, weights, bias, layout=layout, config=cfg, interpret=interpret, poison=poison)
  return y.reshape(*x.shape[:-1], n)


def matmul_4bit_grad_input(g: jax.Array, packed: jax.Array, absmax: jax.Array,
                           code: jax.Array, *, shape: tuple[int, int], blocksize: int,
                           nested: reference.NestedAbsmax | None = None,
                           interpret: bool = False, config: _tuning.Config | None = None,
                           poison: bool = False) -> jax.Array:
  """``g @ dequant(W)``: ``(..., N)`` → ``(..., K)`` in ``g.dtype``, through the kernel."""
  n, k = shape
  g2 = g.reshape(-1, n)
  cfg = config or _tuning.grad_config(g2.shape[0], n, k, blocksize, g.dtype)
  if cfg.kernel == "xla":
    return reference.matmul_4bit_grad_input(g, packed, absmax, code, shape=shape,
                                            blocksize=blocksize, nested=nested)
  layout = _layout(shape, blocksize, nested, cfg.block_k)
  weights = _decode.operands(packed, absmax, code, nested, layout, g.dtype)
  kernel = dequantize_then_dot_grad if cfg.kernel == "dq_dot" else grad_input
  dx = kernel(g2, weights, layout=layout, config=cfg, interpret=interpret, poison=poison)
  return dx.reshape(*g.shape[:-1], k)


def _tuned_to_kernel(config_fn, supports, *args: Any, **kwargs: Any) -> bool:
  if not supports(*args, **kwargs):
    return False
  x = args[0]
  n, k = kwargs["shape"]
  rows = x.size // x.shape[-1]
  return config_fn(rows, n, k, kwargs["blocksize"], x.dtype).kernel != "xla"


_registry.register("matmul_4bit", "xla", reference.matmul_4bit)
_registry.register("matmul_4bit_grad_input", "xla", reference.matmul_4bit_grad_input)
_registry.register("matmul_4bit", "pallas", matmul_4bit,
                   functools.partial(_tuned_to_kernel, _tuning.forward_config, kernel_supports))
_registry.register("matmul_4bit_grad_input", "pallas", matmul_4bit_grad_input,
                   functools.partial(_tuned_to_kernel, _tuning.grad_config, grad_supports))
_registry.register("matmul_4bit", "interpret",
                   functools.partial(matmul_4bit, interpret=True), kernel_supports)
_registry.register("matmul_4bit_grad_input", "interpret",
                   functools.partial(matmul_4bit_grad_input, interpret=True), grad_supports)
