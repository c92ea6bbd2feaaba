"""quantize_model(): swap the Linear/Dense and Embed layers of an existing model for
quantized ones, with a progress bar and a report of bytes before and after."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterable, Mapping

import jax
from flax import nnx

from jaxquant.nn import _common
from jaxquant.nn._config import QuantConfig
from jaxquant.nn._embed import Embedding4bit, Embedding8bit
from jaxquant.nn._graph import iter_modules, module_paths, replace_modules
from jaxquant.nn._linear import Linear4bit, Linear8bitLt

__all__ = ["quantize_model", "dequantize_model", "QuantSummary", "LayerReport",
           "memory_footprint", "PROGRESS_MIN_PARAMS"]

logger = logging.getLogger("jaxquant.nn")

#: ``progress=None`` shows a progress bar when the layers to convert hold at least this many
#: weights.
PROGRESS_MIN_PARAMS = 50_000_000


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """One converted layer: dotted path, new layer kind, weight shape and weight bytes."""
  name: str
  kind: str
  shape: tuple[int, ...]
  bytes_before: int
  bytes_after: int

  @property
  def params(self) -> int:
    return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class QuantSummary:
  """What :func:`quantize_model` did. ``str(summary)`` is a table.

  Attributes:
    layers: one :class:`LayerReport` per converted layer.
    skipped: ``(path, reason)`` of the Linear/Dense/Embed layers left in floating point.
    unused_skip_patterns: entries of ``skip_modules`` that matched no layer.
  """
  layers: tuple[LayerReport, ...]
  skipped: tuple[tuple[str, str], ...]
  unused_skip_patterns: tuple[str, ...] = ()

  @property
  def params(self) -> int:
    """Weights converted."""
    return sum(r.params for r in self.layers)

  @property
  def bytes_before(self) -> int:
    """Bytes of the converted weights before conversion (in their float dtype)."""
    return sum(r.bytes_before for r in self.layers)

  @property
  def bytes_after(self) -> int:
    """Bytes of their quantized states (codes, scales, codebooks)."""
    return sum(r.bytes_after for r in self.layers)

  @property
  def bf16_bytes(self) -> int:
    """Bytes the converted weights would take in bfloat16 (the usual baseline)."""
    return 2 * self.params

  @property
  def ratio_vs_bf16(self) -> float:
    return self.bytes_after / max(self.bf16_bytes, 1)

  def __str__(self) -> str:
    rows = [f"{'layer':<40} {'kind':<14} {'shape':<14} {'before':>12} {'after':>12}"]
    for r in self.layers:
      rows.append(f"{r.name[-40:]:<40} {r.kind:<14} {str(r.shape):<14} "
                  f"{r.bytes_before:>12,} {r.bytes_after:>12,}")
    for name, reason in self.skipped:
      rows.append(f"{name[-40:]:<40} {'(kept float)':<14} {reason}")
    rows.append(f"{len(self.layers)} layers, {self.params:,} weights: {self.bytes_before:,} B -> "
                f"{self.bytes_after:,} B ({self.ratio_vs_bf16:.3f}x of bfloat16)")
    if self.unused_skip_patterns:
      rows.append(f"skip_modules entries that matched nothing: {self.unused_skip_patterns}")
    return "\n".join(rows)


def memory_footprint(model_or_variables: Any) -> int:
  """Bytes of every array of an NNX model's state or of Linen variables."""
  tree = nnx.state(model_or_variables) if isinstance(model_or_variables, nnx.Module) else (
      model_or_variables)
  # dtype.itemsize, not jnp.dtype(...): PRNG key arrays (an nnx.Dropout's rng stream) have an
  # extended dtype that numpy cannot interpret
  return sum(int(math.prod(a.shape)) * a.dtype.itemsize
             for a in jax.tree.leaves(tree) if hasattr(a, "shape") and hasattr(a, "dtype"))


def progress_bar(total: int, params: int, progress: bool | None):
  """A tqdm bar over ``total`` layers (on when ``progress``, or when ``progress`` is None and
  the model is large), or a no-op stand-in."""
  show = params >= PROGRESS_MIN_PARAMS if progress is None else bool(progress)
  if show:
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="jaxquant: quantizing", unit="layer")
  return _NoBar()


class _NoBar:
  def update(self, n: int = 1) -> None:
    del n

  def set_postfix_str(self, s: str) -> None:
    del s

  def close(self) -> None:
    pass


