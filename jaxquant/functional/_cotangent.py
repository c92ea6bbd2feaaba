"""Cotangents for custom VJPs: zeros for the constant (quantized) inputs, and the bias gradient."""

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


def bias_cotangent(g: jax.Array, bias: jax.Array | None) -> jax.Array | None:
  """The gradient of ``bias`` (``(N,)``) for an output cotangent ``g`` of shape ``(..., N)``:
  ``g`` summed over every leading dim in float32, cast to ``bias.dtype``; None without a bias."""
  if bias is None:
    return None
  return jnp.sum(g.reshape(-1, g.shape[-1]).astype(jnp.float32), axis=0).astype(bias.dtype)
