"""quantize_model() for Linen: move the kernels of ``nn.Dense`` and the tables of ``nn.Embed``
out of ``"params"`` into a ``"quantized"`` collection of QuantStates.

The user's module is not changed: :func:`jaxquant.nn.quantized_apply` runs it with a method
interceptor that computes the converted layers from their QuantStates. Layers are found by
the shape of their variables: a param dict holding a 2-D float ``kernel`` (and optionally
``bias``) is a Dense, one holding only a 2-D ``embedding`` is an Embed. A layer of another
type that happens to look like one (e.g. a ``DenseGeneral`` with one input and one output
axis) is reported by a clear error when the model is applied: put it in ``skip_modules``.
Partitioning metadata boxes are unboxed (the variables returned hold plain arrays).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxquant.nn import _common
from jaxquant.nn._config import QuantConfig, path_to_name
from jaxquant.nn._linen_layers import QUANT_COLLECTION
from jaxquant.quant_state import QuantState

__all__ = ["LinenQuantWeight", "quantize_variables", "dequantize_variables", "to_dict",
           "iter_layers", "get_path", "set_path", "pop_path"]

PARAMS = "params"
_KINDS = {("dense", 4): "Dense4bit", ("dense", 8): "Dense8bitLt", ("embed", 4): "Embed4bit",
          ("embed", 8): "Embed8bit"}


@dataclasses.dataclass(frozen=True)
class LinenQuantWeight:
  """A converted Linen layer's frozen weight: the QuantState plus the static settings of
  its matmul (they travel with the weight through ``jit`` and checkpoints).

  Attributes:
    state: QuantState; torch layout ``(features, in_features)`` for a Dense kernel,
      ``(num_embeddings, features)`` for an Embed table.
    threshold: LLM.int8() outlier threshold (8-bit only).
    compute_dtype: dtype of the matmul, or ``None`` for the layer's output dtype.
  """

  state: QuantState
  threshold: float = 0.0
  compute_dtype: Any = None


jax.tree_util.register_dataclass(LinenQuantWeight, data_fields=["state"],
                                 meta_fields=["threshold", "compute_dtype"])


def to_dict(tree: Any) -> Any:
  """Nested mappings (``FrozenDict`` included) → plain dicts; partitioning boxes
  (``nn.with_partitioning`` / ``nn.with_logical_partitioning``) → their arrays, as
  ``nn.meta.unbox`` (``apply`` takes either); other values as they are."""
  if isinstance(tree, Mapping):
    return {k: to_dict(v) for k, v in tree.items()}
  if isinstance(tree, nn.meta.AxisMetadata):
    return tree.unbox()
  return tree


def get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tree


def set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def pop_path(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
  """Remove ``path``; parents left empty are removed too."""
  parents = [tree]
  for p in path[:-1]:
    parents.append(parents[-1][p])
  value = parents[-1].pop(path[-1])
  for depth in range(len(path) - 1, 0, -1):
    if not parents[depth]:
      del parents[depth - 1][path[depth - 1]]
  return value


def _is_float_matrix(x: Any) -> bool:
  return (hasattr(x, "shape") and hasattr(x, "dtype") and len(x.shape) == 2
          and jnp.issubdtype(x.dtype, jnp.floating))


def iter_layers(params: Mapping[str, Any], prefix: tuple[str, ...] = ()
                ) -> Iterator[tuple[tuple[str, ...], str, Any]]:
  """``(module path, kind, node)`` for every Dense-like (``kind="dense"``) and Embed-like
  (``"embed"``) param dict, and ``(path, "other", node)`` for any other dict holding a
  ``kernel`` (a DenseGeneral, Conv or scanned stack, left as it is)."""
  keys = set(params)
  if "kernel" in keys and keys <= {"kernel", "bias"} and _is_float_matrix(params["kernel"]):
    yield prefix, "dense", params
    return
  if keys == {"embedding"} and _is_float_matrix(params["embedding"]):
    yield prefix, "embed", params
    return
  if "kernel" in keys and not isinstance(params["kernel"], Mapping):
    yield prefix, "other", params
  for k, v in params.items():
    if isinstance(v, Mapping):
      yield from iter_layers(v, (*prefix, str(k)))


def as_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  variables = to_dict(variables)
  if PARAMS not in variables:  # the params alone
    variables = {PARAMS: variables}
  if not isinstance(variables[PARAMS], dict):
    raise TypeError(f"variables['params'] must be a mapping, got "
                    f"{type(variables[PARAMS]).__name__}")
  return variables


def quantize_variables(variables: Mapping[str, Any], config: QuantConfig,
                       progress: bool | None) -> tuple[dict[str, Any], Any]:
  """See :func:`jaxquant.nn.quantize_model` (Linen branch)."""
  from jaxquant.nn import _convert

  variables = as_variables(variables)
  params = variables[PARAMS]
  targets, skipped, names = [], [], []
  for path, kind, node in iter_layers(params):
    name = path_to_name(path)
    if kind == "other":
      skipped.append((name, f"kernel of shape {tuple(node['kernel'].shape)} is not a 2-D "
                            "Dense kernel"))
      continue
    names.append(name)
    if config.skips(name):
      skipped.append((name, "skip_modules"))
    elif kind == "embed" and not config.quantize_embeddings:
      skipped.append((name, "quantize_embeddings=False"))
    else:
      targets.append((path, kind, node))
  if not targets:
    done = [p for p, _, w in iter_quantized(to_dict(variables.get(QUANT_COLLECTION, {})))
            if isinstance(w, LinenQuantWeight)]
    raise ValueError("quantize_model found no layer to convert: the params hold no 2-D Dense "
                     f"kernel or Embed table outside skip_modules={config.skip_modules!r}"
                     + (f"; the variables are already quantized ({len(done)} layers in "
                        f"'{QUANT_COLLECTION}'): call jaxquant.nn.dequantize_model first to "
                        "quantize them again" if done else "")
                     + _convert.kept_message(skipped))
  if config.bits == 4:
    errors = []
    for path, kind, node in targets:
      what, feat = (("in_features", node["kernel"].shape[0]) if kind == "dense"
                    else ("features", node["embedding"].shape[1]))
      try:
        _common.check_4bit_layer(what, feat, quant_type=config.quant_type,
                                 blocksize=config.blocksize,
                                 where=f" of layer '{path_to_name(path)}'")
      except ValueError as e:
        errors.append(str(e))
    if errors:
      raise ValueError("; ".join(errors) + "; or add these layers to skip_modules")

  n_params = sum(int(node["kernel" if kind == "dense" else "embedding"].size)
                 for _, kind, node in targets)
  bar = _convert.progress_bar(len(targets), n_params, progress)
  quantized = to_dict(variables.get(QUANT_COLLECTION, {}))
  reports = []
  try:
    for path, kind, node in targets:
      leaf = "kernel" if kind == "dense" else "embedding"
      w = node[leaf]
      try:
        state = _quantize(w, kind, config)
      except ValueError as e:  # e.g. NaN weights: say which layer
        raise ValueError(f"quantize_model: layer '{path_to_name(path)}': {e}") from e
      threshold = config.llm_int8_threshold if config.bits == 8 else 0.0
      set_path(quantized, (*path, leaf), LinenQuantWeight(state, threshold, config.compute_dtype))
      pop_path(params, (*path, leaf))
      reports.append(_convert.LayerReport(
          path_to_name(path), _KINDS[kind, config.bits],
          tuple(w.shape), int(w.size) * w.dtype.itemsize, state.nbytes))
      bar.set_postfix_str(path_to_name(path)[-30:])
      bar.update(1)
  finally:
    bar.close()
  variables[QUANT_COLLECTION] = quantized
  summary = _convert.QuantSummary(tuple(reports), tuple(skipped),
                                  _convert.unused_patterns(config, names))
  return variables, summary


def _quantize(w: jax.Array, kind: str, config: QuantConfig) -> QuantState:
  if kind == "dense":
    if config.bits == 4:
      return _common.quantize_kernel_4bit(w, quant_type=config.quant_type,
                                          blocksize=config.blocksize,
                                          double_quant=config.double_quant)
    return _common.quantize_kernel_8bit(w)
  return _common.quantize_table(w, bits=config.bits, quant_type=config.quant_type,
                                blocksize=config.blocksize, double_quant=config.double_quant)


def iter_quantized(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
                   ) -> Iterator[tuple[tuple[str, ...], str, Any]]:
  """``(module path, leaf name, value)`` of every ``kernel`` / ``embedding`` of the
  ``"quantized"`` collection (a :class:`LinenQuantWeight` or a layer's own QuantState)."""
  for k, v in tree.items():
    if k in ("kernel", "embedding") and isinstance(v, (LinenQuantWeight, QuantState)):
      yield prefix, k, v
    elif isinstance(v, Mapping):
      yield from iter_quantized(v, (*prefix, str(k)))


def dequantize_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Put the float weights of layers converted by ``quantize_model`` back into ``"params"``
  (in the dtype they were quantized from). The weights of ``Dense4bit``/``Embed4bit``...
  modules (plain QuantStates) stay in ``"quantized"``: those modules read nothing else."""
  variables = as_variables(variables)
  quantized = to_dict(variables.get(QUANT_COLLECTION, {}))
  for path, leaf, w in list(iter_quantized(quantized)):
    if not isinstance(w, LinenQuantWeight):
      continue
    table = _common.dequantize_table(w.state, w.state.dtype)
    set_path(variables[PARAMS], (*path, leaf), table.T if leaf == "kernel" else table)
    pop_path(quantized, (*path, leaf))
  if quantized:
    variables[QUANT_COLLECTION] = quantized
  else:
    variables.pop(QUANT_COLLECTION, None)
  return variables