def kept_message(skipped: list[tuple[str, str]]) -> str:
  """``"; kept in floating point: 'a' (reason), ..."`` for the no-layer-to-convert error."""
  if not skipped:
    return ""
  shown = ", ".join(f"'{n}' ({why})" for n, why in skipped[:8])
  return f"; kept in floating point: {shown}" + (" ..." if len(skipped) > 8 else "")


def unused_patterns(config: QuantConfig, names: Iterable[str]) -> tuple[str, ...]:
  from jaxquant.nn._config import matches
  names = list(names)
  return tuple(p for p in config.skip_modules if not any(matches(n, p) for n in names))


def quantize_model(model: Any, config: QuantConfig, *, progress: bool | None = None,
                   verbose: bool = False, return_summary: bool = False) -> Any:
  """Convert a model's Linear/Dense and Embed layers to quantized ones, in one call.

  NNX: every ``nnx.Linear`` becomes :class:`Linear4bit` / :class:`Linear8bitLt` and every
  ``nnx.Embed`` :class:`Embedding4bit` / :class:`Embedding8bit` (exact types, so LoRA layers
  and user subclasses are left alone), **in place**: the model object is rewritten (shared
  layers are converted once). Kernels, biases, dtypes and precision carry over.

  Linen: pass the variables (``{"params": ...}``, or the params alone). The kernels and
  tables of the ``Dense`` / ``Embed`` modules move to a ``"quantized"`` collection as
  :class:`LinenQuantWeight` (a QuantState plus its matmul settings); run the **unchanged**
  module with :func:`jaxquant.nn.quantized_apply`.

  ``LinearGeneral`` / ``Einsum`` / ``Conv`` layers and stacked (scanned) kernels stay in
  floating point and are listed in ``summary.skipped``. The summary (bytes before and after)
  is also logged to the ``"jaxquant.nn"`` logger at INFO level.

  Args:
    model: an ``nnx.Module``, or Linen variables.
    config: :class:`QuantConfig`.
    progress: tqdm progress bar over layers; ``None``: only for models whose layers to
      convert hold >= :data:`PROGRESS_MIN_PARAMS` weights.
    verbose: print the :class:`QuantSummary` table.
    return_summary: return ``(result, summary)``.

  Returns:
    NNX: the model (same object). Linen: the new variables dict. With ``return_summary``, a
    ``(result, QuantSummary)`` pair.

  Raises:
    ValueError: ``config.blocksize`` does not divide the input features of a layer to
      convert (nothing is changed then; the message names the layers), the model holds
      no layer to convert (the message lists those kept in float and why), or a layer's
      weights hold NaN/Inf (or, for LLM.int8(), values beyond float16's range): the message
      names it; NNX layers converted before it stay converted.
    TypeError: ``model`` is neither an NNX module nor a Linen variables mapping.
  """
  if not isinstance(config, QuantConfig):
    raise TypeError(f"config must be a jaxquant.nn.QuantConfig, got {type(config).__name__}")
  if isinstance(model, nnx.Module):
    result, summary = _quantize_nnx(model, config, progress)
  elif isinstance(model, Mapping):
    from jaxquant.nn import _linen_convert
    result, summary = _linen_convert.quantize_variables(model, config, progress)
  else:
    raise TypeError(f"model must be an nnx.Module or Linen variables (a mapping with "
                    f"'params'), got {type(model).__name__}")
  if verbose:
    print(summary)
  logger.info("quantize_model: %d layers, %s B -> %s B (%.3fx of bfloat16)", len(summary.layers),
              f"{summary.bytes_before:,}", f"{summary.bytes_after:,}", summary.ratio_vs_bf16)
  return (result, summary) if return_summary else result


