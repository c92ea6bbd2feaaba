"""Linen layers with frozen quantized weights: drop-ins for ``nn.Dense`` and ``nn.Embed``.

The QuantState lives in the ``"quantized"`` collection (never in ``"params"``), so
``jax.grad`` over ``variables["params"]`` and an Optax optimizer over it never see it:
``model.apply({"params": params, "quantized": variables["quantized"]}, x)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxquant.nn import _common
from jaxquant.nn._linear import _check_threshold

__all__ = ["Dense4bit", "Dense8bitLt", "Embed4bit", "Embed8bit", "StableEmbed", "QUANT_COLLECTION"]

#: The Linen collection holding quantized weights.
QUANT_COLLECTION = "quantized"

Dtype = Any
default_kernel_init = nn.initializers.lecun_normal()
default_embed_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)


class Dense4bit(nn.Module):
  """``nn.Dense`` with a frozen 4-bit (NF4/FP4) kernel: bitsandbytes' ``Linear4bit``.

  Fields as ``nn.Dense`` (``features``, ``use_bias``, ``dtype``, ``param_dtype``,
  ``precision``, ``kernel_init``, ``bias_init``; ``promote_dtype``, ``dot_general``,
  ``dot_general_cls`` only at their defaults) plus the quantization settings. At ``init``
  the kernel is drawn from ``kernel_init`` (the same draw as ``nn.Dense``), quantized, and
  only its QuantState is kept, in torch layout ``(features, in_features)``, as variable
  ``"kernel"`` of the ``"quantized"`` collection. The bias is a float param. The matmul is
  :func:`jaxquant.functional.matmul_4bit`.

  Attributes:
    quant_type: ``"fp4"`` (bitsandbytes' default) or ``"nf4"``.
    blocksize: elements per absmax; must divide the input features.
    double_quant: quantize the absmax again (bitsandbytes' ``compress_statistics``).
    compute_dtype: dtype of the matmul (``None``: the output dtype).

  Call: ``(..., in_features)`` float → ``(..., features)`` in ``dtype`` (default: promoted
  from input and ``param_dtype``, as ``nn.Dense``).
  """

  features: int
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Any = default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()
  promote_dtype: Any = None
  dot_general: Any = None
  dot_general_cls: Any = None
  quant_type: str = "fp4"
  blocksize: int = 64
  double_quant: bool = True
  compute_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    _common.check_dropin_args("Dense4bit", promote_dtype=self.promote_dtype,
                              dot_general=self.dot_general,
                              dot_general_cls=self.dot_general_cls)
    in_features = jnp.shape(inputs)[-1]
    _common.check_4bit_layer("in_features", in_features, quant_type=self.quant_type,
                             blocksize=self.blocksize)

    def init() -> Any:
      kernel = self.kernel_init(self.make_rng("params"), (in_features, self.features),
                                self.param_dtype)
      return _common.quantize_kernel_4bit(kernel, quant_type=self.quant_type,
                                          blocksize=self.blocksize,
                                          double_quant=self.double_quant)

    state = self.variable(QUANT_COLLECTION, "kernel", init).value
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    out_dtype = _common.output_dtype(inputs.dtype, self.param_dtype, self.dtype)
    return _common.linear_4bit(inputs, state, bias, out_dtype=out_dtype,
                               compute_dtype=self.compute_dtype)


class Dense8bitLt(nn.Module):
  """``nn.Dense`` with a frozen LLM.int8() kernel: bitsandbytes' ``Linear8bitLt``.

  The kernel is kept as an ``int8_rowwise`` QuantState (bnb's ``CB`` int8 ``(features, in)``
  and ``SCB`` float32 ``(features,)``) in the ``"quantized"`` collection; the matmul is
  :func:`jaxquant.functional.int8_linear`.

  Attributes:
    threshold: outlier threshold (``0.0``: no 16-bit outlier path; ``6.0`` is
      transformers' default).
    compute_dtype: dtype of the activations fed to the int8 matmul (``None``: output dtype).
  """

  features: int
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Any = default_kernel_init
  bias_init: Any = nn.initializers.zeros_init()
  promote_dtype: Any = None
  dot_general: Any = None
  dot_general_cls: Any = None
  threshold: float = 0.0
  compute_dtype: Dtype | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    _common.check_dropin_args("Dense8bitLt", promote_dtype=self.promote_dtype,
                              dot_general=self.dot_general,
                              dot_general_cls=self.dot_general_cls)
    threshold = _check_threshold(self.threshold)
    in_features = jnp.shape(inputs)[-1]

    def init() -> Any:
      kernel = self.kernel_init(self.make_rng("params"), (in_features, self.features),
                                self.param_dtype)
      return _common.quantize_kernel_8bit(kernel)

    state = self.variable(QUANT_COLLECTION, "kernel", init).value
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    out_dtype = _common.output_dtype(inputs.dtype, self.param_dtype, self.dtype)
    return _common.linear_8bit(inputs, state, bias, out_dtype=out_dtype,
                               compute_dtype=self.compute_dtype, threshold=threshold)


class _QuantEmbed(nn.Module):
  """Lookup and tied head shared by the quantized Linen embeddings."""

  def _out_dtype(self) -> Any:
    return jnp.dtype(self.dtype if self.dtype is not None else self.param_dtype)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Integer ids of any shape → ``inputs.shape + (features,)``; only the looked-up rows
    are dequantized."""
    return _common.embed_lookup(self.state.value, inputs, self._out_dtype())

  def attend(self, query: jax.Array) -> jax.Array:
    """``query @ table.T`` (tied head): ``(..., features)`` → ``(..., num_embeddings)`` in
    ``dtype``, or (``dtype=None``) the promotion of ``query.dtype`` and ``param_dtype``, as
    ``nn.Embed.attend``."""
    out_dtype = _common.output_dtype(query.dtype, self.param_dtype, self.dtype)
    return _common.embed_attend(self.state.value, query, out_dtype,
                                threshold=getattr(self, "threshold", 0.0))


class Embed4bit(_QuantEmbed):
  """``nn.Embed`` with a frozen 4-bit table (bitsandbytes' ``Embedding4bit``), kept as
  variable ``"embedding"`` of the ``"quantized"`` collection.

  Attributes:
    num_embeddings, features, dtype, param_dtype, embedding_init: as ``nn.Embed``
      (``promote_dtype`` only at its default).
    quant_type: ``"fp4"`` or ``"nf4"``.
    blocksize: must divide ``features``.
    double_quant: quantize the absmax again (off by default, as bitsandbytes).
  """

  num_embeddings: int
  features: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  embedding_init: Any = default_embed_init
  promote_dtype: Any = None
  quant_type: str = "fp4"
  blocksize: int = 64
  double_quant: bool = False

  def setup(self):
    _common.check_dropin_args("Embed4bit", promote_dtype=self.promote_dtype)
    _common.check_4bit_layer("features", self.features, quant_type=self.quant_type,
                             blocksize=self.blocksize)

    def init() -> Any:
      table = self.embedding_init(self.make_rng("params"),
                                  (self.num_embeddings, self.features), self.param_dtype)
      return _common.quantize_table(table, bits=4, quant_type=self.quant_type,
                                    blocksize=self.blocksize, double_quant=self.double_quant)

    self.state = self.variable(QUANT_COLLECTION, "embedding", init)


class Embed8bit(_QuantEmbed):
  """``nn.Embed`` with a frozen row-wise int8 table (bitsandbytes' ``Embedding8bit``).

  Attributes:
    num_embeddings, features, dtype, param_dtype, embedding_init: as ``nn.Embed``.
    threshold: LLM.int8() outlier threshold of ``attend``.
  """

  num_embeddings: int
  features: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  embedding_init: Any = default_embed_init
  promote_dtype: Any = None
  threshold: float = 0.0

  def setup(self):
    _common.check_dropin_args("Embed8bit", promote_dtype=self.promote_dtype)
    _check_threshold(self.threshold)

    def init() -> Any:
      table = self.embedding_init(self.make_rng("params"),
                                  (self.num_embeddings, self.features), self.param_dtype)
      return _common.quantize_table(table, bits=8)

    self.state = self.variable(QUANT_COLLECTION, "embedding", init)


class StableEmbed(nn.Module):
  """bitsandbytes' ``StableEmbedding`` for Linen: Xavier-uniform table (a float param,
  trainable) and a LayerNorm after the lookup, computed in float32 and cast to ``dtype``.

  Attributes:
    num_embeddings, features, dtype, param_dtype, embedding_init: as ``nn.Embed``
      (``embedding_init`` defaults to Xavier uniform).
    epsilon: LayerNorm epsilon (torch's 1e-5).
  """

  num_embeddings: int
  features: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  embedding_init: Any = nn.initializers.xavier_uniform()
  epsilon: float = 1e-5

  def setup(self):
    self.embedding = self.param("embedding", self.embedding_init,
                                (self.num_embeddings, self.features), self.param_dtype)
    self.norm = nn.LayerNorm(epsilon=self.epsilon, dtype=jnp.float32, param_dtype=jnp.float32)

  def _out_dtype(self) -> Any:
    return jnp.dtype(self.dtype if self.dtype is not None else self.param_dtype)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    _common._check_ids(inputs)
    rows = jnp.take(self.embedding, inputs, axis=0)
    return self.norm(rows.astype(jnp.float32)).astype(self._out_dtype())

  def attend(self, query: jax.Array) -> jax.Array:
    """``query @ table.T`` (no norm), in ``dtype`` or the promotion of the query's and the
    table's dtypes, as ``nn.Embed.attend``."""
    dt = _common.output_dtype(query.dtype, self.param_dtype, self.dtype)
    return jnp.dot(query.astype(dt), self.embedding.astype(dt).T)
