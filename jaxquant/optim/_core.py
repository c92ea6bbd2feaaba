"""The generic 8-bit transform: per-leaf state selection, fused update dispatch, offload.

Every ``scale_by_*_8bit`` transform and alias is an :class:`Optimizer8bit` built from a
:class:`Spec`: the optimizer family, how its scalars depend on the step, the learning rate and
weight decay folded into the same pass (``u = -lr * (d + wd * p)``), and the storage
:class:`~jaxquant.optim.Options`. For each parameter leaf the update calls one fused op
(``optim_update_8bit`` on quantized state, ``optim_update_fp32`` on leaves kept in 32 bits).

An :class:`Optimizer8bit` is an ``optax.GradientTransformationExtraArgs`` (it chains, masks,
partitions and injects hyperparameters like any Optax transform) that also knows how to apply
itself in the same pass: :func:`update_and_apply` writes the new parameters from the kernel,
saving the separate ``optax.apply_updates`` pass over parameters and updates.

Non-finite gradients are not skipped (bitsandbytes' 2-state kernel instead zeroes the state of
such elements and leaves their parameters): as in Optax, the update of a NaN or inf element is
not finite, and in 8-bit state it also spoils the absmax of its block, so the whole block's
state stays unusable. Where gradients may overflow (float16 loss scaling), wrap the optimizer in
``optax.apply_if_finite``, which keeps the previous 8-bit state bit for bit on such a step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxquant import _dispatch
from jaxquant.optim import _clipping, _config, _offload, _state
from jaxquant.quant_state import QuantState
import pallas_kernels
from pallas_kernels.optim_update import families

__all__ = ["Spec", "Optimizer8bit", "build", "update_and_apply", "NO_PARAMS_MSG"]

NO_PARAMS_MSG = (
    "this 8-bit transform needs the current parameters (weight decay, max_unorm or a fused "
    "apply), but update() got params=None; call tx.update(grads, state, params)")

ScalarOrSchedule = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Spec:
  """What an 8-bit transform computes (static).

  Attributes:
    family: a key of ``pallas_kernels.optim_update.families.FAMILIES``.
    state_cls: NamedTuple with fields ``count``, one per state (``fields``) and ``gnorm``.
    fields: state field names, in the family's state order.
    init_values: initial value of each state (e.g. Adagrad's initial accumulator).
    scalars: ``scalars(count, step) -> {name: value}`` for the family's hyperparameters, where
      ``count`` is the int32 step count before this update and ``step = count + 1``.
    learning_rate: scalar or schedule; ``None`` for a ``scale_by_*`` transform (returns the
      direction itself).
    weight_decay: decoupled weight decay (scalar or schedule), multiplied by the learning rate.
    wd_mask: Optax-style mask (pytree of bools or callable of params) for the weight decay.
    flags: static ``(name, bool)`` pairs for the family math.
    options: storage options.
  """
  family: str
  state_cls: type
  fields: tuple[str, ...]
  init_values: tuple[float, ...]
  scalars: Callable[[jax.Array, jax.Array], dict[str, Any]]
  learning_rate: ScalarOrSchedule | None = None
  weight_decay: ScalarOrSchedule = 0.0
  wd_mask: Any = None
  flags: tuple[tuple[str, bool], ...] = ()
  options: _config.Options = dataclasses.field(default_factory=_config.Options)

  @property
  def fam(self) -> families.Family:
    return families.FAMILIES[self.family]


class Optimizer8bit(optax.GradientTransformationExtraArgs):
  """An Optax transform with blockwise 8-bit state (see :func:`build`); ``spec`` says what it
  computes, :meth:`with_options` rebuilds it with other storage options."""

  spec: Spec

  def with_options(self, **changes: Any) -> "Optimizer8bit":
    return build(dataclasses.replace(self.spec, options=self.spec.options.replace(**changes)))


def _value_at(x: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  return jnp.asarray(x(count) if callable(x) else x, jnp.float32)


def _init(spec: Spec, params: Any):
  opts = spec.options
  fam = spec.fam
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keep = _config.keep_32bit_leaves(opts, params)
  per_field = []
  for k, value in enumerate(spec.init_values):
    states = []
    for leaf, fp32 in zip(leaves, keep):
      if fp32:
        states.append(jnp.full(leaf.shape, value, jnp.float32))
      else:
        states.append(_state.full_8bit(leaf, value, fam.signed[k], opts.blocksize))
    per_field.append(treedef.unflatten(states))
  gnorm = None
  if opts.percentile_clipping < 100:
    gnorm = treedef.unflatten([_clipping.init_history() for _ in leaves])
  moments = dict(zip(spec.fields, per_field))
  if opts.offload:
    moments, gnorm = _offload.to_host((moments, gnorm))
  return spec.state_cls(count=jnp.zeros([], jnp.int32), gnorm=gnorm, **moments)


def _hparams(spec: Spec, count: jax.Array) -> jax.Array:
  step = optax.safe_int32_increment(count)
  lr = -1.0 if spec.learning_rate is None else _value_at(spec.learning_rate, count)
  values = {"lr": lr, "wd": _value_at(spec.weight_decay, count), "gscale": 1.0}
  values.update(spec.scalars(count, step.astype(jnp.float32)))
  names = ("lr", "wd", "gscale") + spec.fam.hparams
  vec = [jnp.asarray(values[n], jnp.float32) for n in names]
  vec += [jnp.zeros([], jnp.float32)] * (families.HP_SIZE - len(vec))
  return jnp.stack(vec)


def _wd_leaves(spec: Spec, treedef, params: Any, n: int) -> list[bool]:
  """Per leaf: whether weight decay applies. The mask (or what a callable mask returns) has the
  structure of the parameters or, as in ``optax.masked``, a prefix of it (``{"enc": False}``
  covers every leaf under ``"enc"``)."""
  if spec.wd_mask is None:
    return [True] * n
  mask = spec.wd_mask(params) if callable(spec.wd_mask) else spec.wd_mask
  try:
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask, params)
    return [bool(m) for m in treedef.flatten_up_to(full)]
  except (ValueError, TypeError) as e:
    raise ValueError("mask must be a pytree of bools with the structure of the parameters or a "
                     f"prefix of it (or a callable of the parameters returning one): {e}") from None


def _fp32_backend(backend: str | None) -> str | None:
  """The backend for a leaf kept in float32: an explicit kernel backend ("pallas",
  "interpret") selects the fused kernel of the 8-bit leaves; float32 leaves have only the XLA
  update (elementwise, XLA fuses it), so they take that one instead of an error."""
  if backend in ("pallas", "interpret") and backend not in pallas_kernels.implementations(
      "optim_update_fp32"):
    return "xla"
  return backend


def _leaf_update(spec: Spec, g, p, moments, hp, write: str, on_host: bool):
  """One leaf: ``(out, new_moments)``. With ``offload`` the new moments go back to host memory;
  the moments arrive on the device (``on_host=False``, see ``_offload.LeafStream``) or, with
  ``offload_chunk``, in host memory and 8-bit ones are streamed in chunks
  (``_offload.stream_blocks``)."""
  opts = spec.options
  kwargs = dict(family=spec.family, flags=spec.flags, write=write, max_unorm=opts.max_unorm)
  if not _state.is_quant_state(moments[0]):
    if on_host:
      moments = _offload.to_device(moments)
    out, new = _dispatch.call("optim_update_fp32", _fp32_backend(opts.backend), g, p,
                              tuple(moments), hp, **kwargs)
    return out, (_offload.to_host(tuple(new)) if opts.offload else tuple(new))
  if opts.kernel_config is not None:
    kwargs["config"] = opts.kernel_config
  maps = tuple(m.code for m in moments)
  if on_host:
    maps = _offload.to_device(maps)

  def update_blocks(gb, pb, codes, absmax):
    return _dispatch.call("optim_update_8bit", opts.backend, gb, pb, codes, absmax, maps, hp,
                          codebook="dynamic", **kwargs)

  bs = opts.blocksize
  # Blocked views keep the parameter's leading dimensions (so a sharded parameter stays
  # sharded the same way); only the chunked stream flattens them.
  gb = _state.to_blocks(g, bs)
  pb = None if p is None else _state.to_blocks(p, bs)
  codes = tuple(_state.to_blocks(m.data, bs) for m in moments)
  absmax = tuple(m.absmax.reshape(gb.shape[:-1]) for m in moments)
  n_blocks = gb.size // bs
  chunks = _offload.n_chunks(n_blocks, bs, opts.offload_chunk) if on_host else 1
  if chunks > 1 and opts.max_unorm == 0:
    flat = lambda x: None if x is None else x.reshape(n_blocks, -1)  # noqa: E731
    out, new_codes, new_absmax = _offload.stream_blocks(
        update_blocks, flat(gb), flat(pb), tuple(flat(c) for c in codes),
        tuple(a.reshape(n_blocks) for a in absmax), chunks)
    out = out.reshape(gb.shape)
    new_codes = tuple(q.reshape(gb.shape) for q in new_codes)
  else:
    if on_host:
      codes, absmax = _offload.to_device((codes, absmax))
    out, new_codes, new_absmax = update_blocks(gb, pb, codes, absmax)
    if opts.offload:
      new_codes, new_absmax = _offload.to_host((new_codes, new_absmax))
  new = tuple(m.replace(data=_state.from_blocks(q, m.shape), absmax=a.reshape(m.absmax.shape))
              for m, q, a in zip(moments, new_codes, new_absmax))
  return _state.from_blocks(out, tuple(g.shape)), new


def _needs_params(spec: Spec, write: str) -> bool:
  return (write == "param" or spec.options.max_unorm > 0
          or not _config.is_static_zero(spec.weight_decay))


def _as_quant_state(moment: Any, grad: Any, blocksize: int) -> Any:
  """A moment as this optimizer stores it.

  ``flax.nnx.Optimizer`` keeps each state leaf in a Variable and, after its first update,
  writes a QuantState back as a mapping of its arrays (``nnx.State``), dropping the static
  fields. Those are known here -- a moment is always a ``blockwise8`` float32 state of the
  gradient's shape -- so the QuantState is rebuilt; arrays and QuantStates pass through.
  """
  if not isinstance(moment, Mapping):
    return moment
  if not {"data", "absmax", "code"} <= set(moment):
    raise TypeError(f"optimizer state: expected a QuantState (or a mapping of its arrays "
                    f"'data', 'absmax', 'code') for a gradient of shape {tuple(grad.shape)}, "
                    f"got a mapping with keys {sorted(moment)}")
  raw = lambda x: x.get_value() if hasattr(x, "get_value") else x  # noqa: E731
  return QuantState(data=raw(moment["data"]), absmax=raw(moment["absmax"]),
                    code=raw(moment["code"]), nested_absmax=None, nested_code=None,
                    offset=None, shape=tuple(grad.shape), dtype=jnp.float32,
                    blocksize=blocksize, quant_type="blockwise8")


def _as_given(moment: Any, new: Any) -> Any:
  """``new`` in the form ``moment`` came in: a mapping of a QuantState's arrays stays a mapping
  of the same type (wrappers such as ``optax.MultiSteps`` and ``optax.apply_if_finite`` select
  between the old and the new state, which must have one structure)."""
  if isinstance(moment, Mapping) and _state.is_quant_state(new):
    return type(moment)({k: getattr(new, k) for k in moment})
  return new


def _run(spec: Spec, grads: Any, state: NamedTuple, params: Any, write: str):
  """Shared body of ``update`` (write="update") and the fused apply (write="param")."""
  opts = spec.options
  needs_p = _needs_params(spec, write)
  if needs_p and params is None:
    raise ValueError(NO_PARAMS_MSG)
  count = state.count
  step = optax.safe_int32_increment(count)
  hp = _hparams(spec, count)
  g_leaves, treedef = jax.tree_util.tree_flatten(grads)
  n = len(g_leaves)
  p_leaves = treedef.flatten_up_to(params) if needs_p else [None] * n
  given = [treedef.flatten_up_to(getattr(state, f)) for f in spec.fields]
  field_leaves = [[_as_quant_state(m, g, opts.blocksize) for m, g in zip(leaves, g_leaves)]
                  for leaves in given]
  gnorm_leaves = (treedef.flatten_up_to(state.gnorm) if state.gnorm is not None
                  else [None] * n)
  wd_on = _wd_leaves(spec, treedef, params, n) if needs_p else [True] * n
  outs, new_fields, new_gnorm = [], [], []
  # Offloaded state without chunking comes to the device leaf by leaf, a bounded number of
  # leaves ahead of its update (double buffering, see _offload.LeafStream).
  stream = None
  if opts.offload and opts.offload_chunk is None:
    stream = _offload.LeafStream([tuple(leaves[i] for leaves in field_leaves)
                                  for i in range(n)])
  for i, g in enumerate(g_leaves):
    moments = (stream.get(i) if stream is not None
               else tuple(leaves[i] for leaves in field_leaves))
    hist = gnorm_leaves[i]
    if opts.offload and hist is not None:
      hist = _offload.to_device(hist)
    hp_i = hp if wd_on[i] else hp.at[families.WD].set(0.0)
    if hist is not None:
      scale, hist = _clipping.percentile_scale(g, hist, step, opts.percentile_clipping)
      hp_i = hp_i.at[families.GSCALE].set(scale)
      if opts.offload:
        hist = _offload.to_host(hist)
    out, new = _leaf_update(spec, g, p_leaves[i], moments, hp_i, write,
                            on_host=opts.offload and stream is None)
    if stream is not None:
      stream.done(i, out)
      # The maps stay where they were (host): only data and absmax came back from the device.
      new = tuple(m.replace(code=h.code) if _state.is_quant_state(m) else m
                  for m, h in zip(new, (leaves[i] for leaves in field_leaves)))
    outs.append(out)
    new_fields.append(new)
    new_gnorm.append(hist)
  fields = {f: treedef.unflatten([_as_given(given[k][i], nf[k])
                                  for i, nf in enumerate(new_fields)])
            for k, f in enumerate(spec.fields)}
  gnorm = None if state.gnorm is None else treedef.unflatten(new_gnorm)
  return treedef.unflatten(outs), spec.state_cls(count=step, gnorm=gnorm, **fields)


def build(spec: Spec) -> Optimizer8bit:
  """The :class:`Optimizer8bit` computing ``spec``."""

  def init_fn(params):
    return _init(spec, params)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    return _run(spec, updates, state, params, "update")

  tx = Optimizer8bit(init_fn, update_fn)
  tx.spec = spec
  return tx


def update_and_apply(tx: optax.GradientTransformation, grads: Any, state: Any,
                     params: Any) -> tuple[Any, Any]:
  """One optimizer step: ``(new_params, new_state)``.

  For an :class:`Optimizer8bit` the fused kernel writes the new parameters directly (one pass
  over gradient, parameter and state); for any other transform this is ``tx.update`` followed
  by ``optax.apply_updates``, so the same training loop works with every optimizer.
  """
  if isinstance(tx, Optimizer8bit):
    return _run(tx.spec, grads, state, params, "param")
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state
