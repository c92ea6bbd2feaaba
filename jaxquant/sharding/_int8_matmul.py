"""The int8 linears per shard of a mesh, through ``shard_map``.

Inside :func:`jaxquant.sharding.use_mesh`, :func:`jaxquant.functional.int8_linear`
(LLM.int8(): ``Linear8bitLt``, ``Dense8bitLt``, ``Embed8bit.attend``) and
:func:`jaxquant.functional.int8_weight_only_linear` run as the 4-bit matmul does
(:mod:`jaxquant.sharding._per_shard`): each device all-gathers the int8 rows of the weight
(``data`` int8 ``(N, K)`` and the row scales ``absmax`` float32 ``(N,)``, split over the fsdp
axes: ``N*K + 4N`` bytes, never a dequantized copy), runs the op (Pallas kernel or jnp
reference) on its own slice of the batch, and in the backward pass computes
``dx = dy @ dequant(W)`` locally and sums the bias gradient over the batch axes.

Outlier columns. LLM.int8() decomposes the input columns holding an element with
``|x| >= threshold`` in *any* row of the call: those columns are zeroed in every row of the
int8 operand and multiplied in 16 bits instead. Chosen from a device's own rows, a column that
is an outlier only in another device's rows would be int8-rounded here and exact there: an
int8 quantization error, not a float rounding difference. So the mask is made global: each
device takes the per-column max of ``|x|`` over its rows, ``jax.lax.pmax`` over the batch
axes gives the whole batch's, and one extra row holding that max where it reaches the
threshold (0 elsewhere) is appended to the local rows before the op, so the op flags exactly
the whole batch's outlier columns; the extra row's output is dropped. Row scales are per row
(outlier elements excluded), so the other rows are unaffected and the result equals the
single-device one. This costs a ``(K,)`` all-reduce and one more row per call, and only
happens with ``threshold > 0`` and a split batch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxquant import _dispatch
from jaxquant.functional import _int8, _int8_matmul
from jaxquant.sharding._per_shard import Layout, ShardOp, make_layout, partitioned
from jaxquant.sharding._rules import PartitionRules

__all__ = ["LLMInt8", "WeightOnlyInt8", "int8_hooks"]


def _grad_input(g, state, layout: Layout):
  return _dispatch.call("int8_linear_grad_input", layout.backend, g, state.data, state.absmax)


def _global_outlier_row(x2: jax.Array, threshold: float, batch_axes: tuple[str, ...]):
  """``(1, K)`` in ``x2.dtype``: the whole batch's column max of ``|x|`` where it reaches
  ``threshold`` (an outlier in every device's eyes, exactly as in the op's own test), else 0."""
  colmax = jnp.max(jnp.abs(x2.astype(jnp.float32)), axis=0)
  colmax = jax.lax.pmax(colmax, batch_axes)
  row = jnp.where(colmax >= jnp.float32(threshold), colmax, jnp.float32(0))
  return row.astype(x2.dtype)[None, :]  # exact: colmax is a value of x2.dtype


@dataclasses.dataclass(frozen=True)
class LLMInt8(ShardOp):
  """``int8_linear`` on the gathered int8 weight, with the whole batch's outlier columns.

  Attributes:
    threshold: the outlier threshold (``0``: plain w8a8, nothing to agree on).
  """

  threshold: float

  def forward(self, x, state, bias, layout: Layout):
    if not (self.threshold > 0 and layout.split_batch):
      return _dispatch.call("int8_linear", layout.backend, x, state.data, state.absmax, bias,
                            threshold=self.threshold)
    k, n = x.shape[-1], state.shape[0]
    x2 = x.reshape(-1, k)
    rows = jnp.concatenate([x2, _global_outlier_row(x2, self.threshold, layout.batch_axes)])
    y = _dispatch.call("int8_linear", layout.backend, rows, state.data, state.absmax, bias,
                       threshold=self.threshold)
    return y[:-1].reshape(*x.shape[:-1], n)

  def grad_input(self, g, state, layout: Layout):
    return _grad_input(g, state, layout)


@dataclasses.dataclass(frozen=True)
class WeightOnlyInt8(ShardOp):
  """``int8_weight_only_linear`` on the gathered int8 weight (rows are independent)."""

  def forward(self, x, state, bias, layout: Layout):
    return _dispatch.call("int8_weight_only_linear", layout.backend, x, state.data,
                          state.absmax, bias)

  def grad_input(self, g, state, layout: Layout):
    return _grad_input(g, state, layout)


def int8_hooks(mesh: Mesh, rules: PartitionRules) -> tuple[tuple[object, Callable], ...]:
  """``(ContextVar, fn)`` pairs that :func:`jaxquant.sharding.use_mesh` sets: the per-shard
  ``int8_linear`` and ``int8_weight_only_linear`` on ``mesh`` under ``rules``. Their callers
  have validated the arguments; a single vector (``x.ndim < 2``) runs whole."""

  def llm_int8(x, state, bias, threshold, backend):
    if x.ndim < 2:
      return _int8._int8_linear(x, state, bias, threshold, backend)
    return partitioned(x, state, bias, make_layout(mesh, rules, x, state, bias, backend),
                       LLMInt8(threshold))

  def weight_only(x, state, bias, backend):
    if x.ndim < 2:
      return _int8_matmul._weight_only(x, state, bias, backend)
    return partitioned(x, state, bias, make_layout(mesh, rules, x, state, bias, backend),
                       WeightOnlyInt8())

  return ((_int8.PARTITIONED, llm_int8), (_int8_matmul.PARTITIONED, weight_only))
