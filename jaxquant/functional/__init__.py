"""Array-level ops: blockwise 8-bit and 4-bit quantization, LLM.int8(), 4-bit matmul.

Each op validates its arguments, composes (double quantization, the outlier split) and runs
the implementation chosen by ``backend`` (see :mod:`jaxquant._dispatch`).
"""

from jaxquant.functional._blockwise import dequantize_blockwise as dequantize_blockwise
from jaxquant.functional._blockwise import quantize_blockwise as quantize_blockwise
from jaxquant.functional._fourbit import dequantize_4bit as dequantize_4bit
from jaxquant.functional._fourbit import dequantize_absmax as dequantize_absmax
from jaxquant.functional._fourbit import quantize_4bit as quantize_4bit
from jaxquant.functional._fourbit import quantize_fp4 as quantize_fp4
from jaxquant.functional._fourbit import quantize_nf4 as quantize_nf4
from jaxquant.functional._int8 import int8_linear as int8_linear
from jaxquant.functional._int8 import int8_vectorwise_dequant as int8_vectorwise_dequant
from jaxquant.functional._int8 import int8_vectorwise_quant as int8_vectorwise_quant
from jaxquant.functional._int8 import quantize_int8 as quantize_int8
from jaxquant.functional._int8_matmul import int8_matmul as int8_matmul
from jaxquant.functional._int8_matmul import int8_weight_only_linear as int8_weight_only_linear
from jaxquant.functional._matmul import matmul_4bit as matmul_4bit

__all__ = [
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
]
