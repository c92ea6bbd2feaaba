"""Entry points of the blockwise quantization family (see ``reference.py`` for semantics).

Each op has three implementations with one signature: ``"xla"`` (the jnp reference),
``"pallas"`` (the Pallas kernel compiled for a CUDA GPU through the Triton lowering) and
``"interpret"`` (the same kernel run by the Pallas interpreter on any backend). The kernels'
``supports`` predicates say which arguments they take; callers fall back to ``"xla"`` otherwise.
"""

import functools

from pallas_kernels import _registry
from pallas_kernels.blockwise_quant import _blockwise_8bit_kernel as _k8
from pallas_kernels.blockwise_quant import _dequantize_4bit_kernel as _dq4
from pallas_kernels.blockwise_quant import _quantize_4bit_kernel as _q4
from pallas_kernels.blockwise_quant import reference

KERNEL_NAMES = {
    "quantize_4bit": _q4.KERNEL_NAME,
    "dequantize_4bit": _dq4.KERNEL_NAME,
    "quantize_8bit": _k8.QUANTIZE_KERNEL_NAME,
    "dequantize_8bit": _k8.DEQUANTIZE_KERNEL_NAME,
}

_registry.register("quantize_4bit", "xla", reference.quantize_4bit)
_registry.register("dequantize_4bit", "xla", reference.dequantize_4bit)
_registry.register("quantize_8bit", "xla", reference.quantize_8bit)
_registry.register("dequantize_8bit", "xla", reference.dequantize_8bit)

for _impl, _interpret in (("pallas", False), ("interpret", True)):
  _registry.register("quantize_4bit", _impl,
                     functools.partial(_q4.quantize_4bit, interpret=_interpret),
                     _q4.supports_quantize_4bit)
  _registry.register("dequantize_4bit", _impl,
                     functools.partial(_dq4.dequantize_4bit, interpret=_interpret),
                     _dq4.supports_dequantize_4bit)
  _registry.register("quantize_8bit", _impl,
                     functools.partial(_k8.quantize_8bit, interpret=_interpret),
                     _k8.supports_quantize_8bit)
  _registry.register("dequantize_8bit", _impl,
                     functools.partial(_k8.dequantize_8bit, interpret=_interpret),
                     _k8.supports_dequantize_8bit)
