"""Entry points of the int8 family (see ``reference.py`` for semantics).

Ops and their implementations (``"xla"``: the jnp reference; ``"pallas"``: the Triton kernels
compiled for the GPU; ``"interpret"``: the same kernels in the Pallas interpreter):

* ``int8_vectorwise_quant(x, *, threshold)``: row-wise quantization + outlier columns;
* ``int8_linear(x, w_q, w_stats, bias, *, threshold)``: LLM.int8() (w8a8 when threshold 0);
* ``int8_scaled_matmul(a_q, a_stats, w_q, w_stats, bias, *, out_dtype)``: w8a8 GEMM of
  already-quantized rows with the dequantization fused;
* ``int8_weight_only_linear(x, w_q, w_stats, bias)``: int8 weight, 16-bit activations;
* ``int8_linear_grad_input(g, w_q, w_stats)``: ``g @ dequant(W)``.

Each kernel registers a ``supports`` predicate; the dispatcher uses the reference whenever it
is false, so an unsupported shape or dtype is never a wrong answer.
"""

from __future__ import annotations

import functools

from pallas_kernels import _registry
from pallas_kernels.int8_matmul import gemm, linear, quantize, reference, weight_only


def _flat(fn):
  """Run a 2-D kernel on ``(..., K)`` leading dimensions."""

  @functools.wraps(fn)
  def run(x, *args, **kwargs):
    y = fn(x.reshape(-1, x.shape[-1]), *args, **kwargs)
    return y.reshape(*x.shape[:-1], y.shape[-1])

  return run


def _scaled_matmul(a_q, a_stats, w_q, w_stats, bias=None, *, out_dtype, interpret):
  k = a_q.shape[-1]
  y = gemm.int8_gemm(a_q.reshape(-1, k), a_stats.reshape(-1), w_q, w_stats, bias,
                     out_dtype=out_dtype, interpret=interpret)
  return y.reshape(*a_q.shape[:-1], w_q.shape[0])


def _scaled_matmul_supports(a_q, a_stats, w_q, w_stats, bias=None, *, out_dtype) -> bool:
  if a_q.ndim < 1 or tuple(a_stats.shape) != tuple(a_q.shape[:-1]):
    return False
  a2 = a_q.reshape(-1, a_q.shape[-1])
  return gemm.supports(a2, a_stats, w_q, w_stats, bias, out_dtype=out_dtype)


def _flat_supports(pred):
  def check(x, *args, **kwargs):
    return x.ndim >= 1 and pred(x.reshape(-1, x.shape[-1]), *args, **kwargs)

  return check


_KERNELS = {
    "int8_vectorwise_quant": (linear.int8_vectorwise_quant, quantize.supports),
    "int8_linear": (linear.int8_linear, linear.supports),
    "int8_scaled_matmul": (_scaled_matmul, _scaled_matmul_supports),
    "int8_weight_only_linear": (_flat(weight_only.weight_only_matmul),
                                _flat_supports(weight_only.supports)),
    "int8_linear_grad_input": (_flat(weight_only.grad_input_matmul),
                               _flat_supports(weight_only.supports_grad)),
}

_registry.register("int8_vectorwise_quant", "xla", reference.int8_vectorwise_quant)
_registry.register("int8_linear", "xla", reference.int8_linear)
_registry.register("int8_scaled_matmul", "xla", reference.int8_scaled_matmul)
_registry.register("int8_weight_only_linear", "xla", reference.int8_weight_only_linear)
_registry.register("int8_linear_grad_input", "xla", reference.int8_linear_grad_input)
for _op, (_fn, _supports) in _KERNELS.items():
  _registry.register(_op, "pallas", functools.partial(_fn, interpret=False), _supports)
  _registry.register(_op, "interpret", functools.partial(_fn, interpret=True), _supports)
