"""Entry points of the 4-bit matmul family (see ``reference.py`` for semantics)."""

from pallas_kernels import _registry
from pallas_kernels.fourbit_matmul import reference

_registry.register("matmul_4bit", "xla", reference.matmul_4bit)
_registry.register("matmul_4bit_grad_input", "xla", reference.matmul_4bit_grad_input)
