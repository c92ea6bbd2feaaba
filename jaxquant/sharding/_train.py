"""A sharded (Q)LoRA train step: data parallelism times FSDP of the frozen quantized weights,
one ``jax.jit`` with explicit in/out shardings.

The model is split once into a graph definition, the trainable variables (LoRA adapters by
default) and everything else (frozen: quantized base weights, norms, embeddings). Each is
placed by :func:`jaxquant.sharding.plan`; the optimizer state follows the trainable
parameters. Inside the step the 4-bit matmuls run per shard (:func:`use_mesh`): each device
gathers one layer's packed weight at a time and multiplies its own slice of the batch; XLA
reduces the adapters' gradients across the batch.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxquant.quant_state import QuantState
from jaxquant.sharding._infer import Plan, named_shardings, path_parts, plan
from jaxquant.sharding._matmul import use_mesh
from jaxquant.sharding._mesh import batch_sharding
from jaxquant.sharding._rules import PartitionRules

__all__ = ["TrainState", "ShardedTrainer", "make_train_step"]

# nnx.merge(copy=True) makes fresh Variables (flax >= 0.12.8); without it, RNG state in the
# frozen part (dropout) cannot advance inside the step.
_MERGE_KW = {"copy": True} if "copy" in inspect.signature(nnx.merge).parameters else {}


@dataclasses.dataclass(frozen=True)
class TrainState:
  """What a train step reads and returns.

  Attributes:
    params: the trainable variables (an ``nnx.State``: LoRA adapters by default).
    opt_state: the optimizer state of ``params`` (any optax state; 8-bit states hold
      QuantStates).
    frozen: the rest of the model's variables (quantized weights, norms, embeddings, ...).
  """

  params: Any
  opt_state: Any
  frozen: Any


jax.tree_util.register_dataclass(TrainState, data_fields=["params", "opt_state", "frozen"],
                                 meta_fields=[])


def _lookup_specs(tree: Any, table: dict[tuple[str, ...], Any]) -> Any:
  """Specs for ``tree`` taken by key path from ``table`` (the plan of the whole model)."""
  def one(path, x):
    if x is None:
      return None
    return table.get(path_parts(path), P())
  return jax.tree_util.tree_map_with_path(one, tree,
                                          is_leaf=lambda x: isinstance(x, QuantState))


def _spec_table(model_plan: Plan, state: Any) -> dict[tuple[str, ...], Any]:
  specs = jax.tree_util.tree_leaves(model_plan.specs,
                                    is_leaf=lambda s: isinstance(s, (P, QuantState)))
  paths = [path_parts(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, QuantState))[0]]
  if len(paths) != len(specs):  # pragma: no cover - plan keeps the structure
    raise AssertionError("plan and state disagree in structure")
  return dict(zip(paths, specs))


def _keep_host_state(tx: optax.GradientTransformation, params: Any, shardings: Any) -> Any:
  """``shardings`` of the optimizer state, in ``pinned_host`` memory for the leaves that
  ``tx.init`` puts there (an offloading transform, e.g. ``adamw8bit(..., offload=True)``)."""
  space = getattr(jax, "memory", None)
  host = getattr(getattr(space, "Space", None), "Host", None)
  if host is None:  # pragma: no cover - jax without memory spaces
    return shardings
  outs = jax.jit(tx.init).trace(params).jaxpr.out_avals
  leaves, treedef = jax.tree.flatten(shardings)
  if len(leaves) != len(outs):  # pragma: no cover - a QuantState of shardings keeps the fields
    return shardings
  return jax.tree.unflatten(treedef, [
      s.with_memory_kind("pinned_host") if getattr(a, "memory_space", None) == host else s
      for s, a in zip(leaves, outs)])


@dataclasses.dataclass(frozen=True)
class ShardedTrainer:
  """A compiled sharded train step and the layout it works on (see :func:`make_train_step`).

  Attributes:
    graphdef: the model's ``nnx.GraphDef``.
    mesh: the device mesh.
    rules: the :class:`PartitionRules`.
    state_shardings: a :class:`TrainState` of ``NamedSharding`` s.
    plan: the :class:`Plan` of the whole model state (``plan.notes`` lists what was kept
      whole).
    step: ``(TrainState, batch) -> (TrainState, loss)``, jitted with explicit in/out
      shardings; the input state is donated.
  """

  graphdef: Any
  mesh: Mesh
  rules: PartitionRules
  state_shardings: TrainState
  plan: Plan
  step: Callable[[TrainState, Any], tuple[TrainState, jax.Array]]
  init_fn: Callable[[Any, Any], TrainState]
  wrt: Any = nnx.LoRAParam

  def init(self, model: nnx.Module) -> TrainState:
    """Split ``model`` and place its variables and a fresh optimizer state on the mesh.

    Arrays of ``model`` that are already placed as the plan wants (a one-device mesh, or after
    :func:`shard_model` with the same rules) are shared, not copied, and :attr:`step` donates
    its input state: after the first step use :meth:`model` (``model``'s arrays are deleted).
    """
    _, params, frozen = nnx.split(model, self.wrt, ...)
    return self.init_fn(params, frozen)

  def batch_shardings(self, batch: Any) -> Any:
    """``NamedSharding`` s splitting the leading dimension of every array of ``batch``."""
    return batch_sharding(self.mesh, batch, batch_axes=self.rules.batch)

  def place_batch(self, batch: Any) -> Any:
    """``batch`` on the mesh, split over ``rules.batch``."""
    return jax.device_put(batch, self.batch_shardings(batch))

  def model(self, state: TrainState) -> nnx.Module:
    """The NNX model of ``state`` (e.g. to evaluate or save it)."""
    return nnx.merge(self.graphdef, state.params, state.frozen)


def make_train_step(model: nnx.Module, tx: optax.GradientTransformation,
                    loss_fn: Callable[[nnx.Module, Any], jax.Array], mesh: Mesh,
                    rules: PartitionRules | None = None, *, wrt: Any = nnx.LoRAParam,
                    batch: Any = None) -> ShardedTrainer:
  """Build the sharded train step of ``model``.

  Args:
    model: an NNX model (quantized and with adapters, e.g. through
      ``jaxquant.nn.quantize_model`` and ``jaxquant.nn.add_lora``). Only its structure and
      shapes are read here; :meth:`ShardedTrainer.init` places its values.
    tx: the optimizer of the trainable variables (``optax.adamw``,
      ``jaxquant.optim.adamw8bit`` ...); state that ``tx.init`` puts in host memory
      (``offload=True``, ``jaxquant.optim.offload_state``) stays there.
    loss_fn: ``(model, batch) -> scalar loss`` (mean over the global batch).
    mesh: e.g. ``make_mesh(data=2, fsdp=4)``.
    rules: :class:`PartitionRules` (default: base weights split over ``fsdp``, batch over
      ``data`` and ``fsdp``, adapters following their base weight).
    wrt: the filter of trainable variables (default ``nnx.LoRAParam``).
    batch: an example batch (arrays or ``ShapeDtypeStruct``) to fix the batch shardings; by
      default every batch array is split on its leading dimension over ``rules.batch``.

  Returns:
    A :class:`ShardedTrainer`; ``trainer.step(state, batch)`` runs one update.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(f"tx must be an optax.GradientTransformation, got {type(tx).__name__}")
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be a callable (model, batch) -> scalar loss, got "
                    f"{type(loss_fn).__name__}")
  rules = PartitionRules() if rules is None else rules
  graphdef, params, frozen = nnx.split(model, wrt, ...)
  if not jax.tree.leaves(params):
    raise ValueError(f"model has no variables matching wrt={wrt!r}: nothing to train (add "
                     "adapters with jaxquant.nn.add_lora, or pass another filter)")
  whole = nnx.state(model)
  model_plan = plan(whole, mesh, rules)
  table = _spec_table(model_plan, whole)
  params_specs, frozen_specs = _lookup_specs(params, table), _lookup_specs(frozen, table)
  params_plan = Plan(params_specs, {k: v for k, v in model_plan.tensor_specs.items()},
                     model_plan.shapes, {})
  abstract_opt = jax.eval_shape(tx.init, params)
  opt_specs = plan(abstract_opt, mesh, rules, follow=params_plan).specs
  opt_shardings = _keep_host_state(tx, params, named_shardings(opt_specs, mesh))
  shardings = TrainState(named_shardings(params_specs, mesh), opt_shardings,
                         named_shardings(frozen_specs, mesh))

  def init_fn(params, frozen):
    params = jax.device_put(params, shardings.params)
    frozen = jax.device_put(frozen, shardings.frozen)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return TrainState(params, opt_state, frozen)

  def step(state: TrainState, batch: Any) -> tuple[TrainState, jax.Array]:
    def loss_of(p):
      # copy: fresh Variables of this trace, so that dropout can advance its RNG counter
      m = nnx.merge(graphdef, p, state.frozen, **_MERGE_KW)
      loss = loss_fn(m, batch)
      return loss, nnx.split(m, wrt, ...)[2]  # frozen, with advanced RNG counters (dropout)
    with use_mesh(mesh, rules):  # active while the step is traced
      (loss, frozen), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, frozen), loss

  batch_sh = (batch_sharding(mesh, batch, batch_axes=rules.batch) if batch is not None
              else batch_sharding(mesh, batch_axes=rules.batch))
  jitted = jax.jit(step, in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
  return ShardedTrainer(graphdef, mesh, rules, shardings, model_plan, jitted, init_fn, wrt)
