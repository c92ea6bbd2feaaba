"""Parameter-name mappings between checkpoints (transformers' names) and Flax models.

A model path is the ``.``-joined key path of a variable in ``nnx.state(model)`` (or in Linen
variables), without NNX's ``value`` key: ``layers.0.self_attn.q_proj.kernel``. A
:class:`NameRules` is a table of ``(checkpoint pattern, model pattern)`` pairs with ``{name}``
placeholders (``{i}`` matches a decimal index, any other placeholder a dot-free word); it maps
names both ways, so one table serves loading and exporting.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping, Union

__all__ = ["NameRules", "NameMap", "resolve_name_map", "LLAMA_RULES", "llama_rules"]

#: What :func:`jaxquant.interop.load_into` accepts as ``name_map``: ``None`` (names are model
#: paths), a mapping of checkpoint name -> model path, or a callable returning the model path
#: or ``None`` to skip the tensor.
NameMap = Union[None, Mapping[str, str], Callable[[str], Union[str, None]]]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _compile(pattern: str) -> re.Pattern:
  out, pos, seen = [], 0, set()
  for m in _PLACEHOLDER.finditer(pattern):
    out.append(re.escape(pattern[pos:m.start()]))
    name = m.group(1)
    if name in seen:
      out.append(f"(?P={name})")
    else:
      seen.add(name)
      out.append(f"(?P<{name}>[0-9]+)" if name == "i" or name.endswith("_i")
                 else f"(?P<{name}>[^.]+)")
    pos = m.end()
  out.append(re.escape(pattern[pos:]))
  return re.compile("".join(out))


def _fields(pattern: str) -> set[str]:
  return set(_PLACEHOLDER.findall(pattern))


@dataclasses.dataclass(frozen=True)
class NameRules:
  """Checkpoint name <-> model path, from a table of patterns; the first matching rule wins.

  A rule whose model pattern is ``None`` drops matching checkpoint tensors (e.g. the
  ``rotary_emb.inv_freq`` buffers old Llama checkpoints carry).

  Example::

    rules = NameRules((("model.layers.{i}.mlp.up_proj.weight", "blocks.{i}.up.kernel"),))
    rules("model.layers.3.mlp.up_proj.weight")   # 'blocks.3.up.kernel'
    rules.inverse("blocks.3.up.kernel")          # 'model.layers.3.mlp.up_proj.weight'

  Attributes:
    rules: ``(checkpoint pattern, model pattern or None)`` pairs.
  """

  rules: tuple[tuple[str, str | None], ...]

  def __post_init__(self):
    rules = tuple((str(c), None if m is None else str(m)) for c, m in self.rules)
    for c, m in rules:
      if m is not None and _fields(m) != _fields(c):
        raise ValueError(f"rule ({c!r}, {m!r}): both sides must use the same placeholders, got "
                         f"{sorted(_fields(c))} and {sorted(_fields(m))}")
    object.__setattr__(self, "rules", rules)
    object.__setattr__(self, "_forward", [(_compile(c), m) for c, m in rules])
    object.__setattr__(self, "_backward", [(_compile(m), c) for c, m in rules if m is not None])

  def __call__(self, name: str) -> str | None:
    """The model path of checkpoint tensor ``name``; ``None`` when a rule drops it.

    Raises:
      KeyError: no rule matches ``name``.
    """
    for regex, target in self._forward:  # type: ignore[attr-defined]
      m = regex.fullmatch(name)
      if m:
        return None if target is None else target.format(**m.groupdict())
    raise KeyError(f"no rule maps tensor {name!r}")

  def inverse(self, path: str) -> str:
    """The checkpoint name of model path ``path`` (for export).

    Raises:
      KeyError: no rule produces ``path``.
    """
    for regex, source in self._backward:  # type: ignore[attr-defined]
      m = regex.fullmatch(path)
      if m:
        return source.format(**m.groupdict())
    raise KeyError(f"no rule maps model path {path!r} back to a checkpoint name")

  def __add__(self, other: "NameRules | Iterable[tuple[str, str | None]]") -> "NameRules":
    extra = other.rules if isinstance(other, NameRules) else tuple(other)
    return NameRules(self.rules + tuple(extra))


def resolve_name_map(name_map: NameMap) -> Callable[[str], str | None]:
  """A callable ``checkpoint name -> model path | None`` for any accepted ``name_map``; an
  unmapped name raises ``KeyError``."""
  if name_map is None:
    return lambda name: name
  if isinstance(name_map, Mapping):
    table = dict(name_map)

    def lookup(name: str) -> str | None:
      if name not in table:
        raise KeyError(f"tensor {name!r} is not in name_map")
      return table[name]
    return lookup
  if callable(name_map):
    return name_map
  raise TypeError(f"name_map must be None, a mapping or a callable, got "
                  f"{type(name_map).__name__}")


def llama_rules(*, embed: str = "embed_tokens.embedding", layers: str = "layers",
                attn: str = "self_attn", mlp: str = "mlp", input_norm: str = "input_norm",
                post_attn_norm: str = "post_attn_norm", norm: str = "norm",
                norm_param: str = "scale", lm_head: str = "lm_head.kernel") -> NameRules:
  """transformers' Llama names (``LlamaForCausalLM``; also Mistral, and Qwen2 with its
  attention biases) mapped onto a Flax Llama. The defaults are the names of
  :class:`jaxquant.models.LlamaForCausalLM`; change them for another model's attributes.

  Args:
    embed: model path of the token embedding table.
    layers: attribute holding the decoder blocks (``nnx.List``/list: ``layers.0...``).
    attn, mlp: attributes of a block holding ``q_proj``.. ``o_proj`` and ``gate_proj``..
      ``down_proj`` (each a Linear: ``.kernel``, or a quantized Linear whose ``kernel`` holds
      the QuantState).
    input_norm, post_attn_norm: a block's RMSNorms (transformers' ``input_layernorm`` and
      ``post_attention_layernorm``); ``norm``: the final one.
    norm_param: the RMSNorm parameter name (``nnx.RMSNorm``: ``scale``).
    lm_head: model path of the output projection (absent with tied embeddings).
  """
  b = f"{layers}.{{i}}"
  rules = [("model.embed_tokens.weight", embed)]
  for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
    rules.append((f"model.layers.{{i}}.self_attn.{p}.weight", f"{b}.{attn}.{p}.kernel"))
    rules.append((f"model.layers.{{i}}.self_attn.{p}.bias", f"{b}.{attn}.{p}.bias"))
  for p in ("gate_proj", "up_proj", "down_proj"):
    rules.append((f"model.layers.{{i}}.mlp.{p}.weight", f"{b}.{mlp}.{p}.kernel"))
  rules += [("model.layers.{i}.input_layernorm.weight", f"{b}.{input_norm}.{norm_param}"),
            ("model.layers.{i}.post_attention_layernorm.weight",
             f"{b}.{post_attn_norm}.{norm_param}"),
            ("model.norm.weight", f"{norm}.{norm_param}"), ("lm_head.weight", lm_head),
            ("model.layers.{i}.self_attn.rotary_emb.inv_freq", None)]
  return NameRules(tuple(rules))


#: transformers' Llama names onto :class:`jaxquant.models.LlamaForCausalLM`
#: (``layers.{i}.self_attn.q_proj.kernel``, ``layers.{i}.input_norm.scale``, ...), quantized
#: (``jaxquant.nn.quantize_model``) or not, with or without LoRA adapters.
LLAMA_RULES = llama_rules()
