"""jaxquant: k-bit quantization for JAX — bitsandbytes' formats and algorithms, native to JAX.

Public API: the array ops of :mod:`jaxquant.functional` (re-exported here),
:class:`QuantState`, :mod:`jaxquant.codebooks`, and the subpackages :mod:`jaxquant.nn` (Flax
layers, quantize_model, LoRA), :mod:`jaxquant.optim` (8-bit Optax optimizers),
:mod:`jaxquant.checkpoint` (Orbax), :mod:`jaxquant.interop` (bitsandbytes checkpoints),
:mod:`jaxquant.sharding` and :mod:`jaxquant.models`, imported on first use
(``jaxquant.nn`` or ``import jaxquant.nn``).
"""

from jaxquant import codebooks as codebooks
from jaxquant import functional as functional
from jaxquant.functional import dequantize_4bit as dequantize_4bit
from jaxquant.functional import dequantize_absmax as dequantize_absmax
from jaxquant.functional import dequantize_blockwise as dequantize_blockwise
from jaxquant.functional import int8_linear as int8_linear
from jaxquant.functional import int8_matmul as int8_matmul
from jaxquant.functional import int8_vectorwise_dequant as int8_vectorwise_dequant
from jaxquant.functional import int8_vectorwise_quant as int8_vectorwise_quant
from jaxquant.functional import int8_weight_only_linear as int8_weight_only_linear
from jaxquant.functional import matmul_4bit as matmul_4bit
from jaxquant.functional import quantize_4bit as quantize_4bit
from jaxquant.functional import quantize_blockwise as quantize_blockwise
from jaxquant.functional import quantize_fp4 as quantize_fp4
from jaxquant.functional import quantize_int8 as quantize_int8
from jaxquant.functional import quantize_nf4 as quantize_nf4
from jaxquant.quant_state import QuantState as QuantState

__version__ = "0.1.0"

_SUBPACKAGES = ("nn", "optim", "checkpoint", "interop", "sharding", "models")


def __getattr__(name: str):
  """Import the heavier subpackages (Flax, Optax, Orbax users) on first attribute access."""
  if name in _SUBPACKAGES:
    import importlib
    return importlib.import_module(f"jaxquant.{name}")
  raise AttributeError(f"module 'jaxquant' has no attribute {name!r}")

__all__ = [
    "QuantState",
    "codebooks",
    "functional",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_4bit",
    "quantize_nf4",
    "quantize_fp4",
    "dequantize_4bit",
    "dequantize_absmax",
    "int8_vectorwise_quant",
    "int8_vectorwise_dequant",
    "quantize_int8",
    "int8_linear",
    "int8_matmul",
    "int8_weight_only_linear",
    "matmul_4bit",
    "__version__",
]
