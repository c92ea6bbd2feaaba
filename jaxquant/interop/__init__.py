"""Checkpoint interoperability.

:mod:`jaxquant.interop.bnb` reads and writes the safetensors checkpoints of transformers +
bitsandbytes (and quantizes regular ones on load); :func:`load_into` puts their tensors into a
Flax model by parameter name (:class:`NameRules`, :data:`LLAMA_RULES`) and :func:`state_dict`
takes them back out under checkpoint names.
"""

from jaxquant.interop import bnb as bnb
from jaxquant.interop._mapping import load_into as load_into
from jaxquant.interop._mapping import model_paths as model_paths
from jaxquant.interop._mapping import state_dict as state_dict
from jaxquant.interop._names import LLAMA_RULES as LLAMA_RULES
from jaxquant.interop._names import NameMap as NameMap
from jaxquant.interop._names import NameRules as NameRules
from jaxquant.interop._names import llama_rules as llama_rules

__all__ = ["bnb", "load_into", "state_dict", "model_paths", "NameRules", "NameMap",
           "LLAMA_RULES", "llama_rules"]
