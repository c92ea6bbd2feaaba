"""Save and load LoRA adapters alone (a small checkpoint), through
:mod:`jaxquant.checkpoint` (Orbax).

The checkpoint is a nested dict keyed by the module path of each adapted layer:
``{<path parts>...: {"lora_a": (in, r), "lora_b": (r, out), "scaling": alpha / r}}``, the
same for NNX models and Linen variables. Loading validates every shape, dtype and scaling
against the model's current adapters (add them first with :func:`jaxquant.nn.add_lora`
and the same config) before any array is read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from jaxquant import checkpoint
from jaxquant.nn._linen_convert import as_variables, set_path, to_dict
from jaxquant.nn._linen_lora import LORA_COLLECTION, LoraWeights, _iter_adapters
from jaxquant.nn._lora import lora_modules

__all__ = ["save_lora", "load_lora", "lora_tree"]


def _nnx_adapters(model: nnx.Module) -> list[tuple[tuple[str, ...], Any]]:
  return [(tuple(name.split(".")) if name else (), m) for name, m in lora_modules(model)]


def _linen_adapters(variables: Mapping[str, Any]) -> list[tuple[tuple[str, ...], LoraWeights]]:
  lora = variables.get(LORA_COLLECTION) if isinstance(variables, Mapping) else None
  return [] if not lora else [(path, w) for path, _, w in _iter_adapters(lora)]


def lora_tree(model_or_variables: Any) -> dict[str, Any]:
  """The adapters of an NNX model or of Linen variables as the nested dict that
  :func:`save_lora` writes (arrays are the model's own, not copies).

  Raises:
    ValueError: the model holds no adapter.
  """
  if isinstance(model_or_variables, nnx.Module):
    items = [(p, m.lora_a[...], m.lora_b[...], m.scaling)
             for p, m in _nnx_adapters(model_or_variables)]
  else:
    items = [(p, w.lora_a, w.lora_b, w.scaling)
             for p, w in _linen_adapters(to_dict(model_or_variables))]
  if not items:
    bare = (not isinstance(model_or_variables, nnx.Module)
            and any(isinstance(x, LoraWeights) for x in jax.tree.leaves(
                to_dict(model_or_variables), is_leaf=lambda x: isinstance(x, LoraWeights))))
    if bare:  # the 'lora' collection alone, e.g. the one popped out to train
      raise ValueError("got the 'lora' collection alone; pass the variables that hold it: "
                       "{**variables, 'lora': lora}")
    raise ValueError("the model holds no LoRA adapters; add them with jaxquant.nn.add_lora "
                     "(the same LoraConfig as when they were saved) before saving or loading")
  tree: dict[str, Any] = {}
  for path, a, b, scaling in items:
    if not path:
      raise ValueError("the model itself is a LoRA layer; save the model that holds it")
    set_path(tree, path, {"lora_a": a, "lora_b": b, "scaling": float(scaling)})
  return tree


def save_lora(path: str | os.PathLike, model_or_variables: Any, *, force: bool = False) -> str:
  """Write the LoRA adapters alone to ``path`` (an Orbax checkpoint directory).

  Args:
    path: directory; must not exist unless ``force``.
    model_or_variables: an NNX model with adapters, or Linen variables with a ``"lora"``
      collection.
    force: overwrite an existing checkpoint.

  Returns:
    The absolute path written.
  """
  return checkpoint.save(path, lora_tree(model_or_variables), force=force).path


def load_lora(path: str | os.PathLike, model_or_variables: Any) -> Any:
  """Read adapters written by :func:`save_lora` into a model that has the same adapters.

  NNX: the model's ``lora_a`` / ``lora_b`` are replaced in place; returns the model. Linen:
  returns new variables with the loaded ``"lora"`` collection.

  Raises:
    ValueError: the model has no adapters, or they differ from the checkpoint's (a missing or
      extra layer, another rank, shape, dtype or scaling: the message names the layer).
  """
  target = lora_tree(model_or_variables)
  abstract = checkpoint.abstract(target)
  loaded = checkpoint.restore(path, abstract)
  _check_scalings(target, loaded, str(path))
  if isinstance(model_or_variables, nnx.Module):
    for p, m in _nnx_adapters(model_or_variables):
      node = _lookup(loaded, p)
      m.lora_a.set_value(node["lora_a"])
      m.lora_b.set_value(node["lora_b"])
    return model_or_variables
  variables = as_variables(model_or_variables)
  new_lora: dict[str, Any] = {}
  for p, w in _linen_adapters(variables):
    node = _lookup(loaded, p)
    set_path(new_lora, (*p, "adapter"),
             dataclasses.replace(w, lora_a=node["lora_a"], lora_b=node["lora_b"]))
  variables[LORA_COLLECTION] = new_lora
  return variables


def _lookup(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _check_scalings(target: Any, loaded: Any, where: str) -> None:
  pairs = jax.tree_util.tree_leaves_with_path(target)
  for key_path, want in pairs:
    if not (key_path and getattr(key_path[-1], "key", None) == "scaling"):
      continue
    got = _lookup(loaded, tuple(k.key for k in key_path))
    if not np.isclose(float(got), float(want)):
      name = "/".join(str(k.key) for k in key_path[:-1])
      raise ValueError(f"checkpoint {where}: adapter {name!r} was saved with scaling "
                       f"(alpha / r) {float(got)}, the model's is {float(want)}; use the "
                       "LoraConfig the adapters were trained with")
