"""PartitionSpecs for a whole pytree: quantized weights, LoRA adapters following their base
weight, optimizer state following its parameters.

Entries are named by their key path joined with ``/`` (``"layers/0/attn/q/base/kernel"``);
the ``value`` attribute of an ``nnx.Variable`` is left out of names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxquant.nn._linen_layers import QUANT_COLLECTION
from jaxquant.nn._linen_lora import ADAPTER, LORA_COLLECTION
from jaxquant.quant_state import QuantState
from jaxquant.sharding._rules import (PartitionRules, array_spec, fit_spec, normalize_spec,
                                      quant_state_specs, row_spec)

__all__ = ["Plan", "plan", "partition_specs", "named_shardings", "path_parts"]

_LORA = ("lora_a", "lora_b")
# Where a LoRA wrapper keeps the weight it adapts, relative to the wrapper (NNX).
_BASES = (("base", "kernel"), ("kernel",), ("base", "embedding"), ("embedding",))
# Linen: the adapter of module path M is ``lora/M/adapter/{lora_a,lora_b}``; its base weight is
# ``quantized/M/kernel`` (a LinenQuantWeight: ``.../state``) or ``params/M/kernel`` (float), or
# ``embedding`` in place of ``kernel`` for an Embed (see ``jaxquant.nn._linen_lora``).
_LINEN_BASES = tuple((coll, leaf) + tail for leaf in ("kernel", "embedding")
                     for coll in (QUANT_COLLECTION, "params") for tail in (("state",), ()))


def _is_leaf(x: Any) -> bool:
  return isinstance(x, QuantState)


def _is_spec_leaf(x: Any) -> bool:
  return isinstance(x, (QuantState, P)) or x is None


def _key(k: Any) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_parts(path: tuple[Any, ...]) -> tuple[str, ...]:
  """A ``jax.tree_util`` key path as strings, without nnx's ``value`` attribute."""
  return tuple(p for p in (_key(k) for k in path) if p != "value")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Specs of a tree, and what could not be split as the rules asked.

  Attributes:
    specs: the tree with a ``PartitionSpec`` per array (a QuantState of specs for a
      QuantState); same structure as the input.
    tensor_specs: key path (tuple of str) -> ``PartitionSpec`` of the logical tensor of every
      array/QuantState entry (what the optimizer state of that entry follows).
    shapes: key path -> logical shape of every array/QuantState entry.
    notes: ``name -> [reason, ...]`` for entries kept whole (in part) although a split was
      asked.
  """

  specs: Any
  tensor_specs: dict[tuple[str, ...], P]
  shapes: dict[tuple[str, ...], tuple[int, ...]]
  notes: dict[str, list[str]]


def _shape(x: Any) -> tuple[int, ...] | None:
  if isinstance(x, QuantState):
    return x.shape
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return tuple(x.shape)
  return None


def _is_float(x: Any) -> bool:
  try:
    return jnp.issubdtype(x.dtype, jnp.floating)
  except TypeError:  # extended dtypes (PRNG keys)
    return False


def _suffix_match(parts: tuple[str, ...], table: dict[tuple[str, ...], Any]) -> Any:
  for i in range(len(parts)):
    hit = table.get(parts[i:])
    if hit is not None:
      return hit
  return None


def _lora_follow(parts: tuple[str, ...], shape: tuple[int, ...],
                 tensors: dict[tuple[str, ...], tuple[P, bool]], mesh: Mesh) -> P | None:
  """The spec of adapter ``parts`` derived from its base weight, or None if none is found."""
  parent, which = parts[:-1], parts[-1]
  candidates = [(parent + base, base[-1] == "embedding") for base in _BASES]
  if len(parts) >= 4 and parts[0] == LORA_COLLECTION and parts[-2] == ADAPTER:
    module = parts[1:-2]
    candidates += [((base[0],) + module + base[1:], base[1] == "embedding")
                   for base in _LINEN_BASES]
  for path, is_embedding in candidates:
    found = tensors.get(path)
    if found is None:
      continue
    spec, torch_layout = found
    if len(shape) < 2 or len(tuple(spec)) > len(shape):  # not an adapter of this base
      continue
    # a stacked layer (nnx.vmap): base (*L, in, out), adapters (*L, in, r) / (*L, r, out)
    s = normalize_spec(spec, len(shape))
    lead, (d0, d1) = s[:-2], s[-2:]
    if not is_embedding:
      in_axes, out_axes = (d1, d0) if torch_layout else (d0, d1)
      want = (in_axes, None) if which == "lora_a" else (None, out_axes)
    else:  # embedding table (num, features)
      want = (d0, None) if which == "lora_a" else (None, d1)
    return fit_spec(mesh, P(*lead, *want), shape)
  return None


def plan(tree: Any, mesh: Mesh, rules: PartitionRules | None = None, *,
         follow: Plan | None = None) -> Plan:
  """Decide the PartitionSpec of every array of ``tree``.

  Order of precedence for an entry: ``follow`` (an entry whose path ends with the path of an
  entry of ``follow`` with the same logical shape takes its split: optimizer state follows
  its parameters), then ``rules.overrides``, then the LoRA rule, then the defaults: a
  QuantState's rows over ``rules.fsdp``, a float array's first divisible dimension over
  ``rules.fsdp`` when it has ``rules.min_size`` elements or more, anything else replicated.

  Args:
    tree: any pytree of arrays, ``ShapeDtypeStruct`` and QuantStates (an ``nnx.State``, a
      dict of Linen variables, an optax state).
    mesh: the device mesh.
    rules: :class:`PartitionRules` (default ``PartitionRules()``).
    follow: the plan of the parameters, when ``tree`` is their optimizer state.

  Returns:
    A :class:`Plan`.
  """
  rules = PartitionRules() if rules is None else rules
  if not isinstance(rules, PartitionRules):
    raise TypeError(f"rules must be a jaxquant.sharding.PartitionRules, got "
                    f"{type(rules).__name__}")
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
  named = [(path_parts(p), x) for p, x in leaves]
  followed = {}
  if follow is not None:
    followed = {k: (spec, follow.shapes[k]) for k, spec in follow.tensor_specs.items()}
  tensors: dict[tuple[str, ...], tuple[P, bool]] = {}
  chosen: dict[int, P | None] = {}
  notes: dict[str, list[str]] = {}
  deferred = []
  for i, (parts, x) in enumerate(named):
    shape = _shape(x)
    if shape is None:
      chosen[i] = None
      continue
    name = "/".join(parts)
    hit = _suffix_match(parts, followed) if followed else None
    if hit is not None and tuple(hit[1]) == shape:
      spec = fit_spec(mesh, hit[0], shape)
    elif (o := rules.override(name)) is not None:
      if shape and len(tuple(o)) > len(shape):
        raise ValueError(f"rules.overrides gives {name!r} (shape {shape}) the PartitionSpec "
                         f"{o}, which has more entries than its rank {len(shape)}; make the "
                         "pattern match only the arrays it is meant for (e.g. end it with "
                         "'kernel$')")
      spec = fit_spec(mesh, o, shape) if shape else P()
      if tuple(normalize_spec(spec, len(shape))) != tuple(normalize_spec(o, len(shape))):
        notes.setdefault(name, []).append(f"override {o} fitted to {spec} for shape {shape}")
    elif parts and parts[-1] in _LORA and not isinstance(x, QuantState):
      deferred.append(i)
      continue
    elif isinstance(x, QuantState):
      spec = row_spec(mesh, rules.fsdp, shape)
    elif _is_float(x):
      spec = array_spec(mesh, rules.fsdp, shape, rules.min_size)
    else:
      spec = P()
    chosen[i] = spec
    tensors[parts] = (spec, isinstance(x, QuantState))
  for i in deferred:
    parts, x = named[i]
    shape = _shape(x)
    spec = P()
    if rules.lora == "follow":
      spec = _lora_follow(parts, shape, tensors, mesh) or P()
    chosen[i] = spec
    tensors[parts] = (spec, False)
  out = []
  for i, (parts, x) in enumerate(named):
    spec = chosen[i]
    if spec is None:  # a Python scalar or other non-array leaf: replicated
      out.append(P())
      continue
    if isinstance(x, QuantState):
      qs, why = quant_state_specs(x, spec, mesh)
      if why:
        notes.setdefault("/".join(parts), []).extend(why)
      out.append(qs)
    else:
      out.append(spec)
  shapes = {parts: _shape(x) for parts, x in named if _shape(x) is not None}
  tensor_specs = {k: v[0] for k, v in tensors.items()}
  return Plan(jax.tree_util.tree_unflatten(treedef, out), tensor_specs, shapes, notes)


def partition_specs(tree: Any, mesh: Mesh, rules: PartitionRules | None = None, *,
                    follow: Any = None) -> Any:
  """``tree`` with a ``PartitionSpec`` for each array (see :func:`plan`).

  Args:
    tree: pytree of arrays / ``ShapeDtypeStruct`` / QuantStates.
    mesh: the device mesh.
    rules: :class:`PartitionRules`.
    follow: the parameters (a pytree) or their :class:`Plan`, when ``tree`` is their
      optimizer state: state entries take the split of the parameter they belong to.
  """
  if follow is not None and not isinstance(follow, Plan):
    follow = plan(follow, mesh, rules)
  return plan(tree, mesh, rules, follow=follow).specs


def named_shardings(specs: Any, mesh: Mesh) -> Any:
  """``NamedSharding(mesh, spec)`` for every ``PartitionSpec`` of ``specs``."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s) if isinstance(s, P) else s, specs,
                      is_leaf=lambda s: isinstance(s, P) or s is None)
