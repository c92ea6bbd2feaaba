"""Flax layers with frozen quantized weights, one-call model conversion, and LoRA (QLoRA).

NNX: :class:`Linear4bit`, :class:`Linear8bitLt`, :class:`Embedding4bit`,
:class:`Embedding8bit`, :class:`StableEmbedding` -- drop-ins for ``nnx.Linear`` /
``nnx.Embed``; the packed weight is a :class:`QuantizedWeight` (an ``nnx.Variable``, not an
``nnx.Param``), so optimizers and ``nnx.grad`` never touch it.

Conversion: :func:`quantize_model` with a :class:`QuantConfig` (NNX models in place; Linen
variables, applied to the unchanged module with :func:`quantized_apply`).

LoRA: :func:`add_lora` with a :class:`LoraConfig`; train only the adapters with
``nnx.Optimizer(model, tx, wrt=jaxquant.nn.lora_filter)`` or ``optax.multi_transform({True:
tx, False: optax.set_to_zero()}, jaxquant.nn.lora_mask)``; :func:`merge_lora`,
:func:`save_lora`, :func:`load_lora`.
"""

from flax.nnx import LoRAParam as LoraParam

from jaxquant.nn._config import ALL_LINEAR as ALL_LINEAR
from jaxquant.nn._config import LoraConfig as LoraConfig
from jaxquant.nn._config import QuantConfig as QuantConfig
from jaxquant.nn._convert import LayerReport as LayerReport
from jaxquant.nn._convert import QuantSummary as QuantSummary
from jaxquant.nn._convert import dequantize_model as dequantize_model
from jaxquant.nn._convert import memory_footprint as memory_footprint
from jaxquant.nn._convert import quantize_model as quantize_model
from jaxquant.nn._embed import Embedding4bit as Embedding4bit
from jaxquant.nn._embed import Embedding8bit as Embedding8bit
from jaxquant.nn._embed import StableEmbedding as StableEmbedding
from jaxquant.nn._linear import Linear4bit as Linear4bit
from jaxquant.nn._linen_apply import intercept as intercept
from jaxquant.nn._linen_apply import quantized_apply as quantized_apply
from jaxquant.nn._linen_convert import LinenQuantWeight as LinenQuantWeight
from jaxquant.nn._linen_layers import Dense4bit as Dense4bit
from jaxquant.nn._linen_layers import Dense8bitLt as Dense8bitLt
from jaxquant.nn._linen_layers import Embed4bit as Embed4bit
from jaxquant.nn._linen_layers import Embed8bit as Embed8bit
from jaxquant.nn._linen_layers import StableEmbed as StableEmbed
from jaxquant.nn._linen_lora import LoraWeights as LoraWeights
from jaxquant.nn._linear import Linear8bitLt as Linear8bitLt
from jaxquant.nn._lora import LoraEmbed as LoraEmbed
from jaxquant.nn._lora import LoraLinear as LoraLinear
from jaxquant.nn._lora import add_lora as add_lora
from jaxquant.nn._lora import lora_modules as lora_modules
from jaxquant.nn._lora import merge_lora as merge_lora
from jaxquant.nn._lora_io import load_lora as load_lora
from jaxquant.nn._lora_io import lora_tree as lora_tree
from jaxquant.nn._lora_io import save_lora as save_lora
from jaxquant.nn._variables import QuantizedWeight as QuantizedWeight
from jaxquant.nn._variables import lora_filter as lora_filter
from jaxquant.nn._variables import lora_mask as lora_mask
from jaxquant.nn._variables import quantized_filter as quantized_filter

__all__ = [
    "ALL_LINEAR",
    "Dense4bit",
    "Dense8bitLt",
    "Embed4bit",
    "Embed8bit",
    "LinenQuantWeight",
    "LoraWeights",
    "StableEmbed",
    "intercept",
    "quantized_apply",
    "Embedding4bit",
    "Embedding8bit",
    "LayerReport",
    "Linear4bit",
    "Linear8bitLt",
    "LoraConfig",
    "LoraEmbed",
    "LoraLinear",
    "LoraParam",
    "QuantConfig",
    "QuantSummary",
    "QuantizedWeight",
    "StableEmbedding",
    "add_lora",
    "dequantize_model",
    "lora_filter",
    "lora_mask",
    "load_lora",
    "lora_modules",
    "lora_tree",
    "memory_footprint",
    "merge_lora",
    "quantize_model",
    "quantized_filter",
    "save_lora",
]
