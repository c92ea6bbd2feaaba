"""NNX linear layers with frozen quantized weights: drop-ins for ``nnx.Linear``."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import DTypeLike

from jaxquant import _validate
from jaxquant.nn import _common
from jaxquant.nn._variables import QuantizedWeight
from jaxquant.quant_state import FOUR_BIT_TYPES, QuantState

__all__ = ["Linear4bit", "Linear8bitLt"]

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()
_SHARDING_KEYS = ("out_sharding", "sharding", "sharding_names")


def _weight_metadata(kernel_metadata: Mapping[str, Any]) -> dict[str, Any]:
  """Metadata for the QuantizedWeight. Sharding annotations describe the float ``(in, out)``
  kernel, not the state's arrays, so they are kept under ``kernel_sharding`` (for reference)
  instead of being applied; ``jaxquant.sharding`` shards the state by its own rules."""
  meta = {k: v for k, v in kernel_metadata.items() if k not in _SHARDING_KEYS}
  for k in _SHARDING_KEYS:
    if k in kernel_metadata:
      meta["kernel_sharding"] = kernel_metadata[k]
  return meta


def _bias_param(bias: jax.Array | None) -> Any:
  return nnx.data(None) if bias is None else nnx.Param(bias)


class _QuantLinear(nnx.Module):
  """Shared state and conversions of the quantized linear layers."""

  kernel: QuantizedWeight
  in_features: int
  out_features: int

  def _init_common(self, in_features, out_features, use_bias, dtype, param_dtype, precision,
                   compute_dtype, preferred_element_type):
    self.in_features = int(in_features)
    self.out_features = int(out_features)
    self.use_bias = bool(use_bias)
    self.dtype = None if dtype is None else jnp.dtype(dtype)
    self.param_dtype = jnp.dtype(param_dtype)
    self.precision = precision
    self.compute_dtype = (None if compute_dtype is None
                          else _validate.check_dtype_arg("compute_dtype", compute_dtype))
    self.preferred_element_type = (None if preferred_element_type is None
                                   else jnp.dtype(preferred_element_type))

  @property
  def quant_state(self) -> QuantState:
    """The frozen weight's :class:`~jaxquant.QuantState`, torch layout ``(out, in)``."""
    return self.kernel.get_value()

  def _bias(self) -> jax.Array | None:
    return None if self.bias is None else self.bias[...]

  def _out_dtype(self, x: jax.Array) -> Any:
    dt = _common.output_dtype(x.dtype, self.param_dtype, self.dtype)
    if self.preferred_element_type is None:
      return dt
    # as nnx.Linear: the product comes out in preferred_element_type, the bias (in the
    # promoted dtype) is added to it
    pref = self.preferred_element_type
    return jnp.promote_types(pref, dt) if self.use_bias else pref

  def _set_state(self, state: QuantState, bias: jax.Array | None) -> None:
    if tuple(state.shape) != (self.out_features, self.in_features):
      raise ValueError(f"state must hold a ({self.out_features}, {self.in_features}) weight "
                       f"(out_features, in_features), got shape {state.shape}")
    self.kernel.set_value(state)
    if bias is not None:
      bias = jnp.asarray(bias)
      if tuple(bias.shape) != (self.out_features,):
        raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
      self.bias.set_value(bias.astype(self.param_dtype))

  def dequantize(self) -> nnx.Linear:
    """An ``nnx.Linear`` with the dequantized kernel (in ``param_dtype``) and this bias."""
    return self.to_linear(_common.dequantize_kernel(self.quant_state, self.param_dtype))

  def to_linear(self, kernel: jax.Array) -> nnx.Linear:
    """An ``nnx.Linear`` with this layer's settings and bias and the float ``kernel``
    ``(in_features, out_features)``."""
    # preferred_element_type sets the output dtype: carry it over (passed only when set)
    pref = ({} if self.preferred_element_type is None
            else {"preferred_element_type": self.preferred_element_type})
    linear = nnx.eval_shape(lambda: nnx.Linear(
        self.in_features, self.out_features, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, precision=self.precision, rngs=nnx.Rngs(0), **pref))
    linear.kernel.set_value(jnp.asarray(kernel, self.param_dtype))
    if self.use_bias:
      linear.bias.set_value(self._bias())
    return linear


