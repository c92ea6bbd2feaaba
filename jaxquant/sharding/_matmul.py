"""The 4-bit matmul per shard of a mesh, through ``shard_map``, and :func:`use_mesh`, which
routes every quantized linear (4-bit and int8) through its per-shard path.

XLA cannot partition a Pallas custom call: given a sharded weight it would gather the weight
*and* the activations and run the whole product on every device. Here each device gathers
the packed 4-bit rows of the weight (FSDP: ``N*K/2`` bytes plus scales, never a dequantized
copy) with ``jax.lax.all_gather`` and runs the kernel (or the jnp reference) on its own slice
of the batch. The backward pass gathers again and computes ``dx`` locally; the weight gets no
gradient (see :mod:`jaxquant.sharding._per_shard`). Inside :func:`use_mesh` every
:func:`jaxquant.functional.matmul_4bit` (hence every ``Linear4bit``) takes this path, and so
do the int8 linears (:mod:`jaxquant.sharding._int8_matmul`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import jax
from jax.sharding import Mesh

from jaxquant import _dispatch
from jaxquant.functional import _matmul
from jaxquant.functional._fourbit import check_4bit_state, nested_of
from jaxquant.quant_state import QuantState
from jaxquant.sharding._int8_matmul import int8_hooks
from jaxquant.sharding._per_shard import Layout, ShardOp, make_layout, partitioned
from jaxquant.sharding._rules import PartitionRules

__all__ = ["use_mesh", "sharded_matmul_4bit"]


def _kwargs(state: QuantState) -> dict:
  return dict(shape=state.shape, blocksize=state.blocksize, nested=nested_of(state))


@dataclasses.dataclass(frozen=True)
class _FourBit(ShardOp):
  """``matmul_4bit`` on the gathered packed weight."""

  def forward(self, x, state, bias, layout: Layout):
    return _dispatch.call("matmul_4bit", layout.backend, x, state.data, state.absmax,
                          state.code, bias, **_kwargs(state))

  def grad_input(self, g, state, layout: Layout):
    return _dispatch.call("matmul_4bit_grad_input", layout.backend, g, state.data,
                          state.absmax, state.code, **_kwargs(state))

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


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: PartitionRules | None = None) -> Iterator[Mesh]:
  """Within this context every quantized linear runs per shard of ``mesh`` (``shard_map``):
  :func:`jaxquant.functional.matmul_4bit` (every ``Linear4bit``, every 4-bit tied head, see
  :func:`sharded_matmul_4bit`), :func:`jaxquant.functional.int8_linear` (``Linear8bitLt``,
  ``Dense8bitLt``, ``Embed8bit.attend``) and
  :func:`jaxquant.functional.int8_weight_only_linear`. Each device gathers the stored
  quantized rows of the weight (never a dequantized copy) and multiplies its own slice of the
  batch; results equal the single-device ones (LLM.int8()'s outlier columns are chosen over the
  whole batch). A single vector (``x.ndim < 2``) runs whole.

  The switch happens while a function is *traced*: enter the context around the first call
  of a ``jax.jit``-ed step (or inside the step function, as
  :func:`jaxquant.sharding.make_train_step` does). A function traced outside the context
  keeps its unpartitioned program. Leaving the context (also by an exception) restores the
  previous behaviour.

  The weight is taken to be laid out as ``rules`` place it by default (rows over
  ``rules.fsdp``): a quantized weight that ``rules.overrides`` places otherwise (e.g.
  replicated) is still correct, but is re-split and gathered again at every call.

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

  def four_bit(x, state, bias, backend):
    if x.ndim < 2:  # a single vector: nothing to split, run it whole
      return _matmul._matmul_4bit(x, state, bias, backend)
    return partitioned(x, state, bias, make_layout(mesh, rules, x, state, bias, backend),
                       _FourBit())

  hooks = ((_matmul.PARTITIONED, four_bit),) + int8_hooks(mesh, rules)
  tokens = []
  try:
    for var, fn in hooks:
      tokens.append((var, var.set(fn)))
    yield mesh
  finally:
    for var, token in reversed(tokens):
      var.reset(token)
