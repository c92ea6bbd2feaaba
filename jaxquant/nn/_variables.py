"""The Variable type of frozen quantized weights, and filters that separate them from the
trainable state."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jaxquant.quant_state import QuantState

__all__ = ["QuantizedWeight", "lora_filter", "lora_mask", "quantized_filter", "is_lora_path"]


class QuantizedWeight(nnx.Variable):
  """A frozen quantized weight: an ``nnx.Variable`` (not an ``nnx.Param``) holding a
  :class:`~jaxquant.QuantState`.

  Because it is not a ``Param``, ``nnx.grad`` (whose default ``wrt`` is ``nnx.Param``),
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` or ``wrt=nnx.LoRAParam`` and
  ``nnx.state(model, nnx.Param)`` leave it alone; select it with
  ``nnx.state(model, jaxquant.nn.QuantizedWeight)``. Read the state with ``variable[...]``
  or ``variable.get_value()``. The QuantState's arrays are ordinary pytree leaves, so
  ``nnx.split``/``merge``, ``nnx.jit``, ``jax.device_put`` and Orbax handle it.

  It is never an array ref (``nnx.var_defaults(ref=True)`` does not apply): a QuantState is
  replaced as a whole, not updated in place.
  """

  def __init__(self, value: Any, **metadata: Any):
    metadata["ref"] = False
    super().__init__(value, **metadata)

  def __getitem__(self, key):
    if key is Ellipsis:
      return self.get_value()
    raise TypeError(f"{type(self).__name__} holds a QuantState; read it whole with [...] or "
                    f"get_value(), got index {key!r}")

  @property
  def quant_state(self) -> QuantState:
    return self.get_value()


#: Filter of the trainable LoRA adapters: ``nnx.Optimizer(model, tx, wrt=lora_filter)``,
#: ``nnx.split(model, lora_filter, ...)``, ``nnx.grad(..., argnums=nnx.DiffState(0, lora_filter))``.
lora_filter = nnx.LoRAParam

#: Filter of the frozen quantized weights: ``nnx.state(model, quantized_filter)``.
quantized_filter = QuantizedWeight

_LORA_KEYS = ("lora_a", "lora_b")


def is_lora_path(path: tuple[Any, ...]) -> bool:
  """True for a key path ending in a LoRA adapter (``.../lora_a`` or ``.../lora_b``)."""
  for key in reversed(path):
    name = getattr(key, "key", getattr(key, "name", key))
    if name == "value":
      continue
    return name in _LORA_KEYS
  return False


def lora_mask(tree: Any) -> Any:
  """Boolean pytree, True on LoRA adapter leaves: labels for ``optax.multi_transform`` (or
  the mask of ``optax.masked``).

  Works on an NNX ``State`` (``nnx.LoRAParam`` leaves) and on Linen variables or grads
  (leaves named ``lora_a`` / ``lora_b``, i.e. the ``"lora"`` collection).

  ``optax.masked(tx, lora_mask)`` alone does **not** freeze the rest: optax passes the
  masked-out gradients through unchanged, so ``apply_updates`` would add the raw gradient
  to every other parameter. Send them to ``optax.set_to_zero()`` instead.

  Example::

    tx = optax.multi_transform({True: optax.adamw(1e-4), False: optax.set_to_zero()},
                               jaxquant.nn.lora_mask)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)   # only LoRA params move
  """
  def is_var(x):
    return isinstance(x, nnx.Variable)

  def mark(path, leaf):
    if isinstance(leaf, nnx.Variable):
      flag = isinstance(leaf, nnx.LoRAParam)
      return jax.tree.map(lambda _: flag, leaf)
    return is_lora_path(path)

  return jax.tree_util.tree_map_with_path(mark, tree, is_leaf=is_var)
