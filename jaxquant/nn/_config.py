"""QuantConfig and LoraConfig: frozen, hashable, validated at construction.

Module names are matched against dotted paths (``"layers.0.attn.query"`` for NNX,
``"Encoder_0.Dense_1"`` for Linen) as PEFT matches ``target_modules``: an entry matches a
layer when it equals the full path, equals a trailing run of its components
(``"query"``, ``"attn.query"``), or, read as a regular expression, matches the full path
(``r".*attn\\.(query|key)"``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Iterable

import jax.numpy as jnp
import numpy as np

from jaxquant import _validate

__all__ = ["QuantConfig", "LoraConfig", "ALL_LINEAR", "path_to_name", "matches"]

FOUR_BIT_TYPES = ("nf4", "fp4")
ALL_LINEAR = "all-linear"


def path_to_name(path: Iterable[Any]) -> str:
  """``("layers", 0, "query")`` → ``"layers.0.query"``."""
  return ".".join(str(p) for p in path)


def matches(name: str, pattern: str) -> bool:
  """Whether the module at dotted path ``name`` is selected by ``pattern`` (see module doc)."""
  if pattern == name or name.endswith("." + pattern):
    return True
  try:
    return re.fullmatch(pattern, name) is not None
  except re.error:
    return False


def _names_tuple(arg: str, value: Any, *, allow_all_linear: bool = False) -> Any:
  if allow_all_linear and value == ALL_LINEAR:
    return ALL_LINEAR
  if isinstance(value, str):
    value = (value,)
  if value is None:
    return ()
  try:
    items = tuple(value)
  except TypeError:
    raise TypeError(f"{arg} must be a sequence of module names or patterns, got "
                    f"{type(value).__name__}") from None
  for item in items:
    if not isinstance(item, str) or not item:
      raise TypeError(f"{arg} entries must be non-empty strings (names or regular expressions), "
                      f"got {item!r}")
  return items


def _dtype_or_none(arg: str, value: Any) -> np.dtype | None:
  if value is None:
    return None
  return _validate.check_dtype_arg(arg, value)


def _check_bool(arg: str, value: Any) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{arg} must be a bool, got {value!r}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class QuantConfig:
  """What :func:`jaxquant.nn.quantize_model` converts, and how (transformers'
  ``BitsAndBytesConfig`` for Flax).

  Exactly one of ``load_in_4bit`` / ``load_in_8bit`` must be set. The 4-bit options
  (``quant_type``, ``double_quant``, ``blocksize``) may only be given with ``load_in_4bit``,
  ``llm_int8_threshold`` only with ``load_in_8bit``; what is not given takes transformers'
  default (``fp4``, no double quantization, blocksize 64, threshold 6.0), what does not apply
  stays ``None``. QLoRA's recipe is ``QuantConfig(load_in_4bit=True, quant_type="nf4",
  double_quant=True, compute_dtype=jnp.bfloat16)``.

  Attributes:
    load_in_4bit: replace Linear/Dense with ``Linear4bit``/``Dense4bit`` semantics (and
      Embed with ``Embedding4bit``/``Embed4bit``).
    load_in_8bit: replace them with LLM.int8() ``Linear8bitLt``/``Dense8bitLt`` (and
      ``Embedding8bit``/``Embed8bit``).
    quant_type: 4-bit data type, ``"nf4"`` or ``"fp4"``.
    double_quant: quantize the 4-bit absmax again to 8 bits (~0.37 bit/param saved).
    blocksize: 4-bit elements per absmax (32 ... 4096); must divide every converted layer's
      input features (``in_features`` / embedding ``features``).
    compute_dtype: dtype of the matmul (``None``: what the replaced layer would compute in).
    llm_int8_threshold: LLM.int8() outlier threshold (``0`` disables the 16-bit outlier
      path).
    skip_modules: names or patterns (see the module doc) of layers left in floating point,
      e.g. ``("lm_head",)``. Entries that match nothing are reported in the summary.
    quantize_embeddings: also convert Embed layers (and so the tied head with them).
  """

  load_in_4bit: bool = False
  load_in_8bit: bool = False
  quant_type: str | None = None
  double_quant: bool | None = None
  blocksize: int | None = None
  compute_dtype: Any = None
  llm_int8_threshold: float | None = None
  skip_modules: tuple[str, ...] = ()
  quantize_embeddings: bool = True

  def __post_init__(self):
    _check_bool("load_in_4bit", self.load_in_4bit)
    _check_bool("load_in_8bit", self.load_in_8bit)
    if self.load_in_4bit and self.load_in_8bit:
      raise ValueError("load_in_4bit=True and load_in_8bit=True were both given; accepted: "
                       "exactly one of them True (4-bit NF4/FP4 or 8-bit LLM.int8())")
    if not (self.load_in_4bit or self.load_in_8bit):
      raise ValueError("load_in_4bit and load_in_8bit are both False; accepted: exactly one of "
                       "them True")
    set_ = functools.partial(object.__setattr__, self)
    if self.load_in_4bit:
      if self.llm_int8_threshold is not None:
        raise ValueError(f"llm_int8_threshold={self.llm_int8_threshold!r} applies to "
                         "load_in_8bit only; leave it unset with load_in_4bit=True")
      set_("quant_type", "fp4" if self.quant_type is None else self.quant_type)
      _validate.check_choice("quant_type", self.quant_type, FOUR_BIT_TYPES)
      set_("double_quant", False if self.double_quant is None else self.double_quant)
      _check_bool("double_quant", self.double_quant)
      b = 64 if self.blocksize is None else self.blocksize
      if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
        raise TypeError(f"blocksize must be an int, got {b!r}")
      _validate.check_choice("blocksize", int(b), _validate.BLOCKSIZES_4BIT)
      set_("blocksize", int(b))
    else:
      given = {k: getattr(self, k) for k in ("quant_type", "double_quant", "blocksize")
               if getattr(self, k) is not None}
      if given:
        verb = "apply" if len(given) > 1 else "applies"
        raise ValueError(f"{', '.join(f'{k}={v!r}' for k, v in given.items())} {verb} to "
                         "load_in_4bit only; LLM.int8() (load_in_8bit=True) quantizes each "
                         "output row with its own scale")
      t = 6.0 if self.llm_int8_threshold is None else self.llm_int8_threshold
      if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
        raise ValueError(f"llm_int8_threshold must be a float >= 0 (0 disables outliers), "
                         f"got {t!r}")
      set_("llm_int8_threshold", float(t))
    _check_bool("quantize_embeddings", self.quantize_embeddings)
    set_("compute_dtype", _dtype_or_none("compute_dtype", self.compute_dtype))
    set_("skip_modules", _names_tuple("skip_modules", self.skip_modules))

  @property
  def bits(self) -> int:
    return 4 if self.load_in_4bit else 8

  def skips(self, name: str) -> bool:
    """Whether the module at dotted path ``name`` stays in floating point."""
    return any(matches(name, p) for p in self.skip_modules)

  def replace(self, **changes: Any) -> "QuantConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LoraConfig:
  """LoRA adapters for :func:`jaxquant.nn.add_lora` (PEFT's ``LoraConfig``).

  A targeted layer computing ``y = base(x)`` becomes
  ``y = base(x) + dropout(x) @ A @ B * (alpha / r)`` with ``A (in, r)`` initialised as
  PEFT does (kaiming-uniform, bound ``1/sqrt(in)``) and ``B (r, out)`` zero, so outputs are
  unchanged until the first update. ``A`` and ``B`` are ``nnx.LoRAParam`` (NNX) or live in
  the ``"lora"`` collection (Linen).

  Attributes:
    r: adapter rank, an int >= 1.
    alpha: scaling numerator; the update is scaled by ``alpha / r``.
    dropout: dropout rate on the adapter's input, in ``[0, 1)``.
    target_modules: ``"all-linear"`` (every Linear/Dense, quantized or not) or names /
      patterns of layers; Embed layers take adapters only when named here. An entry that
      matches no layer is an error.
    param_dtype: dtype of ``A`` and ``B``.
    dtype: dtype the adapter computes in (``None``: ``param_dtype``); its output is cast to
      the base layer's output dtype.
  """

  r: int = 8
  alpha: float = 8.0
  dropout: float = 0.0
  target_modules: Any = ALL_LINEAR
  param_dtype: Any = jnp.float32
  dtype: Any = None

  def __post_init__(self):
    if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r < 1:
      raise ValueError(f"r must be an int >= 1, got {self.r!r}")
    object.__setattr__(self, "r", int(self.r))
    a = self.alpha
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0:
      raise ValueError(f"alpha must be a number > 0, got {a!r}")
    object.__setattr__(self, "alpha", float(a))
    d = self.dropout
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
      raise ValueError(f"dropout must be a float in [0, 1), got {d!r}")
    object.__setattr__(self, "dropout", float(d))
    targets = _names_tuple("target_modules", self.target_modules, allow_all_linear=True)
    if targets == ():
      raise ValueError(f"target_modules must name at least one module or be {ALL_LINEAR!r}, "
                       f"got {self.target_modules!r}")
    object.__setattr__(self, "target_modules", targets)
    object.__setattr__(self, "param_dtype", _validate.check_dtype_arg("param_dtype",
                                                                      self.param_dtype))
    object.__setattr__(self, "dtype", _dtype_or_none("dtype", self.dtype))

  @property
  def scaling(self) -> float:
    return self.alpha / self.r

  def targets(self, name: str, *, linear: bool) -> bool:
    """Whether the layer at dotted path ``name`` (a linear one if ``linear``) gets adapters."""
    if self.target_modules == ALL_LINEAR:
      return linear
    return any(matches(name, p) for p in self.target_modules)

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable form (saved beside the adapters)."""
    return dict(r=self.r, alpha=self.alpha, dropout=self.dropout,
                target_modules=(self.target_modules if isinstance(self.target_modules, str)
                                else list(self.target_modules)),
                param_dtype=jnp.dtype(self.param_dtype).name,
                dtype=None if self.dtype is None else jnp.dtype(self.dtype).name)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
    d = dict(d)
    if isinstance(d.get("target_modules"), list):
      d["target_modules"] = tuple(d["target_modules"])
    return cls(**d)

  def replace(self, **changes: Any) -> "LoraConfig":
    return dataclasses.replace(self, **changes)
