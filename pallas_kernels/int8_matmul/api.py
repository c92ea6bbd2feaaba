"""Entry points of the int8 family (see ``reference.py`` for semantics)."""

from pallas_kernels import _registry
from pallas_kernels.int8_matmul import reference

_registry.register("int8_vectorwise_quant", "xla", reference.int8_vectorwise_quant)
_registry.register("int8_linear", "xla", reference.int8_linear)
_registry.register("int8_linear_grad_input", "xla", reference.int8_linear_grad_input)
