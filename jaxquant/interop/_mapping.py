"""Checkpoint tensors onto a Flax model by parameter name, and back.

:func:`load_into` puts ``{checkpoint name: QuantState | array}`` (from
:func:`jaxquant.interop.bnb.load`, :func:`~jaxquant.interop.bnb.iter_load` or
:func:`~jaxquant.interop.bnb.quantize_on_load`) into an NNX model, an ``nnx.State`` or Linen
variables; :func:`state_dict` gives the model's tensors under checkpoint names for
:func:`jaxquant.interop.bnb.save`.

Layouts: a QuantState is stored in torch layout ``(out_features, in_features)`` both in
bitsandbytes checkpoints and in jaxquant's layers, so it goes in unchanged; a float Linear
weight ``(out, in)`` becomes a Flax ``kernel`` ``(in, out)`` (transposed); everything else keeps
its shape. A float tensor bound for a quantized slot is quantized with that slot's settings
and a QuantState bound for a float slot is dequantized (``convert=True``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant import functional as F
from jaxquant.interop._names import NameMap, NameRules, resolve_name_map
from jaxquant.quant_state import ARRAY_FIELDS, FOUR_BIT_TYPES, QuantState

__all__ = ["load_into", "state_dict", "model_paths"]



def _is_leaf(x: Any) -> bool:
  return isinstance(x, (QuantState, nnx.Variable))


def _key(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def model_paths(target: Any) -> dict[str, Any]:
  """``{model path: current value}`` of every variable of an NNX model, ``nnx.State``, Linen
  variables or any pytree; values are QuantStates, arrays or ``ShapeDtypeStruct``s (an
  ``nnx.eval_shape`` model)."""
  return dict(_flat(_state_of(target))[0])


def _state_of(target: Any) -> Any:
  return nnx.state(target) if isinstance(target, nnx.Module) else target


def _flat(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
  out = []
  for path, leaf in leaves:
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    out.append((".".join(_key(k) for k in path), value))
  return out, treedef


def _describe(x: Any) -> str:
  if isinstance(x, QuantState):
    nested = f", nested_blocksize={x.nested_blocksize}" if x.nested else ""
    return (f"QuantState({x.quant_type}, shape={x.shape}, dtype={x.dtype.name}, "
            f"blocksize={x.blocksize}{nested})")
  return f"{np.dtype(x.dtype).name}{list(x.shape)}"


def _place(value: Any, like: Any) -> Any:
  sharding = getattr(like, "sharding", None)
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.device_put(value, sharding)
  if isinstance(value, np.ndarray) and value.dtype.itemsize == 8 and not jax.config.read(
      "jax_enable_x64"):
    return value  # JAX would narrow it
  return jnp.asarray(value)


def _dequantize(state: QuantState, dtype: Any) -> jax.Array:
  if state.quant_type in FOUR_BIT_TYPES:
    return F.dequantize_4bit(state, dtype)
  if state.quant_type == "blockwise8":
    return F.dequantize_blockwise(state, dtype)
  return F.int8_vectorwise_dequant(state.data, state.absmax).astype(dtype)


def _quantize_like(x: Any, like: QuantState) -> QuantState:
  if like.quant_type in FOUR_BIT_TYPES:
    return F.quantize_4bit(x, like.blocksize, like.nested, like.quant_type)
  if like.quant_type == "int8_rowwise":
    return F.quantize_int8(x)
  return F.quantize_blockwise(x, like.code, like.blocksize)


def _to_quant_slot(head: str, value: Any, like: QuantState, cast: bool, convert: bool) -> Any:
  if not isinstance(value, QuantState):
    if not convert:
      raise ValueError(f"{head} is a float tensor {_describe(value)} but the model holds "
                       f"{_describe(like)} there; pass convert=True to quantize it")
    if tuple(value.shape) != like.shape:
      raise ValueError(f"{head} has shape {list(value.shape)}; the model's {_describe(like)} "
                       "needs the torch layout (out_features, in_features) of that shape")
    if jnp.dtype(value.dtype) != like.dtype:
      if not cast:
        raise ValueError(f"{head} is {_describe(value)}, the model's quantized weight was made "
                         f"from {like.dtype.name}; pass cast=True to convert")
      value = jnp.asarray(value).astype(like.dtype)
    value = _quantize_like(jnp.asarray(value), like)
  keys = ("quant_type", "shape", "blocksize", "nested_blocksize")
  diff = [k for k in keys if getattr(value, k) != getattr(like, k)]
  if diff:
    raise ValueError(f"{head} is {_describe(value)} but the model holds {_describe(like)} "
                     f"({', '.join(diff)} differ); build the layer with the checkpoint's "
                     "quantization settings (quant_type, blocksize, double_quant)")
  for f in ARRAY_FIELDS:
    a, b = getattr(value, f), getattr(like, f)
    if (a is None) != (b is None) or (a is not None and (
        tuple(a.shape) != tuple(b.shape) or jnp.dtype(a.dtype) != jnp.dtype(b.dtype))):
      raise ValueError(f"{head}: QuantState.{f} is "
                       f"{'absent' if a is None else _describe(a)} but the model's is "
                       f"{'absent' if b is None else _describe(b)}")
  if value.dtype != like.dtype:
    if not cast:
      raise ValueError(f"{head} dequantizes to {value.dtype.name}, the model's weight to "
                       f"{like.dtype.name}; pass cast=True to take the model's dtype")
    value = value.replace(dtype=like.dtype)
  return value.replace(**{f: _place(getattr(value, f), getattr(like, f))
                          for f in ARRAY_FIELDS if getattr(value, f) is not None})


def _to_float_slot(head: str, path: str, value: Any, like: Any, cast: bool, convert: bool,
                   transpose_kernels: bool) -> Any:
  if isinstance(value, QuantState):
    if not convert:
      raise ValueError(f"{head} is {_describe(value)} but the model holds a float "
                       f"{_describe(like)} there; pass convert=True to dequantize it")
    value = _dequantize(value, like.dtype)
  transposed = _is_kernel(path, value) and transpose_kernels
  if transposed:
    value = value.T  # torch Linear (out, in) -> Flax kernel (in, out)
  if tuple(value.shape) != tuple(like.shape):
    how = " after the torch (out, in) -> Flax (in, out) transpose" if transposed else ""
    raise ValueError(f"{head} has shape {list(value.shape)}{how}; the model's {path!r} is "
                     f"{_describe(like)}")
  if jnp.dtype(value.dtype) != jnp.dtype(like.dtype):
    if not cast:
      raise ValueError(f"{head} is {_describe(value)}, the model's {path!r} is "
                       f"{_describe(like)}; pass cast=True to convert")
    value = value.astype(like.dtype)
  return _place(value, like)


def _is_kernel(path: str, value: Any) -> bool:
  return path.rsplit(".", 1)[-1] == "kernel" and len(value.shape) == 2


def _find(path: str, slots: Mapping[str, Any]) -> str | None:
  if path in slots:
    return path
  head, _, last = path.rpartition(".")
  wrapped = f"{head}.base.{last}" if head else f"base.{last}"  # a layer wrapped with LoRA
  return wrapped if wrapped in slots else None


def _suggest(path: str, slots: Iterable[str]) -> str:
  import difflib  # noqa: PLC0415
  close = difflib.get_close_matches(path, list(slots), n=3, cutoff=0.6)
  return f"; close model paths: {close}" if close else ""


def load_into(target: Any, params: Mapping[str, Any] | Iterable[tuple[str, Any]],
              name_map: NameMap = None, *, strict: bool = True, cast: bool = False,
              convert: bool = True, transpose_kernels: bool = True) -> Any:
  """Put checkpoint tensors into a model by parameter name.

  Args:
    target: an NNX model (updated in place; ``nnx.eval_shape(...)`` models work, so nothing
      is allocated twice), an ``nnx.State``, Linen variables or any pytree of arrays /
      QuantStates / ``ShapeDtypeStruct``s. A value takes the sharding of the slot it fills.
    params: ``{checkpoint name: QuantState | array}`` or an iterable of ``(name, value)`` pairs
      (e.g. ``bnb.iter_load(path)``: one tensor in memory at a time).
    name_map: checkpoint name -> model path (see :mod:`jaxquant.interop._names`): ``None``
      (the same), a mapping, a callable (``None`` skips the tensor) or a :class:`NameRules`,
      e.g. :data:`LLAMA_RULES`. A path to a layer wrapped by LoRA (``...q_proj.kernel``)
      also finds the wrapped base layer (``...q_proj.base.kernel``).
    strict: every tensor must be mapped and every model variable filled.
    cast: convert dtypes where the checkpoint's differ from the model's (else an error).
    convert: quantize float tensors bound for quantized slots (with the slot's quant type,
      blocksize and double quant), dequantize QuantStates bound for float slots.
    transpose_kernels: a 2-D float tensor for a slot named ``kernel`` is a torch
      ``(out, in)`` weight: transpose it.

  Returns:
    ``target`` for an NNX model (updated in place), else a new tree of the same structure.

  Raises:
    ValueError: a tensor that maps nowhere or onto a missing path (close paths are listed), a
      shape, dtype or quantization mismatch, model variables left unfilled (``strict``): the
      message names the checkpoint tensor and the model path.
  """
  tree = _state_of(target)
  flat, treedef = _flat(tree)
  slots = dict(flat)
  mapper = resolve_name_map(name_map)
  new: dict[str, Any] = {}
  source: dict[str, str] = {}
  items = params.items() if isinstance(params, Mapping) else params
  for name, value in items:
    try:
      path = mapper(name)
    except KeyError as err:
      if strict:
        raise ValueError(f"tensor {name!r} is not mapped to a model path ({err.args[0]}); "
                         "extend name_map, or pass strict=False to skip it") from None
      continue
    if path is None:
      continue
    found = _find(path, slots)
    if found is None:
      raise ValueError(f"tensor {name!r} maps to model path {path!r}, which the model does not "
                       f"have{_suggest(path, slots)}")
    if found in source:
      raise ValueError(f"tensors {source[found]!r} and {name!r} both map to {found!r}")
    head = f"tensor {name!r} (for {found!r})"
    like = slots[found]
    if isinstance(like, QuantState):
      new[found] = _to_quant_slot(head, value, like, cast, convert)
    else:
      new[found] = _to_float_slot(head, found, value, like, cast, convert, transpose_kernels)
    source[found] = name
  if strict:
    unfilled = [p for p, _ in flat if p not in new]
    if unfilled:
      shown = ", ".join(repr(p) for p in unfilled[:8])
      more = f" and {len(unfilled) - 8} more" if len(unfilled) > 8 else ""
      raise ValueError(f"the checkpoint fills no value for model variable(s) {shown}{more}; "
                       "pass strict=False to keep their current values")
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
  out = []
  for (path, leaf), (name, _) in zip(leaves, flat):
    if name not in new:
      out.append(leaf)
    elif isinstance(leaf, nnx.Variable):
      out.append(leaf.replace(new[name]))
    else:
      out.append(new[name])
  result = jax.tree_util.tree_unflatten(treedef, out)
  if isinstance(target, nnx.Module):
    nnx.update(target, result)
    return target
  return result


def state_dict(target: Any, name_map: Callable[[str], str | None] | NameRules | None = None, *,
               transpose_kernels: bool = True) -> dict[str, Any]:
  """The model's variables under checkpoint names, for :func:`jaxquant.interop.bnb.save`.

  Args:
    target: an NNX model, ``nnx.State``, Linen variables or pytree (as :func:`load_into`).
    name_map: model path -> checkpoint name: a :class:`NameRules` (its inverse is used), a
      callable (``None`` leaves the variable out), or ``None`` (names are model paths).
    transpose_kernels: float ``kernel`` variables ``(in, out)`` are written in torch layout
      ``(out, in)``. QuantStates are already in that layout.

  Returns:
    ``{checkpoint name: QuantState | array}``.

  Raises:
    ValueError: two variables mapped to one name; a variable a NameRules cannot name.
  """
  if isinstance(name_map, NameRules):
    rules = name_map

    def inverse(path: str) -> str:
      try:
        return rules.inverse(path.replace(".base.", "."))
      except KeyError as err:
        raise ValueError(f"model variable {path!r}: {err.args[0]} (merge LoRA adapters into "
                         "the weights first, or pass a callable that returns None for "
                         "variables to leave out)") from None
    namer: Callable[[str], str | None] = inverse
  else:
    namer = (lambda p: p) if name_map is None else name_map
  out: dict[str, Any] = {}
  for path, value in _flat(_state_of(target))[0]:
    name = namer(path)
    if name is None:
      continue
    if name in out:
      raise ValueError(f"model variables map to the same checkpoint name {name!r}")
    if transpose_kernels and not isinstance(value, QuantState) and _is_kernel(path, value):
      value = value.T
    out[name] = value
  return out
