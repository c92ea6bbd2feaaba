"""A Llama-architecture decoder in Flax NNX: RMSNorm, rotary position embeddings,
grouped-query attention through ``jax.nn.dot_product_attention``, SwiGLU MLP.

Every projection is a bias-free ``nnx.Linear`` named as in Hugging Face's Llama (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``, ``lm_head``), so
:func:`jaxquant.nn.quantize_model` and :func:`jaxquant.nn.add_lora` take the usual names. With
``config.remat`` each block runs under ``nnx.remat`` (gradient checkpointing), which traces
through quantized layers and LoRA adapters like any other module.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxquant.models._llama_config import LlamaConfig, remat_policy

__all__ = ["LlamaForCausalLM", "LlamaBlock", "RMSNorm", "rotary", "causal_lm_loss"]


class RMSNorm(nnx.Module):
  """``x / rms(x) * scale``, statistics in float32, result in the input dtype (Llama's)."""

  def __init__(self, dim: int, *, eps: float, param_dtype: Any):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(x.dtype)
    return y.astype(x.dtype) * scale.reshape((1,) * (x.ndim - 1) + (-1,))


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (``rotate_half`` layout, as Hugging Face's Llama).

  Args:
    x: ``(B, T, heads, head_dim)``.
    positions: int ``(B, T)``.
    theta: base frequency.
  """
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # (B, T, d/2)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # (B, T, 1, d)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  xf = x.astype(jnp.float32)
  half = jnp.concatenate([-xf[..., d // 2:], xf[..., :d // 2]], axis=-1)
  return (xf * cos + half * sin).astype(x.dtype)


def _attention_impl(config: LlamaConfig, dtype: Any) -> str:
  if config.attention_impl is not None:
    return config.attention_impl
  gpu = jax.default_backend() == "gpu"
  return "cudnn" if gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


class LlamaAttention(nnx.Module):
  """Causal grouped-query self-attention with rotary embeddings."""

  def __init__(self, cfg: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d, h = cfg.hidden_size, cfg.head_dim
    self.cfg = cfg
    self.q_proj = nnx.Linear(d, cfg.num_heads * h, **kw)
    self.k_proj = nnx.Linear(d, cfg.num_kv_heads * h, **kw)
    self.v_proj = nnx.Linear(d, cfg.num_kv_heads * h, **kw)
    self.o_proj = nnx.Linear(cfg.num_heads * h, d, **kw)

  def __call__(self, x: jax.Array, positions: jax.Array,
               lengths: jax.Array | None) -> jax.Array:
    b, t, _ = x.shape
    cfg = self.cfg
    q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    q = rotary(q, positions, cfg.rope_theta)
    k = rotary(k, positions, cfg.rope_theta)
    out = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        implementation=_attention_impl(cfg, q.dtype))
    return self.o_proj(out.reshape(b, t, cfg.num_heads * cfg.head_dim))


class LlamaMLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
    self.up_proj = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
    self.down_proj = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nnx.Module):
  """Pre-norm decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(self, cfg: LlamaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.self_attn = LlamaAttention(cfg, **kw)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                  param_dtype=param_dtype)
    self.mlp = LlamaMLP(cfg, **kw)

  def __call__(self, x: jax.Array, positions: jax.Array,
               lengths: jax.Array | None = None) -> jax.Array:
    x = x + self.self_attn(self.input_norm(x), positions, lengths)
    return x + self.mlp(self.post_attn_norm(x))


def _run_block(block: LlamaBlock, x: jax.Array, positions: jax.Array,
               lengths: jax.Array | None) -> jax.Array:
  return block(x, positions, lengths)


def _remat_block(policy: Any) -> Any:
  """``_run_block`` under ``nnx.remat`` with ``policy``.

  A block changes no state, so graph updates are switched off (``graph_updates=False``):
  with them, ``nnx.remat`` writes the block's variables back after the call, which fails when
  the model was rebuilt by ``nnx.merge`` inside ``jax.grad`` (the usual functional training
  step). Flax versions without that option get the same thing from ``jax.checkpoint`` over
  the block's split state.
  """
  if "graph_updates" in inspect.signature(nnx.remat).parameters:
    return nnx.remat(_run_block, policy=policy, graph_updates=False)

  def run(block, x, positions, lengths):
    graphdef, state = nnx.split(block)

    @functools.partial(jax.checkpoint, policy=policy)
    def pure(state, x, positions, lengths):
      return _run_block(nnx.merge(graphdef, state), x, positions, lengths)

    return pure(state, x, positions, lengths)

  return run


class LlamaForCausalLM(nnx.Module):
  """Llama decoder with its language-model head.

  Args:
    config: :class:`LlamaConfig`.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); ``None`` follows ``param_dtype``.
    param_dtype: dtype the weights are created in (quantize them afterwards with
      :func:`jaxquant.nn.quantize_model`).
    rngs: initialisation keys.

  Call: ``input_ids`` int ``(B, T)`` (optionally ``positions`` ``(B, T)`` and ``lengths``
  ``(B,)`` valid tokens per row, right padding) → logits ``(B, T, vocab_size)`` in the
  compute dtype.
  """

  def __init__(self, config: LlamaConfig, *, dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if not isinstance(config, LlamaConfig):
      raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
    self.config = config
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
    self.layers = nnx.List([LlamaBlock(config, **kw) for _ in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
    self.lm_head = (nnx.data(None) if config.tie_embeddings else
                    nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, **kw))

  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
               lengths: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids must be integer (batch, seq), got {input_ids.dtype} "
                       f"{input_ids.shape}")
    b, t = input_ids.shape
    if t > cfg.max_position:
      raise ValueError(f"input_ids has {t} tokens; accepted: at most "
                       f"max_position={cfg.max_position}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
    if lengths is not None and tuple(jnp.shape(lengths)) != (b,):
      raise ValueError(f"lengths must have shape ({b},), got {jnp.shape(lengths)}")
    x = self.embed_tokens(input_ids)
    run = _run_block
    if cfg.remat != "none":
      run = _remat_block(remat_policy(cfg.remat))
    for block in self.layers:
      x = run(block, x, positions, lengths)
    x = self.norm(x)
    if self.lm_head is None:
      return self.embed_tokens.attend(x)
    return self.lm_head(x)


def causal_lm_loss(logits: jax.Array, input_ids: jax.Array,
                   lengths: jax.Array | None = None) -> jax.Array:
  """Mean next-token cross-entropy (float32): position ``t`` predicts token ``t + 1``;
  with ``lengths`` ``(B,)`` the padding positions are left out."""
  labels = input_ids[:, 1:]
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1].astype(jnp.float32), labels)
  if lengths is None:
    return jnp.mean(ce)
  valid = jnp.arange(labels.shape[1])[None, :] < (lengths[:, None] - 1)
  return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)
