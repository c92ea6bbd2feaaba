"""NNX embeddings: 4-bit and 8-bit quantized tables (drop-ins for ``nnx.Embed``) and
bitsandbytes' ``StableEmbedding``."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from jaxquant.nn import _common
from jaxquant.nn._linear import _check_threshold, _weight_metadata
from jaxquant.nn._variables import QuantizedWeight
from jaxquant.quant_state import FOUR_BIT_TYPES, QuantState

__all__ = ["Embedding4bit", "Embedding8bit", "StableEmbedding"]

default_embed_init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)


class _QuantEmbed(nnx.Module):
  """Shared state, lookup and conversions of the quantized embeddings."""

  embedding: QuantizedWeight

  def _init_common(self, num_embeddings, features, dtype, param_dtype):
    self.num_embeddings = int(num_embeddings)
    self.features = int(features)
    self.param_dtype = jnp.dtype(param_dtype)
    # as nnx.Embed: the output dtype defaults to the table's dtype
    self.dtype = jnp.dtype(dtype) if dtype is not None else self.param_dtype

  @property
  def quant_state(self) -> QuantState:
    """The frozen table's :class:`~jaxquant.QuantState`, shape ``(num_embeddings, features)``."""
    return self.embedding.get_value()

  def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
    """Integer ids of any shape → ``inputs.shape + (features,)`` in ``dtype``; only the
    looked-up rows are dequantized."""
    with jax.named_scope(f"jaxquant.{type(self).__name__}"):
      y = _common.embed_lookup(self.quant_state, inputs, self.dtype)
      return _common.constrain(y, out_sharding)

  def attend(self, query: jax.Array, out_sharding: Any = None) -> jax.Array:
    """``query @ table.T`` for a tied output head: ``(..., features)`` →
    ``(..., num_embeddings)`` in ``dtype``, through the quantized matmul."""
    with jax.named_scope(f"jaxquant.{type(self).__name__}.attend"):
      y = _common.embed_attend(self.quant_state, query, self.dtype,
                               threshold=getattr(self, "threshold", 0.0))
      return _common.constrain(y, out_sharding)

  def dequantize(self) -> nnx.Embed:
    """An ``nnx.Embed`` with the dequantized table in ``param_dtype``."""
    return self.to_embed(_common.dequantize_table(self.quant_state, self.param_dtype))

  def to_embed(self, table: jax.Array) -> nnx.Embed:
    """An ``nnx.Embed`` with this layer's settings and the float ``table``
    ``(num_embeddings, features)``."""
    embed = nnx.eval_shape(lambda: nnx.Embed(
        self.num_embeddings, self.features, dtype=self.dtype, param_dtype=self.param_dtype,
        rngs=nnx.Rngs(0)))
    embed.embedding.set_value(jnp.asarray(table, self.param_dtype))
    return embed

  def _set_state(self, state: QuantState) -> None:
    if tuple(state.shape) != (self.num_embeddings, self.features):
      raise ValueError(f"state must hold a ({self.num_embeddings}, {self.features}) table, got "
                       f"shape {state.shape}")
    self.embedding.set_value(state)


class Embedding4bit(_QuantEmbed):
  """``nnx.Embed`` with a frozen 4-bit table: bitsandbytes' ``Embedding4bit``.

  Args:
    num_embeddings, features, dtype, param_dtype, embedding_init, rngs, embedding_metadata:
      as ``nnx.Embed`` (``dtype`` defaults to ``param_dtype``); ``promote_dtype`` only at its
      default.
    quant_type: ``"fp4"`` (bitsandbytes' default) or ``"nf4"``.
    blocksize: elements per absmax; must divide ``features`` (rows are gathered whole).
    double_quant: quantize the absmax again (off by default, as bitsandbytes).

  ``__call__(ids)`` gathers and dequantizes rows; ``attend(query)`` is the tied head through
  :func:`jaxquant.functional.matmul_4bit`.
  """

  def __init__(self, num_embeddings: int, features: int, *, dtype: DTypeLike | None = None,
               param_dtype: DTypeLike = jnp.float32, embedding_init: Any = default_embed_init,
               promote_dtype: Any = None, quant_type: str = "fp4", blocksize: int = 64,
               double_quant: bool = False, rngs: nnx.Rngs,
               embedding_metadata: Mapping[str, Any] = MappingProxyType({})):
    _common.check_dropin_args("Embedding4bit", promote_dtype=promote_dtype)
    _common.check_4bit_layer("features", features, quant_type=quant_type, blocksize=blocksize)
    self._init_common(num_embeddings, features, dtype, param_dtype)
    self.quant_type = quant_type
    self.blocksize = int(blocksize)
    self.double_quant = bool(double_quant)
    table = embedding_init(rngs.params(), (num_embeddings, features), self.param_dtype)
    self.embedding = QuantizedWeight(
        _common.quantize_table(table, bits=4, quant_type=quant_type, blocksize=blocksize,
                               double_quant=double_quant),
        **_weight_metadata(embedding_metadata))

  def quant_kwargs(self) -> dict[str, Any]:
    return dict(quant_type=self.quant_type, blocksize=self.blocksize,
                double_quant=self.double_quant)

  @classmethod
  def from_quant_state(cls, state: QuantState, *, dtype: DTypeLike | None = None,
                       param_dtype: DTypeLike | None = None) -> "Embedding4bit":
    """An embedding around an existing nf4/fp4 ``(num_embeddings, features)`` state."""
    if not isinstance(state, QuantState) or state.quant_type not in FOUR_BIT_TYPES:
      raise TypeError(f"state must be a nf4/fp4 QuantState, got {state!r}")
    if state.ndim != 2:
      raise ValueError(f"state must hold a 2-D (num_embeddings, features) table, got shape "
                       f"{state.shape}")
    state.check()
    num, features = state.shape
    param_dtype = state.dtype if param_dtype is None else param_dtype
    embed = nnx.eval_shape(lambda: cls(
        num, features, dtype=dtype, param_dtype=param_dtype, quant_type=state.quant_type,
        blocksize=state.blocksize, double_quant=state.nested, rngs=nnx.Rngs(0)))
    embed._set_state(state)
    return embed

  @classmethod
  def from_embed(cls, embed: nnx.Embed, *, quant_type: str = "fp4", blocksize: int = 64,
                 double_quant: bool = False) -> "Embedding4bit":
    """Quantize an ``nnx.Embed``."""
    _common.check_4bit_layer("features", embed.features, quant_type=quant_type,
                             blocksize=blocksize)
    state = _common.quantize_table(embed.embedding[...], bits=4, quant_type=quant_type,
                                   blocksize=blocksize, double_quant=double_quant)
    return cls.from_quant_state(state, dtype=embed.dtype, param_dtype=embed.param_dtype)


