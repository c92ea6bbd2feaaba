"""LlamaConfig: the sizes and options of a Llama-architecture decoder, with presets."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

__all__ = ["LlamaConfig", "REMAT_POLICIES", "remat_policy"]

#: Names accepted by ``LlamaConfig.remat``: what each rematerialized block keeps from its
#: forward pass (everything else is recomputed in the backward pass).
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,  # keep only the block's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


def remat_policy(name: str) -> Callable[..., bool] | None:
  """The ``jax.checkpoint`` policy called ``name`` (see :data:`REMAT_POLICIES`)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat must be 'none' or one of {tuple(REMAT_POLICIES)}, got {name!r}")
  return REMAT_POLICIES[name]


def _pos_int(name: str, v: Any) -> None:
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    raise ValueError(f"{name} must be an int >= 1, got {v!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Sizes of a Llama decoder (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU).

  Attributes:
    vocab_size: token ids are in ``[0, vocab_size)``.
    hidden_size: model width ``D``.
    intermediate_size: SwiGLU width ``F``.
    num_layers: decoder blocks.
    num_heads: query heads ``N``; ``head_dim = D // N``.
    num_kv_heads: key/value heads ``K`` (grouped-query attention); divides ``num_heads``.
    max_position: longest sequence the rotary table is meant for (checked on call).
    rope_theta: rotary base frequency.
    rms_norm_eps: epsilon of every RMSNorm.
    tie_embeddings: the output head is the embedding table (``attend``) instead of ``lm_head``.
    remat: ``"none"`` or a name of :data:`REMAT_POLICIES`: each block runs under
      ``nnx.remat`` with that policy (gradient checkpointing; works through quantized layers).
    attention_impl: ``jax.nn.dot_product_attention``'s ``implementation``; ``None`` picks
      ``"cudnn"`` (flash attention) on a GPU with 16-bit activations, ``"xla"`` elsewhere.
  """

  vocab_size: int = 32000
  hidden_size: int = 2048
  intermediate_size: int = 5632
  num_layers: int = 22
  num_heads: int = 32
  num_kv_heads: int = 4
  max_position: int = 2048
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  remat: str = "none"
  attention_impl: str | None = None

  def __post_init__(self):
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "max_position"):
      _pos_int(f, getattr(self, f))
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of "
                       f"num_heads={self.num_heads}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide "
                       f"num_heads={self.num_heads} (grouped-query attention)")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.remat != "none":
      remat_policy(self.remat)
    if self.attention_impl not in (None, "xla", "cudnn"):
      raise ValueError(f"attention_impl must be None, 'xla' or 'cudnn', got "
                       f"{self.attention_impl!r}")
    if not (self.rope_theta > 0 and self.rms_norm_eps > 0):
      raise ValueError(f"rope_theta and rms_norm_eps must be > 0, got {self.rope_theta!r}, "
                       f"{self.rms_norm_eps!r}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def replace(self, **changes: Any) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Weights of the model (embeddings and head included)."""
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * self.num_heads * h * 2 + d * self.num_kv_heads * h * 2
    block = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else self.vocab_size * d
    return self.num_layers * block + self.vocab_size * d + d + head

  @classmethod
  def tinyllama_1_1b(cls, **changes: Any) -> "LlamaConfig":
    """TinyLlama-1.1B's shape: D 2048, MLP 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000."""
    return cls(**changes)

  @classmethod
  def tiny(cls, **changes: Any) -> "LlamaConfig":
    """A 2-layer test model (D 64, 4 heads, 2 KV heads, vocab 256) that runs in milliseconds."""
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, max_position=128)
    base.update(changes)
    return cls(**base)
