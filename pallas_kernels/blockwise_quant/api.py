"""Entry points of the blockwise quantization family (see ``reference.py`` for semantics)."""

from pallas_kernels import _registry
from pallas_kernels.blockwise_quant import reference

_registry.register("quantize_4bit", "xla", reference.quantize_4bit)
_registry.register("dequantize_4bit", "xla", reference.dequantize_4bit)
_registry.register("quantize_8bit", "xla", reference.quantize_8bit)
_registry.register("dequantize_8bit", "xla", reference.dequantize_8bit)
