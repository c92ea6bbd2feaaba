"""Placing quantized models and their optimizer state on a mesh, and measuring where the bytes
went."""

from __future__ import annotations

import collections
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxquant.quant_state import ARRAY_FIELDS, QuantState
from jaxquant.sharding._infer import Plan, named_shardings, plan
from jaxquant.sharding._rules import PartitionRules

__all__ = ["shard_state", "shard_model", "state_shardings", "per_device_bytes",
           "model_shardings"]

_HOST_KINDS = ("pinned_host", "unpinned_host")


def state_shardings(tree: Any, mesh: Mesh, rules: PartitionRules | None = None, *,
                    follow: Any = None) -> Any:
  """``NamedSharding`` for every array of ``tree`` (a QuantState gets a QuantState of
  shardings), decided by :func:`jaxquant.sharding.plan`. ``follow``: the parameters (or their
  :class:`Plan`) when ``tree`` is their optimizer state. Works on abstract trees
  (``ShapeDtypeStruct``), e.g. for ``jax.jit(..., out_shardings=...)`` of an ``init``."""
  if follow is not None and not isinstance(follow, Plan):
    follow = plan(follow, mesh, rules)
  return named_shardings(plan(tree, mesh, rules, follow=follow).specs, mesh)


def shard_state(tree: Any, mesh: Mesh, rules: PartitionRules | None = None, *,
                follow: Any = None) -> Any:
  """``tree`` moved onto ``mesh`` (``jax.device_put`` with :func:`state_shardings`).

  Args:
    tree: pytree of arrays and QuantStates: model state, LoRA adapters, optimizer state.
    mesh: e.g. :func:`jaxquant.sharding.make_mesh`.
    rules: :class:`PartitionRules`.
    follow: the parameters (or their plan) when ``tree`` is their optimizer state.

  Returns:
    The same structure with ``jax.Array`` leaves laid out on ``mesh``, each in the memory it
    was in (host-offloaded optimizer state stays in ``pinned_host``). Every QuantState's
    arrays are split consistently (see :func:`jaxquant.sharding.quant_state_specs`).
  """
  def keep_memory(x, s):
    kind = getattr(getattr(x, "sharding", None), "memory_kind", None)
    return s if kind is None or kind == s.memory_kind else s.with_memory_kind(kind)

  shardings = jax.tree.map(keep_memory, tree,
                           state_shardings(tree, mesh, rules, follow=follow))
  return jax.device_put(tree, shardings)


def model_shardings(model: nnx.Module, mesh: Mesh,
                    rules: PartitionRules | None = None) -> nnx.State:
  """The ``nnx.State`` of ``model`` with a ``NamedSharding`` in place of every array."""
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
  return state_shardings(nnx.state(model), mesh, rules)


def shard_model(model: nnx.Module, mesh: Mesh, rules: PartitionRules | None = None
                ) -> nnx.Module:
  """Place every variable of an NNX ``model`` on ``mesh``, in place.

  Quantized base weights are split over ``rules.fsdp`` (their rows), LoRA adapters follow
  their base weight (or are replicated, ``rules.lora``), large float arrays are split on
  their first divisible dimension, the rest is replicated.

  Returns:
    ``model`` (the same object), its arrays now on ``mesh``.
  """
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, model_shardings(model, mesh, rules)))
  return model


def per_device_bytes(tree: Any) -> dict[jax.Device, int]:
  """Bytes of ``tree``'s arrays held by each device (all of the addressable shards).

  A QuantState counts its codes, scales and codebooks. Replicated arrays count once per
  device, split ones by their shard: for quantized weights split over ``n`` devices this is
  about ``total / n`` per device. Arrays in host memory (``pinned_host``: offloaded optimizer
  state) are not in the device's memory and do not count.
  """
  out: dict[jax.Device, int] = collections.defaultdict(int)
  for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QuantState)):
    arrays = ([getattr(leaf, f) for f in ARRAY_FIELDS] if isinstance(leaf, QuantState)
              else [leaf])
    for a in arrays:
      if not isinstance(a, jax.Array) or a.sharding.memory_kind in _HOST_KINDS:
        continue
      for shard in a.addressable_shards:
        out[shard.device] += shard.data.nbytes
  return dict(out)
