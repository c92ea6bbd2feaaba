"""LoRA adapters for NNX models: wrap (quantized or float) layers, merge them back."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.nn import _common
from jaxquant.nn._config import ALL_LINEAR, LoraConfig
from jaxquant.nn._embed import Embedding4bit, Embedding8bit
from jaxquant.nn._graph import iter_modules, module_paths, replace_modules
from jaxquant.nn._linear import Linear4bit, Linear8bitLt

__all__ = ["LoraLinear", "LoraEmbed", "add_lora", "merge_lora", "lora_modules", "LINEAR_TYPES",
           "EMBED_TYPES"]

LINEAR_TYPES = (nnx.Linear, Linear4bit, Linear8bitLt)
EMBED_TYPES = (nnx.Embed, Embedding4bit, Embedding8bit)

# PEFT's A init: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
LORA_A_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
LORA_EMBED_A_INIT = nnx.initializers.normal(1.0)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "embed"))
def init_lora_a(key: jax.Array, shape: tuple[int, ...], dtype: Any, embed: bool) -> jax.Array:
  """``lora_a`` of ``shape`` (``(..., in, r)``, leading axes for a stacked layer): PEFT's
  kaiming-uniform (bound ``1/sqrt(in)``) for a linear layer, a standard normal for an
  embedding. One compiled program per shape."""
  if embed:
    return LORA_EMBED_A_INIT(key, shape, dtype)
  if len(shape) == 2:
    return LORA_A_INIT(key, shape, dtype)
  stacked = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                              batch_axis=tuple(range(len(shape) - 2)))
  return stacked(key, shape, dtype)


def _as_rngs(rngs: Any) -> nnx.Rngs:
  if isinstance(rngs, nnx.Rngs):
    return rngs
  if isinstance(rngs, np.integer):  # a NumPy seed (nnx.Rngs takes Python ints only)
    rngs = int(rngs)
  return nnx.Rngs(params=rngs, dropout=rngs) if rngs is not None else nnx.Rngs(0)


class LoraLinear(nnx.Module):
  """A linear layer plus a low-rank trainable update:
  ``base(x) + dropout(x) @ lora_a @ lora_b * (alpha / r)``.

  ``base`` is any of ``nnx.Linear``, :class:`Linear4bit`, :class:`Linear8bitLt` (kept as is,
  frozen when quantized); ``lora_a`` ``(in, r)`` and ``lora_b`` ``(r, out)`` are
  ``nnx.LoRAParam`` and ``lora_b`` starts at zero, so wrapping does not change the output.
  The adapter's dropout follows ``model.train()`` / ``model.eval()``.

  A stack of ``nnx.Linear`` layers built with ``nnx.vmap`` (kernel ``(*L, in, out)``, run by
  ``nnx.scan`` / ``nnx.vmap`` over its leading axes) gets stacked adapters ``(*L, in, r)`` and
  ``(*L, r, out)``, which the same transform slices; such a layer takes no dropout.

  Call: as ``base`` (extra arguments such as ``out_sharding`` go to it); the update is
  computed in ``dtype`` (default ``param_dtype``) and added in the base's output dtype.
  """

  def __init__(self, base: Any, *, r: int, alpha: float, dropout: float = 0.0,
               param_dtype: Any = jnp.float32, dtype: Any = None, rngs: Any = None):
    if not isinstance(base, LINEAR_TYPES):
      raise TypeError(f"base must be one of {tuple(t.__name__ for t in LINEAR_TYPES)}, got "
                      f"{type(base).__name__}")
    rngs = _as_rngs(rngs)
    self.base = base
    self.in_features = int(base.in_features)
    self.out_features = int(base.out_features)
    self.r = int(r)
    self.alpha = float(alpha)
    self.scaling = self.alpha / self.r
    self.dtype = None if dtype is None else jnp.dtype(dtype)
    lead = stacked_axes(base)
    if lead and dropout > 0:
      raise ValueError(f"dropout={dropout} cannot apply to a stacked layer (kernel of shape "
                       f"{tuple(base.kernel.shape)}, built with nnx.vmap): its dropout rng "
                       "would not be split over the layers; use dropout=0.0")
    self.lora_a = nnx.LoRAParam(init_lora_a(rngs.params(), (*lead, self.in_features, self.r),
                                            jnp.dtype(param_dtype), False))
    self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, self.r, self.out_features), param_dtype))
    self.lora_dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else nnx.data(None)

  def delta_kernel(self) -> jax.Array:
    """The adapter's update of the Flax kernel, ``(*L, in, out)`` float32."""
    a = self.lora_a[...].astype(jnp.float32)
    b = self.lora_b[...].astype(jnp.float32)
    return (a @ b) * jnp.float32(self.scaling)

  def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    y = self.base(x, *args, **kwargs)
    with jax.named_scope("jaxquant.lora"):
      a = self.lora_a[...]
      cdt = self.dtype if self.dtype is not None else a.dtype
      h = x if self.lora_dropout is None else self.lora_dropout(x)
      d = (h.astype(cdt) @ a.astype(cdt)) @ self.lora_b[...].astype(cdt)
      return y + (d * jnp.asarray(self.scaling, cdt)).astype(y.dtype)


