"""Zero cotangents for the constant (quantized) inputs of custom VJPs."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def zeros_cotangent(tree: Any) -> Any:
  """A zero cotangent for every leaf: ``float0`` for integer arrays, zeros otherwise."""
  def zero(a):
    if jnp.issubdtype(a.dtype, jnp.integer) or a.dtype == jnp.bool_:
      return np.zeros(a.shape, jax.dtypes.float0)
    return jnp.zeros_like(a)
  return jax.tree.map(zero, tree)