class Linear4bit(_QuantLinear):
  """``nnx.Linear`` with a frozen 4-bit (NF4/FP4) kernel: bitsandbytes' ``Linear4bit``.

  Constructor and call match ``nnx.Linear``; the kernel drawn from ``kernel_init`` is
  quantized at once and only the 4-bit state is kept, as a :class:`QuantizedWeight`
  (never trained or differentiated) in torch layout ``(out_features, in_features)``. The bias
  stays an ``nnx.Param``. The matmul is :func:`jaxquant.functional.matmul_4bit` (the Pallas
  kernel on a GPU).

  Args:
    in_features, out_features, use_bias, dtype, param_dtype, precision, kernel_init,
      bias_init, preferred_element_type, rngs, kernel_metadata, bias_metadata: as
      ``nnx.Linear``. ``dtype`` is the output dtype (``None``: promoted from input and
      ``param_dtype``; ``preferred_element_type`` overrides it); ``param_dtype`` is the dtype
      the weight is drawn in and dequantizes to. ``precision`` is accepted for compatibility:
      the quantized matmul accumulates in float32.
    dot_general, promote_dtype: accepted at their defaults only (a custom one cannot apply
      to a quantized weight: ValueError).
    quant_type: ``"fp4"`` (bitsandbytes' default) or ``"nf4"``.
    blocksize: elements per absmax (32 ... 4096); must divide ``in_features``.
    double_quant: quantize the absmax again (bitsandbytes' ``compress_statistics``, on by
      default there as here).
    compute_dtype: dtype of the matmul (``None``: the output dtype); e.g. ``jnp.bfloat16``.

  Call: ``x`` ``(..., in_features)`` float → ``(..., out_features)`` in ``dtype`` (or the
  promoted dtype).

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxquant.nn as jqnn
    >>> layer = jqnn.Linear4bit(128, 32, quant_type="nf4", rngs=nnx.Rngs(0))
    >>> layer.quant_state.shape
    (32, 128)
    >>> layer(jnp.ones((4, 128))).shape
    (4, 32)
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               dtype: DTypeLike | None = None, param_dtype: DTypeLike = jnp.float32,
               precision: Any = None, kernel_init: Any = default_kernel_init,
               bias_init: Any = default_bias_init, dot_general: Any = None,
               promote_dtype: Any = None, preferred_element_type: DTypeLike | None = None,
               quant_type: str = "fp4", blocksize: int = 64, double_quant: bool = True,
               compute_dtype: DTypeLike | None = None, rngs: nnx.Rngs,
               kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
               bias_metadata: Mapping[str, Any] = MappingProxyType({})):
    _common.check_dropin_args("Linear4bit", dot_general=dot_general, promote_dtype=promote_dtype)
    _common.check_4bit_layer("in_features", in_features, quant_type=quant_type,
                             blocksize=blocksize)
    self._init_common(in_features, out_features, use_bias, dtype, param_dtype, precision,
                      compute_dtype, preferred_element_type)
    self.quant_type = quant_type
    self.blocksize = int(blocksize)
    self.double_quant = bool(double_quant)
    kernel = kernel_init(rngs.params(), (in_features, out_features), self.param_dtype)
    self.kernel = QuantizedWeight(
        _common.quantize_kernel_4bit(kernel, quant_type=quant_type, blocksize=blocksize,
                                     double_quant=double_quant),
        **_weight_metadata(kernel_metadata))
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), self.param_dtype),
                           **bias_metadata) if use_bias else nnx.data(None))

  def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
    with jax.named_scope("jaxquant.Linear4bit"):
      y = _common.linear_4bit(inputs, self.quant_state, self._bias(),
                              out_dtype=self._out_dtype(inputs),
                              compute_dtype=self.compute_dtype)
      return _common.constrain(y, out_sharding)

  def quant_kwargs(self) -> dict[str, Any]:
    """The quantization arguments, to rebuild an equivalent layer."""
    return dict(quant_type=self.quant_type, blocksize=self.blocksize,
                double_quant=self.double_quant, compute_dtype=self.compute_dtype)

  @classmethod
  def from_quant_state(cls, state: QuantState, bias: jax.Array | None = None, *,
                       dtype: DTypeLike | None = None, param_dtype: DTypeLike | None = None,
                       precision: Any = None, compute_dtype: DTypeLike | None = None,
                       preferred_element_type: DTypeLike | None = None) -> "Linear4bit":
    """A layer around an existing 4-bit weight (e.g. loaded from a bitsandbytes checkpoint).

    Args:
      state: nf4/fp4 QuantState of a ``(out_features, in_features)`` weight, blocks tiling
        the rows (``in_features % state.blocksize == 0``).
      bias: ``(out_features,)`` or None (no bias).
      dtype, precision, compute_dtype: as the constructor.
      param_dtype: default ``state.dtype`` (the dtype it was quantized from).
    """
    if not isinstance(state, QuantState) or state.quant_type not in FOUR_BIT_TYPES:
      raise TypeError(f"state must be a nf4/fp4 QuantState, got {state!r}")
    if state.ndim != 2:
      raise ValueError(f"state must hold a 2-D (out_features, in_features) weight, got shape "
                       f"{state.shape}")
    state.check()
    out_f, in_f = state.shape
    param_dtype = state.dtype if param_dtype is None else param_dtype
    layer = nnx.eval_shape(lambda: cls(
        in_f, out_f, use_bias=bias is not None, dtype=dtype, param_dtype=param_dtype,
        precision=precision, quant_type=state.quant_type, blocksize=state.blocksize,
        double_quant=state.nested, compute_dtype=compute_dtype,
        preferred_element_type=preferred_element_type, rngs=nnx.Rngs(0)))
    layer._set_state(state, bias)
    return layer

  @classmethod
  def from_linear(cls, linear: nnx.Linear, *, quant_type: str = "fp4", blocksize: int = 64,
                  double_quant: bool = True,
                  compute_dtype: DTypeLike | None = None) -> "Linear4bit":
    """Quantize an ``nnx.Linear`` (its kernel, bias, dtypes and precision carry over)."""
    _common.check_4bit_layer("in_features", linear.in_features, quant_type=quant_type,
                             blocksize=blocksize)
    state = _common.quantize_kernel_4bit(linear.kernel[...], quant_type=quant_type,
                                         blocksize=blocksize, double_quant=double_quant)
    bias = None if linear.bias is None else linear.bias[...]
    return cls.from_quant_state(state, bias, dtype=linear.dtype, param_dtype=linear.param_dtype,
                                precision=linear.precision, compute_dtype=compute_dtype,
                                preferred_element_type=_preferred(linear))


class Linear8bitLt(_QuantLinear):
  """``nnx.Linear`` with a frozen LLM.int8() kernel: bitsandbytes' ``Linear8bitLt`` for
  inference and (Q)LoRA (``has_fp16_weights=False``).

  The kernel is stored row-wise int8 with one float32 scale per output feature (bnb's ``CB``
  and ``SCB``) in a :class:`QuantizedWeight`. Activations are quantized per row on the fly;
  with ``threshold > 0`` the input columns holding an outlier (``|x| >= threshold``) are
  multiplied in 16-bit (LLM.int8()'s mixed decomposition). Through
  :func:`jaxquant.functional.int8_linear`.

  Args:
    in_features, ..., bias_metadata: as ``nnx.Linear`` (see :class:`Linear4bit`).
    threshold: outlier threshold; ``0.0`` (bitsandbytes' module default) disables the
      16-bit path, ``6.0`` is transformers' default.
    compute_dtype: dtype of the activations fed to the int8 matmul (``None``: output dtype).

  Call: ``(..., in_features)`` float → ``(..., out_features)``.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               dtype: DTypeLike | None = None, param_dtype: DTypeLike = jnp.float32,
               precision: Any = None, kernel_init: Any = default_kernel_init,
               bias_init: Any = default_bias_init, dot_general: Any = None,
               promote_dtype: Any = None, preferred_element_type: DTypeLike | None = None,
               threshold: float = 0.0, compute_dtype: DTypeLike | None = None,
               rngs: nnx.Rngs, kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
               bias_metadata: Mapping[str, Any] = MappingProxyType({})):
    _common.check_dropin_args("Linear8bitLt", dot_general=dot_general,
                              promote_dtype=promote_dtype)
    self._init_common(in_features, out_features, use_bias, dtype, param_dtype, precision,
                      compute_dtype, preferred_element_type)
    self.threshold = _check_threshold(threshold)
    kernel = kernel_init(rngs.params(), (in_features, out_features), self.param_dtype)
    self.kernel = QuantizedWeight(_common.quantize_kernel_8bit(kernel),
                                  **_weight_metadata(kernel_metadata))
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), self.param_dtype),
                           **bias_metadata) if use_bias else nnx.data(None))

  def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
    with jax.named_scope("jaxquant.Linear8bitLt"):
      y = _common.linear_8bit(inputs, self.quant_state, self._bias(),
                              out_dtype=self._out_dtype(inputs),
                              compute_dtype=self.compute_dtype, threshold=self.threshold)
      return _common.constrain(y, out_sharding)

  def quant_kwargs(self) -> dict[str, Any]:
    return dict(threshold=self.threshold, compute_dtype=self.compute_dtype)

  @classmethod
  def from_quant_state(cls, state: QuantState, bias: jax.Array | None = None, *,
                       dtype: DTypeLike | None = None, param_dtype: DTypeLike | None = None,
                       precision: Any = None, threshold: float = 0.0,
                       compute_dtype: DTypeLike | None = None,
                       preferred_element_type: DTypeLike | None = None) -> "Linear8bitLt":
    """A layer around an existing ``int8_rowwise`` weight (bnb's ``CB``/``SCB``)."""
    if not isinstance(state, QuantState) or state.quant_type != "int8_rowwise":
      raise TypeError(f"state must be an int8_rowwise QuantState, got {state!r}")
    state.check()
    out_f, in_f = state.shape
    param_dtype = state.dtype if param_dtype is None else param_dtype
    layer = nnx.eval_shape(lambda: cls(
        in_f, out_f, use_bias=bias is not None, dtype=dtype, param_dtype=param_dtype,
        precision=precision, threshold=threshold, compute_dtype=compute_dtype,
        preferred_element_type=preferred_element_type, rngs=nnx.Rngs(0)))
    layer._set_state(state, bias)
    return layer

  @classmethod
  def from_linear(cls, linear: nnx.Linear, *, threshold: float = 0.0,
                  compute_dtype: DTypeLike | None = None) -> "Linear8bitLt":
    """Quantize an ``nnx.Linear`` to LLM.int8()."""
    state = _common.quantize_kernel_8bit(linear.kernel[...])
    bias = None if linear.bias is None else linear.bias[...]
    return cls.from_quant_state(state, bias, dtype=linear.dtype, param_dtype=linear.param_dtype,
                                precision=linear.precision, threshold=threshold,
                                compute_dtype=compute_dtype,
                                preferred_element_type=_preferred(linear))


def _preferred(linear: nnx.Linear) -> Any:
  return getattr(linear, "preferred_element_type", None)


def _check_threshold(threshold: Any) -> float:
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
    raise ValueError(f"threshold must be a float >= 0 (0 disables outliers), got {threshold!r}")
  return float(threshold)