def stacked_axes(base: Any) -> tuple[int, ...]:
  """The leading (layer) axes of a float base built with ``nnx.vmap``; ``()`` otherwise."""
  if isinstance(base, nnx.Linear):
    return tuple(base.kernel.shape[:-2])
  if isinstance(base, nnx.Embed):
    return tuple(base.embedding.shape[:-2])
  return ()


class LoraEmbed(nnx.Module):
  """An embedding plus a low-rank trainable update of its table:
  ``table + lora_a @ lora_b * (alpha / r)`` with ``lora_a`` ``(num, r)`` (normal init) and
  ``lora_b`` ``(r, features)`` zero. Applies to lookups and to ``attend`` (tied heads)."""

  def __init__(self, base: Any, *, r: int, alpha: float, param_dtype: Any = jnp.float32,
               dtype: Any = None, rngs: Any = None):
    if not isinstance(base, EMBED_TYPES):
      raise TypeError(f"base must be one of {tuple(t.__name__ for t in EMBED_TYPES)}, got "
                      f"{type(base).__name__}")
    if stacked_axes(base):
      raise ValueError(f"base is a stack of embeddings (table of shape "
                       f"{tuple(base.embedding.shape)}, built with nnx.vmap); LoRA adapters "
                       "take a 2-D (num_embeddings, features) table; leave it out of "
                       "target_modules")
    rngs = _as_rngs(rngs)
    self.base = base
    self.num_embeddings = int(base.num_embeddings)
    self.features = int(base.features)
    self.r = int(r)
    self.alpha = float(alpha)
    self.scaling = self.alpha / self.r
    self.dtype = None if dtype is None else jnp.dtype(dtype)
    self.lora_a = nnx.LoRAParam(init_lora_a(rngs.params(), (self.num_embeddings, self.r),
                                            jnp.dtype(param_dtype), True))
    self.lora_b = nnx.LoRAParam(jnp.zeros((self.r, self.features), param_dtype))

  def delta_table(self) -> jax.Array:
    """The adapter's update of the table, ``(num, features)`` float32."""
    a = self.lora_a[...].astype(jnp.float32)
    b = self.lora_b[...].astype(jnp.float32)
    return (a @ b) * jnp.float32(self.scaling)

  def _cdt(self) -> Any:
    return self.dtype if self.dtype is not None else self.lora_a.dtype

  def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    y = self.base(inputs, *args, **kwargs)
    cdt = self._cdt()
    rows = jnp.take(self.lora_a[...], inputs, axis=0).astype(cdt)
    d = rows @ self.lora_b[...].astype(cdt)
    return y + (d * jnp.asarray(self.scaling, cdt)).astype(y.dtype)

  def attend(self, query: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    y = self.base.attend(query, *args, **kwargs)
    cdt = self._cdt()
    d = (query.astype(cdt) @ self.lora_b[...].astype(cdt).T) @ self.lora_a[...].astype(cdt).T
    return y + (d * jnp.asarray(self.scaling, cdt)).astype(y.dtype)


def add_lora(model: Any, config: LoraConfig, *, rngs: Any = None) -> Any:
  """Wrap the layers ``config.target_modules`` selects with LoRA adapters, in place.

  NNX: ``nnx.Linear`` / :class:`Linear4bit` / :class:`Linear8bitLt` become
  :class:`LoraLinear`, embeddings named in ``target_modules`` become :class:`LoraEmbed`.
  A stack of ``nnx.Linear`` built with ``nnx.vmap`` (scan over layers) gets stacked
  adapters (without dropout).
  Train the adapters alone with ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``.
  Linen variables (a dict with ``"params"``) are handled by
  :func:`jaxquant.nn.add_lora` too: see :mod:`jaxquant.nn._linen_lora`.

  Args:
    model: an ``nnx.Module`` (changed in place) or Linen variables.
    config: :class:`LoraConfig`.
    rngs: ``nnx.Rngs``, a seed or a key for ``lora_a`` and the dropout (default seed 0).

  Returns:
    The model (the same object, unless it is itself a single targeted layer).

  Raises:
    ValueError: a ``target_modules`` entry matches no layer that can take an adapter (the
      message lists the ones that can), the model already has adapters, or a targeted
      stacked layer is an embedding or would need dropout.
  """
  if not isinstance(config, LoraConfig):
    raise TypeError(f"config must be a jaxquant.nn.LoraConfig, got {type(config).__name__}")
  if not isinstance(model, nnx.Module):
    from jaxquant.nn import _linen_lora
    return _linen_lora.add_lora(model, config, rng=rngs)
  rngs = _as_rngs(rngs)
  candidates, stacked, by_name = [], {}, {}
  aliases = module_paths(model)  # a shared layer is targeted if any of its paths is named
  for name, module in iter_modules(model):
    if isinstance(module, (LoraLinear, LoraEmbed)):
      raise ValueError(f"the model already has LoRA adapters (at '{name}'); call "
                       "jaxquant.nn.merge_lora first or load adapters with load_lora")
    if isinstance(module, LINEAR_TYPES + EMBED_TYPES):
      for path in aliases.get(id(module), (name,)):
        candidates.append((path, isinstance(module, LINEAR_TYPES)))
        by_name[path] = (id(module), name)
      if stacked_axes(module):
        stacked[name] = isinstance(module, LINEAR_TYPES)
  check_targets(config, candidates)
  chosen = {by_name[path] for path, linear in candidates if config.targets(path, linear=linear)}
  selected = {key for key, _ in chosen}  # by id: a shared layer is wrapped once
  # refuse before any layer is wrapped: stacked (nnx.vmap) layers take dropout-free adapters
  # on linear layers only
  bad = sorted(n for _, n in chosen if n in stacked and (config.dropout > 0 or not stacked[n]))
  if bad:
    raise ValueError(f"layers {bad} are stacks built with nnx.vmap (a weight with leading layer "
                     "axes); they take LoRA adapters only if linear and with dropout=0.0, got "
                     f"dropout={config.dropout}; change the dropout or target_modules")

  def wrap(name: str, module: Any) -> Any:
    if id(module) not in selected:
      return module
    common = dict(r=config.r, alpha=config.alpha, param_dtype=config.param_dtype,
                  dtype=config.dtype, rngs=rngs)
    if isinstance(module, LINEAR_TYPES):
      return LoraLinear(module, dropout=config.dropout, **common)
    return LoraEmbed(module, **common)

  return replace_modules(model, wrap)


def check_targets(config: LoraConfig, candidates: list[tuple[str, bool]]) -> None:
  from jaxquant.nn._config import matches
  names = [n for n, _ in candidates]
  if config.target_modules == ALL_LINEAR:
    if not any(linear for _, linear in candidates):
      raise ValueError("target_modules='all-linear' matched no layer: the model has no "
                       "Linear/Dense layer (quantized or not)")
    return
  for pattern in config.target_modules:
    if not any(matches(n, pattern) for n in names):
      shown = ", ".join(repr(n) for n in names[:20]) + (" ..." if len(names) > 20 else "")
      raise ValueError(f"target_modules entry {pattern!r} matches no layer that can take LoRA "
                       f"adapters; accepted: names or patterns of these layers: [{shown}] "
                       f"(or {ALL_LINEAR!r})")


def merge_lora(model: Any, *, dequantize: bool = False) -> Any:
  """Fold every adapter into its base layer and remove the wrappers, in place.

  A float base gets ``kernel + lora_a @ lora_b * scaling``. A quantized base is
  dequantized, updated and quantized again with its own settings (a new, small rounding
  error), or, with ``dequantize=True``, left as a float ``nnx.Linear`` / ``nnx.Embed``.

  Linen variables are handled too (:func:`jaxquant.nn._linen_lora.merge_lora`).

  Returns:
    The model (the same object unless it is itself a single LoRA layer).
  """
  if not isinstance(model, nnx.Module):
    from jaxquant.nn import _linen_lora
    return _linen_lora.merge_lora(model, dequantize=dequantize)

  def merge(name: str, module: Any) -> Any:
    del name
    if isinstance(module, LoraLinear):
      return _merge_linear(module, dequantize)
    if isinstance(module, LoraEmbed):
      return _merge_embed(module, dequantize)
    return module

  return replace_modules(model, merge)


def _merge_linear(lora: LoraLinear, dequantize: bool) -> Any:
  base = lora.base
  a, b = lora.lora_a[...], lora.lora_b[...]
  if isinstance(base, nnx.Linear):
    kernel = base.kernel[...]
    base.kernel.set_value(_common.merged_weight(kernel, a, b, scaling=lora.scaling,
                                                dtype=kernel.dtype, kernel=True))
    return base
  state = base.quant_state
  kernel = _common.merged_weight(state, a, b, scaling=lora.scaling, dtype=base.param_dtype,
                                 kernel=True)
  if dequantize:
    return base.to_linear(kernel)
  base.kernel.set_value(_common.requantize_like(state, kernel, kernel=True))
  return base


def _merge_embed(lora: LoraEmbed, dequantize: bool) -> Any:
  base = lora.base
  a, b = lora.lora_a[...], lora.lora_b[...]
  if isinstance(base, nnx.Embed):
    table = base.embedding[...]
    base.embedding.set_value(_common.merged_weight(table, a, b, scaling=lora.scaling,
                                                   dtype=table.dtype, kernel=False))
    return base
  state = base.quant_state
  table = _common.merged_weight(state, a, b, scaling=lora.scaling, dtype=base.param_dtype,
                                kernel=False)
  if dequantize:
    return base.to_embed(table)
  base.embedding.set_value(_common.requantize_like(state, table, kernel=False))
  return base


def lora_modules(model: nnx.Module) -> list[tuple[str, Any]]:
  """``(path, wrapper)`` of every LoRA layer of an NNX model."""
  return [(n, m) for n, m in iter_modules(model) if isinstance(m, (LoraLinear, LoraEmbed))]

