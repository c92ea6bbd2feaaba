"""LoRA for Linen variables: adapters in a ``"lora"`` collection, applied by the interceptor
of :func:`jaxquant.nn.quantized_apply` to the unchanged module."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.nn import _common
from jaxquant.nn._config import ALL_LINEAR, LoraConfig, path_to_name
from jaxquant.nn._linen_convert import (PARAMS, LinenQuantWeight, as_variables,
                                        get_path, iter_layers, iter_quantized, pop_path,
                                        set_path, to_dict)
from jaxquant.nn._linen_layers import QUANT_COLLECTION

__all__ = ["LoraWeights", "LORA_COLLECTION", "ADAPTER", "add_lora", "merge_lora"]

logger = logging.getLogger("jaxquant.nn")

#: The Linen collection holding the adapters; ``variables["lora"]`` is what to train.
LORA_COLLECTION = "lora"
#: Variable name of a layer's adapter inside its scope of the ``"lora"`` collection.
ADAPTER = "adapter"


@dataclasses.dataclass(frozen=True)
class LoraWeights:
  """One Linen layer's adapter: ``lora_a`` ``(in, r)`` (``(num_embeddings, r)`` for an
  Embed) and ``lora_b`` ``(r, out)`` are the trainable leaves; ``scaling`` (``alpha / r``),
  ``dropout`` and ``dtype`` (compute dtype, ``None``: ``lora_a.dtype``) are static."""

  lora_a: jax.Array
  lora_b: jax.Array
  scaling: float = 1.0
  dropout: float = 0.0
  dtype: Any = None

  def delta(self) -> jax.Array:
    """``lora_a @ lora_b * scaling`` in float32: the update of a Flax kernel ``(in, out)``
    or of an embedding table ``(num, features)``."""
    a = self.lora_a.astype(jnp.float32)
    return (a @ self.lora_b.astype(jnp.float32)) * jnp.float32(self.scaling)


jax.tree_util.register_dataclass(LoraWeights, data_fields=["lora_a", "lora_b"],
                                 meta_fields=["scaling", "dropout", "dtype"])


def _candidates(variables: dict[str, Any]) -> list[tuple[tuple[str, ...], bool, int, int]]:
  """``(module path, is_linear, rows of A, columns of B)`` of every layer that can take an
  adapter: float Dense/Embed params and quantized kernels/tables."""
  out = []
  for path, kind, node in iter_layers(variables.get(PARAMS, {})):
    if kind == "dense":
      out.append((path, True, *node["kernel"].shape))
    elif kind == "embed":
      out.append((path, False, *node["embedding"].shape))
  for path, leaf, w in iter_quantized(variables.get(QUANT_COLLECTION, {})):
    state = w.state if isinstance(w, LinenQuantWeight) else w
    if leaf == "kernel":
      out.append((path, True, state.shape[1], state.shape[0]))
    else:
      out.append((path, False, *state.shape))
  return sorted(out)


def add_lora(variables: Mapping[str, Any], config: LoraConfig, rng: Any = None) -> dict[str, Any]:
  """Linen branch of :func:`jaxquant.nn.add_lora`: a ``"lora"`` collection of
  :class:`LoraWeights` for the targeted layers. ``rng``: a key, an int seed (default 0) or an
  ``nnx.Rngs``, as the NNX branch takes."""
  from jaxquant.nn._lora import check_targets, init_lora_a

  variables = as_variables(variables)
  if variables.get(LORA_COLLECTION):
    raise ValueError("the variables already hold LoRA adapters (collection 'lora'); call "
                     "jaxquant.nn.merge_lora first")
  candidates = _candidates(variables)
  check_targets(config, [(path_to_name(p), linear) for p, linear, _, _ in candidates])
  stacked = [path_to_name(p) for p, kind, node in iter_layers(variables.get(PARAMS, {}))
             if kind == "other" and getattr(node["kernel"], "ndim", 0) > 2]
  if stacked and config.target_modules == ALL_LINEAR:
    logger.warning("add_lora: %s hold stacked kernels (nn.scan / nn.vmap over layers) and get "
                   "no adapters: the module's scan would not slice a 'lora' collection",
                   stacked)
  key = _as_key(rng)
  lora: dict[str, Any] = {}
  selected = [c for c in candidates if config.targets(path_to_name(c[0]), linear=c[1])]
  for i, (path, linear, rows, cols) in enumerate(selected):
    a = init_lora_a(jax.random.fold_in(key, i), (rows, config.r), config.param_dtype,
                    not linear)
    b = jnp.zeros((config.r, cols), config.param_dtype)
    set_path(lora, (*path, ADAPTER), LoraWeights(
        a, b, config.scaling, config.dropout if linear else 0.0, config.dtype))
  variables[LORA_COLLECTION] = lora
  return variables


def _as_key(rng: Any) -> jax.Array:
  """A key from ``add_lora``'s ``rngs``: ``None`` (seed 0), an int seed, an ``nnx.Rngs``
  (its ``params`` stream) or a key."""
  from flax import nnx
  if rng is None:
    return jax.random.key(0)
  if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
    return jax.random.key(int(rng))
  if isinstance(rng, nnx.Rngs):
    return rng.params()
  return rng


def merge_lora(variables: Mapping[str, Any], *, dequantize: bool = False) -> dict[str, Any]:
  """Linen branch of :func:`jaxquant.nn.merge_lora`: fold every adapter into its layer's
  weight and drop the ``"lora"`` collection."""
  variables = as_variables(variables)
  lora = variables.pop(LORA_COLLECTION, None)
  if not lora:
    raise ValueError("the variables hold no LoRA adapters (no 'lora' collection)")
  quantized = to_dict(variables.get(QUANT_COLLECTION, {}))
  params = variables[PARAMS]
  for path, _, adapter in _iter_adapters(lora):
    name = path_to_name(path)
    leaf = next((n for n in ("kernel", "embedding") for tree in (params, quantized)
                 if get_path(tree, (*path, n)) is not None), None)
    if leaf is None:
      raise ValueError(f"adapter '{name}' has no weight to merge into (no 'kernel' or "
                       "'embedding' in params or 'quantized')")
    merge = functools.partial(_common.merged_weight, a=adapter.lora_a, b=adapter.lora_b,
                              scaling=adapter.scaling, kernel=leaf == "kernel")
    dense = get_path(params, (*path, leaf))
    if dense is not None:
      set_path(params, (*path, leaf), merge(dense, dtype=dense.dtype))
      continue
    w = get_path(quantized, (*path, leaf))
    state = w.state if isinstance(w, LinenQuantWeight) else w
    merged = merge(state, dtype=state.dtype)  # Flax layout: (in, out) or (num, features)
    if dequantize:
      if not isinstance(w, LinenQuantWeight):
        raise ValueError(f"layer '{name}' is a jaxquant Linen layer (Dense4bit, Embed8bit, ...) "
                         "whose weight must stay quantized; merge with dequantize=False")
      pop_path(quantized, (*path, leaf))
      set_path(params, (*path, leaf), merged)
      continue
    new_state = _common.requantize_like(state, merged, kernel=leaf == "kernel")
    set_path(quantized, (*path, leaf),
             dataclasses.replace(w, state=new_state) if isinstance(w, LinenQuantWeight)
             else new_state)
  if quantized:
    variables[QUANT_COLLECTION] = quantized
  else:
    variables.pop(QUANT_COLLECTION, None)
  return variables


def _iter_adapters(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
  for k, v in tree.items():
    if isinstance(v, LoraWeights):
      yield prefix, k, v
    elif isinstance(v, Mapping):
      yield from _iter_adapters(v, (*prefix, str(k)))
