"""A BERT encoder with mean pooling in Flax NNX (the sentence-transformers MiniLM family).

Every projection is a plain ``nnx.Linear`` and every table an ``nnx.Embed``, so
:func:`jaxquant.nn.quantize_model` and :func:`jaxquant.nn.add_lora` convert the model in
place. Layer names follow the roles, so LoRA targets read naturally: ``"query"``, ``"key"``,
``"value"``, ``"attn_out"``, ``"ffn_in"``, ``"ffn_out"``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["BertConfig", "BertModel", "BertLayer", "BertEmbeddings", "mean_pool"]


def _positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be an int >= 1, got {value!r}")
  return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
  """Sizes of a BERT encoder. Defaults are all-MiniLM-L6-v2's.

  Attributes:
    vocab_size: rows of the word-embedding table.
    hidden_size: model width ``D``; a multiple of ``num_heads``.
    num_layers: encoder blocks.
    num_heads: attention heads (head size ``D // num_heads``).
    intermediate_size: width of the feed-forward block.
    max_position: rows of the (learned, absolute) position table: the longest input.
    type_vocab_size: rows of the segment (token type) table.
    layer_norm_eps: epsilon of every LayerNorm.
  """

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  def __post_init__(self):
    for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
              "max_position", "type_vocab_size"):
      _positive_int(f, getattr(self, f))
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of "
                       f"num_heads={self.num_heads}")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> "BertConfig":
    """From a Hugging Face ``config.json`` dict of a ``BertModel`` (absolute positions,
    GELU activation only)."""
    if config.get("model_type", "bert") != "bert":
      raise ValueError(f"config model_type must be 'bert', got {config.get('model_type')!r}")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
      raise ValueError(f"config hidden_act must be 'gelu' (exact erf GELU), got {act!r}")
    pos = config.get("position_embedding_type", "absolute")
    if pos != "absolute":
      raise ValueError(f"config position_embedding_type must be 'absolute', got {pos!r}")
    return cls(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
               num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
               intermediate_size=config["intermediate_size"],
               max_position=config["max_position_embeddings"],
               type_vocab_size=config.get("type_vocab_size", 2),
               layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)))


def _add_bias(x: jax.Array, b: jax.Array) -> jax.Array:
  return x + b.reshape((1,) * (x.ndim - 1) + (-1,))


class BertEmbeddings(nnx.Module):
  """Word + position + token-type embeddings, then LayerNorm: ids ``(B, T)`` → ``(B, T, D)``."""

  def __init__(self, cfg: BertConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
    self.position = nnx.Embed(cfg.max_position, cfg.hidden_size, **kw)
    self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, **kw)
    self.norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, **kw)

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None, :]
    h = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
    return self.norm(h)


class BertLayer(nnx.Module):
  """One post-LayerNorm encoder block: self-attention then GELU feed-forward."""

  def __init__(self, cfg: BertConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.head_dim
    self.query = nnx.Linear(d, d, **kw)
    self.key = nnx.Linear(d, d, **kw)
    self.value = nnx.Linear(d, d, **kw)
    self.attn_out = nnx.Linear(d, d, **kw)
    self.attn_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, **kw)
    self.ffn_in = nnx.Linear(d, f, **kw)
    self.ffn_out = nnx.Linear(f, d, **kw)
    self.ffn_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, **kw)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """``x`` ``(B, T, D)``; ``mask`` bool ``(B, 1, 1, T)``, True on real tokens."""
    b, t, _ = x.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    a = jax.nn.dot_product_attention(q, k, v, mask=mask)
    x = self.attn_norm(x + self.attn_out(a.reshape(b, t, -1)))
    h = jax.nn.gelu(self.ffn_in(x), approximate=False)
    return self.ffn_norm(x + self.ffn_out(h))


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mean of ``hidden`` ``(B, T, D)`` over the tokens where ``attention_mask`` ``(B, T)`` is
  nonzero (sentence-transformers' mean pooling): ``(B, D)`` float32."""
  m = attention_mask.astype(jnp.float32)[:, :, None]
  total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
  return total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


class BertModel(nnx.Module):
  """BERT encoder: ``__call__`` gives token states, :meth:`encode` sentence embeddings.

  Args:
    config: :class:`BertConfig`.
    dtype: compute dtype of the layers (``None``: float32 with float32 params).
    param_dtype: dtype the weights are stored in.
    rngs: initialisation keys (random weights; :func:`jaxquant.models.load_bert` fills in
      pretrained ones).

  Example::

    model = BertModel(BertConfig(num_layers=2), rngs=nnx.Rngs(0))
    emb = model.encode(ids, mask)   # (B, 384), unit norm
  """

  def __init__(self, config: BertConfig, *, dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if not isinstance(config, BertConfig):
      raise TypeError(f"config must be a BertConfig, got {type(config).__name__}")
    self.config = config
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = BertEmbeddings(config, **kw)
    self.layers = nnx.List([BertLayer(config, **kw) for _ in range(config.num_layers)])

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    """Token states.

    Args:
      input_ids: int ``(B, T)``, ``T <= config.max_position``.
      attention_mask: ``(B, T)``, nonzero on real tokens, zero on padding.
      token_type_ids: int ``(B, T)`` segment ids (default all zero).

    Returns:
      ``(B, T, hidden_size)`` in the compute dtype.
    """
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids must be integer (batch, seq), got {input_ids.dtype} "
                       f"{input_ids.shape}")
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask must have the shape of input_ids {input_ids.shape}, got "
                       f"{attention_mask.shape}")
    if input_ids.shape[1] > self.config.max_position:
      raise ValueError(f"input_ids has {input_ids.shape[1]} tokens; accepted: at most "
                       f"max_position={self.config.max_position}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.embeddings(input_ids, token_type_ids)
    mask = (attention_mask != 0)[:, None, None, :]
    for layer in self.layers:
      x = layer(x, mask)
    return x

  def encode(self, input_ids: jax.Array, attention_mask: jax.Array,
             token_type_ids: jax.Array | None = None, *, normalize: bool = True) -> jax.Array:
    """Sentence embeddings: mean-pooled token states, unit-normalised when ``normalize``
    (all-MiniLM-L6-v2's ``Normalize`` module). ``(B, hidden_size)`` float32."""
    e = mean_pool(self(input_ids, attention_mask, token_type_ids), attention_mask)
    if normalize:
      e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return e
