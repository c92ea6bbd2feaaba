"""Host-offloaded optimizer state: the JAX counterpart of bitsandbytes' paged optimizers.

bitsandbytes allocates paged state in CUDA unified memory and lets the driver migrate pages.
JAX has no unified memory; it has *memory kinds*: an array can live in the device's HBM
(``"device"``) or in page-locked host memory (``"pinned_host"``), and inside ``jit`` a
``jax.device_put(x, jax.memory.Space.Device / Host)`` is an asynchronous copy over the host link.

The 8-bit transforms with ``offload=True`` keep every state array in ``pinned_host`` and, inside
the jitted update, bring one parameter's state to the device, run the fused update, and send the
new state back, leaf by leaf. With ``offload_prefetch=k`` the copy-in of leaf ``i`` is ordered
(``lax.optimization_barrier``) after leaf ``i - k - 1`` has been updated and copied out, so at
most about ``k + 1`` leaves of state are on the device at a time while transfers overlap the
computation of the previous leaf. Device memory for the state is then the size of the largest
leaf or two, not of the whole state.

``offload_state(tx)`` turns any Optax transform into one whose state lives on the host; for the
jaxquant 8-bit transforms it switches on the leaf-by-leaf streaming above, for any other
transform it moves the whole state in at the start of ``update`` and out at the end (JAX's
documented recipe: the state is on the device only during the update).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import optax

__all__ = ["to_host", "to_device", "host_memory_supported", "offload_state", "memory_kinds",
           "order_after"]

HOST_KIND = "pinned_host"


@functools.cache
def host_memory_supported() -> bool:
  """Whether the default device has a ``pinned_host`` memory (CPU and CUDA backends do)."""
  try:
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
  except (AttributeError, RuntimeError, NotImplementedError):
    return False
  return HOST_KIND in kinds and hasattr(jax, "memory")


def _require_host_memory() -> None:
  if not host_memory_supported():
    raise ValueError(
        f"offload=True needs a '{HOST_KIND}' memory kind on {jax.devices()[0]}, which this "
        "backend does not expose; use offload=False")


def to_host(tree: Any) -> Any:
  """Every array of ``tree`` in ``pinned_host`` memory (same sharding otherwise)."""
  _require_host_memory()
  return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Host), tree)


def to_device(tree: Any) -> Any:
  """Every array of ``tree`` in device memory."""
  return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device), tree)


def order_after(tree: Any, *deps: Any) -> Any:
  """``tree`` unchanged, but not available before every array of ``deps`` has been computed."""
  if not any(jax.tree_util.tree_leaves(d) for d in deps):
    return tree
  out = jax.lax.optimization_barrier((tree, deps))
  return out[0]


def memory_kinds(tree: Any) -> dict[str, int]:
  """Bytes of the concrete arrays of ``tree`` per memory kind, e.g. ``{"pinned_host": n}``."""
  totals: dict[str, int] = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      continue
    kind = getattr(sharding, "memory_kind", None) or "device"
    totals[kind] = totals.get(kind, 0) + leaf.nbytes
  return totals


def offload_state(tx: optax.GradientTransformation, *,
                  prefetch: int | None = 1) -> optax.GradientTransformationExtraArgs:
  """``tx`` with its state kept in host memory between steps.

  Args:
    tx: any Optax transform. A jaxquant 8-bit transform streams its state leaf by leaf
      (see the module docstring); any other moves its whole state to the device for the
      update and back.
    prefetch: for jaxquant transforms, ``offload_prefetch`` (leaves in flight ahead).

  Returns:
    A transform whose ``init`` returns host-resident state and whose ``update`` returns the new
    state in host memory.
  """
  from jaxquant.optim import _core  # the core imports this module

  if isinstance(tx, _core.Optimizer8bit):
    return tx.with_options(offload=True, offload_prefetch=prefetch)
  _require_host_memory()

  def init_fn(params):
    return to_host(tx.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    inner = optax.with_extra_args_support(tx)
    new_updates, new_state = inner.update(updates, to_device(state), params, **extra_args)
    return new_updates, to_host(new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
