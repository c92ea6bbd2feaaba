"""Run an unchanged Linen module on quantized variables and LoRA adapters.

:func:`intercept` installs a ``flax.linen.intercept_methods`` interceptor that

- computes an ``nn.Dense`` whose kernel is in the ``"quantized"`` collection through
  :func:`jaxquant.functional.matmul_4bit` / :func:`jaxquant.functional.int8_linear`, and an
  ``nn.Embed`` whose table is there by a quantized row lookup / tied-head matmul (its
  ``setup`` is skipped: the table is not in ``"params"``; its ``embedding`` attribute is the
  dequantized table, for code that reads it);
- adds ``dropout(x) @ lora_a @ lora_b * scaling`` to every Dense/Embed-like layer (float,
  converted, or a jaxquant Linen layer) that has an adapter in the ``"lora"`` collection.
  Dropout is active only when a ``"dropout"`` rng is passed to ``apply``.

No ``lax.dot_general`` or ``promote_dtype`` is patched: only the methods of these layer types
are intercepted, and only when their variables say so.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxquant.nn import _common
from jaxquant.nn._linen_convert import LinenQuantWeight
from jaxquant.nn._linen_layers import (QUANT_COLLECTION, Dense4bit, Dense8bitLt, Embed4bit,
                                       Embed8bit)
from jaxquant.nn._linen_lora import ADAPTER, LORA_COLLECTION, LoraWeights
from jaxquant.quant_state import FOUR_BIT_TYPES

__all__ = ["intercept", "quantized_apply"]

_DENSE = (nn.Dense, Dense4bit, Dense8bitLt)
_EMBED = (nn.Embed, Embed4bit, Embed8bit)
# The undecorated methods of these layer classes: a subclass that overrides one (and calls
# ``super()``) runs its own code, and only the inner call is computed quantized.
_OWN_METHODS = frozenset(inspect.unwrap(getattr(cls, name)) for cls in _DENSE + _EMBED
                         for name in ("__call__", "attend", "setup") if hasattr(cls, name))


def _own_method(context: Any) -> bool:
  fn = getattr(context.orig_method, "func", None)  # functools.partial(method, module)
  return fn is None or fn in _OWN_METHODS


def _variable(module: nn.Module, col: str, name: str) -> Any:
  return module.get_variable(col, name) if module.has_variable(col, name) else None


def _where(module: nn.Module) -> str:
  path = "/".join(str(p) for p in module.scope.path) if module.scope is not None else "?"
  return f"{type(module).__name__} at '{path or '<root>'}'"


def _first_arg(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> Any:
  return args[0] if args else kwargs[name]


def _quantized_dense(module: nn.Dense, w: LinenQuantWeight, x: jax.Array) -> jax.Array:
  state = w.state
  if x.shape[-1] != state.shape[1] or module.features != state.shape[0]:
    raise ValueError(f"{_where(module)}: its quantized kernel holds a ({state.shape[1]}, "
                     f"{state.shape[0]}) weight, but the layer has features={module.features} "
                     f"and gets inputs of shape {tuple(x.shape)}")
  bias = None
  if module.use_bias:
    bias = _variable(module, "params", "bias")
    if bias is None:
      raise ValueError(f"{_where(module)} has use_bias=True but no 'bias' in params")
    bias = nn.meta.unbox(bias)  # a boxed (nn.with_partitioning) bias, as self.param reads it
  out_dtype = _common.output_dtype(x.dtype, module.param_dtype, module.dtype)
  if state.quant_type in FOUR_BIT_TYPES:
    return _common.linear_4bit(x, state, bias, out_dtype=out_dtype,
                               compute_dtype=w.compute_dtype)
  return _common.linear_8bit(x, state, bias, out_dtype=out_dtype, compute_dtype=w.compute_dtype,
                             threshold=w.threshold)


def _embed_dtype(module: nn.Embed, w: LinenQuantWeight) -> Any:
  del w
  return jnp.dtype(module.dtype if module.dtype is not None else module.param_dtype)


def _dropout(module: nn.Module, lora: LoraWeights, x: jax.Array) -> jax.Array:
  if lora.dropout <= 0 or not module.has_rng("dropout"):
    return x
  keep = 1.0 - lora.dropout
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x.shape)
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


def _lora_linear(module: nn.Module, lora: LoraWeights, x: jax.Array, y: jax.Array) -> jax.Array:
  cdt = lora.dtype if lora.dtype is not None else lora.lora_a.dtype
  h = _dropout(module, lora, x).astype(cdt)
  d = (h @ lora.lora_a.astype(cdt)) @ lora.lora_b.astype(cdt)
  return y + (d * jnp.asarray(lora.scaling, cdt)).astype(y.dtype)


def _lora_lookup(lora: LoraWeights, ids: jax.Array, y: jax.Array) -> jax.Array:
  cdt = lora.dtype if lora.dtype is not None else lora.lora_a.dtype
  rows = jnp.take(lora.lora_a, ids, axis=0).astype(cdt)
  d = rows @ lora.lora_b.astype(cdt)
  return y + (d * jnp.asarray(lora.scaling, cdt)).astype(y.dtype)


def _lora_attend(lora: LoraWeights, q: jax.Array, y: jax.Array) -> jax.Array:
  cdt = lora.dtype if lora.dtype is not None else lora.lora_a.dtype
  d = (q.astype(cdt) @ lora.lora_b.astype(cdt).T) @ lora.lora_a.astype(cdt).T
  return y + (d * jnp.asarray(lora.scaling, cdt)).astype(y.dtype)


def _interceptor(next_fun, args, kwargs, context):
  module, method = context.module, context.method_name
  if module.scope is None:
    return next_fun(*args, **kwargs)
  if isinstance(module, _DENSE + _EMBED) and not _own_method(context):
    return next_fun(*args, **kwargs)  # a subclass's override: its super() call comes back
  if isinstance(module, _DENSE):
    if method != "__call__":
      return next_fun(*args, **kwargs)
    x = _first_arg(args, kwargs, "inputs")
    w = _variable(module, QUANT_COLLECTION, "kernel") if isinstance(module, nn.Dense) else None
    y = _quantized_dense(module, w, x) if w is not None else next_fun(*args, **kwargs)
    lora = _variable(module, LORA_COLLECTION, ADAPTER)
    return y if lora is None else _lora_linear(module, lora, x, y)
  if isinstance(module, _EMBED):
    w = _variable(module, QUANT_COLLECTION, "embedding") if isinstance(module, nn.Embed) else None
    if method == "setup" and w is not None:
      # the table is quantized: nothing to create in "params". Code that reads
      # ``embed.embedding`` gets the dequantized table (under jit, computed only if read).
      module.embedding = _common.dequantize_table(w.state, module.param_dtype)
      return None
    if method not in ("__call__", "attend"):
      return next_fun(*args, **kwargs)
    lora = _variable(module, LORA_COLLECTION, ADAPTER)
    if method == "__call__":
      ids = _first_arg(args, kwargs, "inputs")
      y = (_common.embed_lookup(w.state, ids, _embed_dtype(module, w)) if w is not None
           else next_fun(*args, **kwargs))
      return y if lora is None else _lora_lookup(lora, ids, y)
    q = _first_arg(args, kwargs, "query")
    # nn.Embed.attend promotes the query with the table (dtype=None), unlike its lookup
    attend_dtype = _common.output_dtype(q.dtype, module.param_dtype, module.dtype)
    y = (_common.embed_attend(w.state, q, attend_dtype, threshold=w.threshold)
         if w is not None else next_fun(*args, **kwargs))
    return y if lora is None else _lora_attend(lora, q, y)
  if method == "__call__":
    for col, name in ((QUANT_COLLECTION, "kernel"), (QUANT_COLLECTION, "embedding"),
                      (LORA_COLLECTION, ADAPTER)):
      if isinstance(_variable(module, col, name), (LinenQuantWeight, LoraWeights)):
        raise ValueError(
            f"{_where(module)} has a jaxquant '{col}/{name}' variable, but only nn.Dense / "
            "nn.Embed (and jaxquant's Linen layers) can be run quantized or with LoRA; "
            "leave this layer out (QuantConfig.skip_modules, LoraConfig.target_modules)")
  return next_fun(*args, **kwargs)


@contextlib.contextmanager
def intercept() -> Iterator[None]:
  """Context in which Linen ``apply`` runs converted Dense/Embed layers quantized and adds
  LoRA adapters::

    with jaxquant.nn.intercept():
      y = model.apply(qvariables, x)

  The interception happens at trace time, so it may wrap a call inside ``jax.jit``.
  """
  with nn.intercept_methods(_interceptor):
    yield


def quantized_apply(module: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> Any:
  """``module.apply(variables, *args, **kwargs)`` inside :func:`intercept`: the user's
  unchanged Linen module, run with the variables from :func:`jaxquant.nn.quantize_model` /
  :func:`jaxquant.nn.add_lora`. Keyword arguments (``method``, ``rngs``, ``mutable``, ...)
  are ``apply``'s.

  Returns:
    What ``module.apply`` returns.
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"module must be a flax.linen Module, got {type(module).__name__}")
  with intercept():
    return module.apply(variables, *args, **kwargs)