class Embedding8bit(_QuantEmbed):
  """``nnx.Embed`` with a frozen row-wise int8 table: bitsandbytes' ``Embedding8bit``.

  Args:
    num_embeddings, features, dtype, param_dtype, embedding_init, rngs, embedding_metadata:
      as ``nnx.Embed``.
    threshold: LLM.int8() outlier threshold of ``attend`` (the tied head), which runs
      through :func:`jaxquant.functional.int8_linear`.
  """

  def __init__(self, num_embeddings: int, features: int, *, dtype: DTypeLike | None = None,
               param_dtype: DTypeLike = jnp.float32, embedding_init: Any = default_embed_init,
               promote_dtype: Any = None, threshold: float = 0.0, rngs: nnx.Rngs,
               embedding_metadata: Mapping[str, Any] = MappingProxyType({})):
    _common.check_dropin_args("Embedding8bit", promote_dtype=promote_dtype)
    self._init_common(num_embeddings, features, dtype, param_dtype)
    self.threshold = _check_threshold(threshold)
    table = embedding_init(rngs.params(), (num_embeddings, features), self.param_dtype)
    self.embedding = QuantizedWeight(_common.quantize_table(table, bits=8),
                                     **_weight_metadata(embedding_metadata))

  def quant_kwargs(self) -> dict[str, Any]:
    return dict(threshold=self.threshold)

  @classmethod
  def from_quant_state(cls, state: QuantState, *, dtype: DTypeLike | None = None,
                       param_dtype: DTypeLike | None = None,
                       threshold: float = 0.0) -> "Embedding8bit":
    """An embedding around an existing ``int8_rowwise`` table state."""
    if not isinstance(state, QuantState) or state.quant_type != "int8_rowwise":
      raise TypeError(f"state must be an int8_rowwise QuantState, got {state!r}")
    state.check()
    num, features = state.shape
    param_dtype = state.dtype if param_dtype is None else param_dtype
    embed = nnx.eval_shape(lambda: cls(num, features, dtype=dtype, param_dtype=param_dtype,
                                       threshold=threshold, rngs=nnx.Rngs(0)))
    embed._set_state(state)
    return embed

  @classmethod
  def from_embed(cls, embed: nnx.Embed, *, threshold: float = 0.0) -> "Embedding8bit":
    """Quantize an ``nnx.Embed`` to row-wise int8."""
    state = _common.quantize_table(embed.embedding[...], bits=8)
    return cls.from_quant_state(state, dtype=embed.dtype, param_dtype=embed.param_dtype,
                                threshold=threshold)


class StableEmbedding(nnx.Module):
  """bitsandbytes' ``StableEmbedding``: Xavier-uniform init and a LayerNorm after the
  lookup, computed in float32 and cast back, for stable training with 8-bit optimizers
  (keep this table's optimizer state in 32 bits: select it by path).

  The table is a float ``nnx.Param`` (trainable); ``norm`` is an ``nnx.LayerNorm``.

  Args:
    num_embeddings, features, dtype, param_dtype, embedding_init, rngs, embedding_metadata:
      as ``nnx.Embed`` (``embedding_init`` defaults to Xavier uniform).
    epsilon: LayerNorm epsilon (torch's default, 1e-5).

  ``__call__(ids)`` → ``LayerNorm(table[ids])`` in ``dtype``; ``attend(query)`` as
  ``nnx.Embed`` (no norm).
  """

  def __init__(self, num_embeddings: int, features: int, *, dtype: DTypeLike | None = None,
               param_dtype: DTypeLike = jnp.float32,
               embedding_init: Any = nnx.initializers.xavier_uniform(), epsilon: float = 1e-5,
               rngs: nnx.Rngs,
               embedding_metadata: Mapping[str, Any] = MappingProxyType({})):
    self.num_embeddings = int(num_embeddings)
    self.features = int(features)
    self.param_dtype = jnp.dtype(param_dtype)
    self.dtype = jnp.dtype(dtype) if dtype is not None else self.param_dtype
    self.embedding = nnx.Param(
        embedding_init(rngs.params(), (num_embeddings, features), self.param_dtype),
        **embedding_metadata)
    self.norm = nnx.LayerNorm(features, epsilon=epsilon, dtype=jnp.float32,
                              param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
    _common._check_ids(inputs)
    rows = jnp.take(self.embedding[...], inputs, axis=0)
    y = self.norm(rows.astype(jnp.float32)).astype(self.dtype)
    return _common.constrain(y, out_sharding)

  def attend(self, query: jax.Array, out_sharding: Any = None) -> jax.Array:
    table = self.embedding[...].astype(self.dtype)
    y = jnp.dot(query.astype(self.dtype), table.T)
    return _common.constrain(y, out_sharding)