def _quantize_nnx(model: nnx.Module, config: QuantConfig, progress: bool | None):
  targets: dict[int, str] = {}
  skipped: list[tuple[str, str]] = []
  names: list[str] = []
  aliases = module_paths(model)  # a shared layer is skipped if any of its paths is named
  for name, module in iter_modules(model):
    kind = type(module)
    if isinstance(module, _NOT_CONVERTED):
      skipped.append((name, f"{kind.__name__} is not converted (only nnx.Linear / nnx.Embed)"))
      continue
    if kind is not nnx.Linear and kind is not nnx.Embed:
      if isinstance(module, (nnx.Linear, nnx.Embed)):  # its own __call__ may differ
        base = "nnx.Linear" if isinstance(module, nnx.Linear) else "nnx.Embed"
        skipped.append((name, f"{kind.__name__} subclasses {base}: only exact nnx.Linear / "
                              "nnx.Embed are converted"))
      continue
    paths = aliases.get(id(module), (name,))
    names.extend(paths)
    if _weight(module).ndim != 2:
      skipped.append((name, f"weight of shape {tuple(_weight(module).shape)} is not 2-D "
                            "(a scanned or vmapped stack of layers)"))
    elif any(config.skips(p) for p in paths):
      skipped.append((name, "skip_modules"))
    elif kind is nnx.Embed and not config.quantize_embeddings:
      skipped.append((name, "quantize_embeddings=False"))
    else:
      targets[id(module)] = name
  if not targets:
    done = [n for n, m in iter_modules(model)
            if isinstance(m, (Linear4bit, Linear8bitLt, Embedding4bit, Embedding8bit))]
    raise ValueError(
        "quantize_model found no layer to convert: the model has no nnx.Linear / nnx.Embed "
        f"outside skip_modules={config.skip_modules!r}"
        + ("" if config.quantize_embeddings else " (quantize_embeddings=False)")
        + (f"; it is already quantized ({len(done)} quantized layers, e.g. '{done[0]}'): "
           "call jaxquant.nn.dequantize_model first to quantize it again" if done else "")
        + kept_message(skipped))
  modules = {id(m): m for _, m in iter_modules(model)}
  if config.bits == 4:
    errors = []
    for key, name in targets.items():
      m = modules[key]
      feat, what = ((m.in_features, "in_features") if isinstance(m, nnx.Linear)
                    else (m.features, "features"))
      try:
        _common.check_4bit_layer(what, feat, quant_type=config.quant_type,
                                 blocksize=config.blocksize, where=f" of layer '{name}'")
      except ValueError as e:
        errors.append(str(e))
    if errors:
      raise ValueError("; ".join(errors) + "; or add these layers to skip_modules")
  n_params = sum(_weight(modules[k]).size for k in targets)
  bar = progress_bar(len(targets), n_params, progress)
  reports: list[LayerReport] = []

  def convert(name: str, module: Any) -> Any:
    if id(module) not in targets:
      return module
    try:
      new = _convert_layer(module, config)
    except ValueError as e:  # e.g. NaN weights: say which layer (the ones before are converted)
      raise ValueError(f"quantize_model: layer '{name}': {e}") from e
    w = _weight(module)
    reports.append(LayerReport(name, type(new).__name__, tuple(w.shape),
                               w.size * w.dtype.itemsize, new.quant_state.nbytes))
    bar.set_postfix_str(name[-30:])
    bar.update(1)
    return new

  try:
    model = replace_modules(model, convert)
  finally:
    bar.close()
  summary = QuantSummary(tuple(reports), tuple(skipped), unused_patterns(config, names))
  return model, summary


# Layers with a weight that quantize_model leaves in floating point, reported in the summary.
_NOT_CONVERTED = (nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.ConvTranspose)


def _weight(module: Any) -> jax.Array:
  return (module.kernel if isinstance(module, nnx.Linear) else module.embedding).get_value()


def _convert_layer(module: Any, config: QuantConfig) -> Any:
  if isinstance(module, nnx.Linear):
    if config.bits == 4:
      return Linear4bit.from_linear(module, quant_type=config.quant_type,
                                    blocksize=config.blocksize,
                                    double_quant=config.double_quant,
                                    compute_dtype=config.compute_dtype)
    return Linear8bitLt.from_linear(module, threshold=config.llm_int8_threshold,
                                    compute_dtype=config.compute_dtype)
  if config.bits == 4:
    return Embedding4bit.from_embed(module, quant_type=config.quant_type,
                                    blocksize=config.blocksize,
                                    double_quant=config.double_quant)
  return Embedding8bit.from_embed(module, threshold=config.llm_int8_threshold)


def dequantize_model(model: Any) -> Any:
  """Inverse of :func:`quantize_model`: quantized layers back to float ``nnx.Linear`` /
  ``nnx.Embed`` (NNX, in place) or quantized Linen kernels back into ``"params"``."""
  if not isinstance(model, nnx.Module):
    from jaxquant.nn import _linen_convert
    return _linen_convert.dequantize_variables(model)
  quantized = (Linear4bit, Linear8bitLt, Embedding4bit, Embedding8bit)
  return replace_modules(
      model, lambda _, m: m.dequantize() if isinstance(m, quantized) else m)
