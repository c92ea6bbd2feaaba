"""A quantized linear run per shard of a mesh through ``shard_map``: the machinery shared by
the 4-bit matmul and the int8 linears.

XLA cannot partition a Pallas custom call: given a sharded weight it would gather the weight
*and* the activations and run the whole product on every device. Here each device gathers the
*stored* arrays of the weight's rows (packed codes or int8 values plus their scales, never a
dequantized copy) with ``jax.lax.all_gather`` and runs the op on its own slice of the batch.
The backward pass gathers again and computes ``dx`` locally; the bias gradient is summed over
the batch axes (``psum``); the weight is a constant (zero cotangent).

What is computed on the gathered weight is a :class:`ShardOp` (one per family: 4-bit in
:mod:`jaxquant.sharding._matmul`, int8 in :mod:`jaxquant.sharding._int8_matmul`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxquant.functional._cotangent import zeros_cotangent
from jaxquant.quant_state import ARRAY_FIELDS, QuantState
from jaxquant.sharding._mesh import axis_size, batch_spec, present_axes
from jaxquant.sharding._rules import PartitionRules, quant_state_specs, row_spec

__all__ = ["Layout", "ShardOp", "make_layout", "run", "gather_state", "partitioned"]

_shard_map = getattr(jax, "shard_map", None)
if _shard_map is None:  # pragma: no cover - older jax
  from jax.experimental.shard_map import shard_map as _shard_map


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static description of one partitioned call (hashable: a custom_vjp nondiff argument).

  Attributes:
    mesh: the device mesh.
    x_spec: split of the activations (``P(batch_axes)`` on the leading dim, or ``P()``).
    state_specs: a QuantState holding the PartitionSpec of each of the weight's arrays.
    has_bias: whether a bias is passed.
    batch_axes: mesh axes of the batch (those present in ``mesh``).
    backend: the dispatch backend (``None``, ``"auto"``, ``"xla"``, ``"pallas"``, ...).
  """

  mesh: Mesh
  x_spec: P
  state_specs: QuantState
  has_bias: bool
  batch_axes: tuple[str, ...]
  backend: str | None

  @property
  def split_batch(self) -> bool:
    """Whether each device holds only a slice of the batch."""
    entries = tuple(self.x_spec)
    return bool(entries) and entries[0] is not None


@dataclasses.dataclass(frozen=True)
class ShardOp:
  """What one device computes on the gathered weight. Subclasses are frozen dataclasses
  (hashable, compared by value: a custom_vjp nondiff argument)."""

  def forward(self, x: jax.Array, state: QuantState, bias: jax.Array | None,
              layout: Layout) -> jax.Array:
    """``(b, ..., K)`` local activations, whole weight ``(N, K)`` → ``(b, ..., N)``."""
    raise NotImplementedError

  def grad_input(self, g: jax.Array, state: QuantState, layout: Layout) -> jax.Array:
    """``(b, ..., N)`` local output cotangent → ``(b, ..., K)`` (``g @ dequant(W)``)."""
    raise NotImplementedError


def make_layout(mesh: Mesh, rules: PartitionRules, x: jax.Array, state: QuantState,
                bias: jax.Array | None, backend: str | None) -> Layout:
  """The layout of ``x @ W.T`` with ``x`` split over ``rules.batch`` (when its leading dim
  divides) and ``W``'s rows over ``rules.fsdp`` (when they divide)."""
  batch_axes = present_axes(mesh, rules.batch)
  x_spec = batch_spec(mesh, batch_axes, x.shape[0]) if axis_size(mesh, batch_axes) > 1 else P()
  specs, _ = quant_state_specs(state, row_spec(mesh, rules.fsdp, state.shape), mesh)
  return Layout(mesh, x_spec, specs, bias is not None, batch_axes, backend)


def run(fn, layout: Layout, in_specs, out_specs):
  """``shard_map`` of ``fn`` over ``layout.mesh`` (no replication check: the bodies psum)."""
  return _shard_map(fn, mesh=layout.mesh, in_specs=in_specs, out_specs=out_specs,
                    check_vma=False)


def _gather(x: jax.Array, spec: P) -> jax.Array:
  for dim, axes in enumerate(tuple(spec)):
    if axes is not None:
      x = jax.lax.all_gather(x, axes, axis=dim, tiled=True)
  return x


def gather_state(local: QuantState, specs: QuantState) -> QuantState:
  """Inside ``shard_map``: the whole QuantState from this device's shard (``all_gather`` of
  every split array along its split dimensions)."""
  arrays = {}
  for f in ARRAY_FIELDS:
    a, s = getattr(local, f), getattr(specs, f)
    arrays[f] = a if a is None or s is None else _gather(a, s)
  return local.replace(**arrays)


def _forward(x, state, bias, layout: Layout, op: ShardOp):
  def body(x, state, *bias):
    return op.forward(x, gather_state(state, layout.state_specs), bias[0] if bias else None,
                      layout)
  args = (x, state) + ((bias,) if layout.has_bias else ())
  in_specs = (layout.x_spec, layout.state_specs) + ((P(),) if layout.has_bias else ())
  return run(body, layout, in_specs, layout.x_spec)(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def partitioned(x: jax.Array, state: QuantState, bias: jax.Array | None, layout: Layout,
                op: ShardOp) -> jax.Array:
  """``op`` per shard of ``layout.mesh``: ``(B, ..., K)`` → ``(B, ..., N)`` split like ``x``.
  Differentiable in ``x`` and ``bias``; the weight gets a zero cotangent."""
  return _forward(x, state, bias, layout, op)


def _partitioned_fwd(x, state, bias, layout, op):
  return _forward(x, state, bias, layout, op), (state, bias)


def _partitioned_bwd(layout, op, res, g):
  state, bias = res

  def body(g, state):
    dx = op.grad_input(g, gather_state(state, layout.state_specs), layout)
    db = jnp.sum(g.reshape(-1, g.shape[-1]).astype(jnp.float32), axis=0)
    if layout.split_batch:
      db = jax.lax.psum(db, layout.batch_axes)
    return dx, db

  dx, db = run(body, layout, (layout.x_spec, layout.state_specs), (layout.x_spec, P()))(g, state)
  dbias = None if bias is None else db.astype(bias.dtype)
  return dx, zeros_cotangent(state), dbias


partitioned.defvjp(_partitioned_fwd, _partitioned_bwd)
