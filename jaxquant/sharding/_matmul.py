"""The 4-bit matmul per shard of a mesh, through ``shard_map``.

XLA cannot partition a Pallas custom call: given a sharded weight it would gather the weight
*and* the activations and run the whole product on every device. Here each device gathers
the packed 4-bit rows of the weight (FSDP: ``N*K/2`` bytes plus scales, never a dequantized
copy) with ``jax.lax.all_gather`` and runs the kernel (or the jnp reference) on its own slice
of the batch. The backward pass gathers again and computes ``dx`` locally; the weight gets no
gradient. Inside :func:`use_mesh` every :func:`jaxquant.functional.matmul_4bit` (hence every
``Linear4bit``) takes this path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxquant import _dispatch
from jaxquant.functional import _matmul
from jaxquant.functional._cotangent import zeros_cotangent
from jaxquant.functional._fourbit import check_4bit_state, nested_of
from jaxquant.quant_state import ARRAY_FIELDS, QuantState
from jaxquant.sharding._mesh import axis_size, batch_spec, present_axes
from jaxquant.sharding._rules import PartitionRules, quant_state_specs, row_spec

__all__ = ["use_mesh", "sharded_matmul_4bit", "gather_state"]

_shard_map = getattr(jax, "shard_map", None)
if _shard_map is None:  # pragma: no cover - older jax
  from jax.experimental.shard_map import shard_map as _shard_map


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Static description of one partitioned matmul (hashable: a custom_vjp nondiff arg)."""

  mesh: Mesh
  x_spec: P
  state_specs: QuantState
  has_bias: bool
  batch_axes: tuple[str, ...]
  backend: str | None


def _run(fn, layout: _Layout, in_specs, out_specs):
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


def _kwargs(state: QuantState) -> dict:
  return dict(shape=state.shape, blocksize=state.blocksize, nested=nested_of(state))


def _forward(x, state, bias, layout: _Layout):
  def body(x, state, *bias):
    full = gather_state(state, layout.state_specs)
    return _dispatch.call("matmul_4bit", layout.backend, x, full.data, full.absmax, full.code,
                          bias[0] if bias else None, **_kwargs(full))
  args = (x, state) + ((bias,) if layout.has_bias else ())
  in_specs = (layout.x_spec, layout.state_specs) + ((P(),) if layout.has_bias else ())
  return _run(body, layout, in_specs, layout.x_spec)(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _partitioned(x, state, bias, layout):
  return _forward(x, state, bias, layout)


def _partitioned_fwd(x, state, bias, layout):
  return _forward(x, state, bias, layout), (state, bias)


def _partitioned_bwd(layout, res, g):
  state, bias = res
  split_batch = bool(tuple(layout.x_spec)) and tuple(layout.x_spec)[0] is not None

  def body(g, state):
    full = gather_state(state, layout.state_specs)
    dx = _dispatch.call("matmul_4bit_grad_input", layout.backend, g, full.data, full.absmax,
                        full.code, **_kwargs(full))
    db = jnp.sum(g.reshape(-1, g.shape[-1]).astype(jnp.float32), axis=0)
    if split_batch:
      db = jax.lax.psum(db, layout.batch_axes)
    return dx, db

  dx, db = _run(body, layout, (layout.x_spec, layout.state_specs), (layout.x_spec, P()))(g, state)
  dbias = None if bias is None else db.astype(bias.dtype)
  return dx, zeros_cotangent(state), dbias


_partitioned.defvjp(_partitioned_fwd, _partitioned_bwd)


def sharded_matmul_4bit(x: jax.Array, state: QuantState, bias: jax.Array | None = None, *,
                        mesh: Mesh, rules: PartitionRules | None = None,
                        backend: str | None = None) -> jax.Array:
  """``x @ dequant(W).T + bias`` with ``W`` split over ``rules.fsdp`` and ``x`` over
  ``rules.batch``, one kernel call per device (``shard_map``).

  Args:
    x: ``(B, ..., K)`` float; the leading dimension is split over ``rules.batch`` (if it does
      not divide, every device computes the whole product).
    state: 4-bit QuantState of a ``(N, K)`` weight, laid out as :func:`shard_state` places it
      (rows over ``rules.fsdp``); another layout is correct but costs a reshard.
    bias: ``(N,)`` or None.
    mesh: the device mesh.
    rules: :class:`PartitionRules` (default ``PartitionRules()``).
    backend: as :func:`jaxquant.functional.matmul_4bit`.

  Returns:
    ``(B, ..., N)`` in ``x.dtype``, split like ``x``. Differentiable in ``x`` and ``bias``.
  """
  check_4bit_state(state)
  if state.ndim != 2:
    raise ValueError(f"state must hold a 2-D (out_features, in_features) weight, got shape "
                     f"{state.shape}")
  if not hasattr(x, "ndim") or x.ndim < 2:
    raise ValueError(f"x must be an array with a batch dimension, (B, ..., K); got "
                     f"{getattr(x, 'shape', type(x).__name__)}")
  with use_mesh(mesh, rules):  # checks mesh, rules, x and bias as matmul_4bit does
    return _matmul.matmul_4bit(x, state, bias, backend=backend)


def _layout(mesh, rules, x, state, bias, backend) -> _Layout:
  rules = PartitionRules() if rules is None else rules
  batch_axes = present_axes(mesh, rules.batch)
  x_spec = batch_spec(mesh, batch_axes, x.shape[0]) if axis_size(mesh, batch_axes) > 1 else P()
  specs, _ = quant_state_specs(state, row_spec(mesh, rules.fsdp, state.shape), mesh)
  return _Layout(mesh, x_spec, specs, bias is not None, batch_axes, backend)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: PartitionRules | None = None) -> Iterator[Mesh]:
  """Within this context, :func:`jaxquant.functional.matmul_4bit` (every ``Linear4bit``, every
  4-bit tied head) runs per shard of ``mesh`` (see :func:`sharded_matmul_4bit`).

  The switch happens while a function is *traced*: enter the context around the first call
  of a ``jax.jit``-ed step (or inside the step function, as
  :func:`jaxquant.sharding.make_train_step` does). A function traced outside the context
  keeps its unpartitioned program.

  The weight is taken to be laid out as ``rules`` place it by default (rows over
  ``rules.fsdp``): a 4-bit weight that ``rules.overrides`` places otherwise (e.g. replicated)
  is still correct, but is re-split and gathered again at every call.

  Example::

    mesh = make_mesh(data=1, fsdp=8)
    shard_model(model, mesh)
    with use_mesh(mesh):
      y = jax.jit(lambda m, x: m(x))(model, x)
  """
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  rules = PartitionRules() if rules is None else rules
  if not isinstance(rules, PartitionRules):
    raise TypeError(f"rules must be a jaxquant.sharding.PartitionRules, got "
                    f"{type(rules).__name__}")

  def partitioned(x, state, bias, backend):
    if x.ndim < 2:  # a single vector: nothing to split, run it whole
      return _matmul._matmul_4bit(x, state, bias, backend)
    return _partitioned(x, state, bias, _layout(mesh, rules, x, state, bias, backend))

  token = _matmul.PARTITIONED.set(partitioned)
  try:
    yield mesh
  finally:
    _matmul.PARTITIONED.reset(token)
