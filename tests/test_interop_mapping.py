"""jaxquant.interop.load_into / state_dict: checkpoint tensors onto Flax models by name.

The bitsandbytes golden state dicts go into jaxquant.nn layers (NNX and Linen) and give the
recorded outputs, and come back out byte for byte; a transformers-named sharded Llama checkpoint
is quantized into jaxquant.models.LlamaForCausalLM through the name rules (also under LoRA) and
exported again; every mismatch is refused naming the tensor and the model path.
"""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import jaxquant as jq
from jaxquant import interop
from jaxquant import nn as jqnn
from jaxquant.interop import bnb
from jaxquant.models import LlamaConfig, LlamaForCausalLM
from tests.helpers import BNB, golden

LINEAR4 = {dq: BNB / f"bnb_linear4bit_dq{dq}_state.safetensors" for dq in (0, 1)}
LINEAR8 = {thr: BNB / f"bnb_linear8bit_thr{thr}_state.safetensors" for thr in (0, 6)}
LAYER_NAMES = {"weight": "kernel", "bias": "bias"}
EXPORT_NAMES = {"kernel": "weight", "bias": "bias"}


def _states_equal(a: jq.QuantState, b: jq.QuantState) -> bool:
  meta = ("shape", "dtype", "blocksize", "quant_type", "nested_blocksize")
  if any(getattr(a, m) != getattr(b, m) for m in meta):
    return False
  for f in ("data", "absmax", "code", "nested_absmax", "nested_code", "offset"):
    x, y = getattr(a, f), getattr(b, f)
    if (x is None) != (y is None) or (x is not None and np.asarray(x).tobytes()
                                      != np.asarray(y).tobytes()):
      return False
  return True


# -- the golden bitsandbytes files into jaxquant layers ------------------------------------------

@pytest.mark.parametrize("dq", (0, 1))
def test_linear4bit_file_into_a_layer_gives_recorded_outputs(dq, tmp_path):
  layer = nnx.eval_shape(lambda: jqnn.Linear4bit(256, 64, quant_type="nf4", blocksize=64,
                                                 double_quant=bool(dq), rngs=nnx.Rngs(0)))
  interop.load_into(layer, bnb.load(LINEAR4[dq], progress=False), LAYER_NAMES)
  io = golden(f"bnb_linear4bit_dq{dq}_io")
  y = layer(jnp.asarray(io["x"]))
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), io["y"], rtol=1e-5, atol=1e-5)
  out = tmp_path / "back.safetensors"
  bnb.save(out, interop.state_dict(layer, EXPORT_NAMES.get), metadata=bnb.metadata(LINEAR4[dq]))
  assert out.read_bytes() == LINEAR4[dq].read_bytes()


def test_linear4bit_file_into_linen_variables():
  module = jqnn.Dense4bit(64, quant_type="nf4", blocksize=64, double_quant=True)
  variables = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, 256)))
  assert set(interop.model_paths(variables)) == {"params.bias", "quantized.kernel"}
  variables = interop.load_into(variables, bnb.load(LINEAR4[1], progress=False),
                                {"weight": "quantized.kernel", "bias": "params.bias"})
  io = golden("bnb_linear4bit_dq1_io")
  np.testing.assert_allclose(np.asarray(module.apply(variables, jnp.asarray(io["x"]))), io["y"],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("thr", (0, 6))
def test_linear8bit_file_into_a_layer_gives_recorded_outputs(thr, tmp_path):
  layer = nnx.eval_shape(lambda: jqnn.Linear8bitLt(256, 64, threshold=float(thr),
                                                   param_dtype=jnp.float16, rngs=nnx.Rngs(0)))
  interop.load_into(layer, bnb.load(LINEAR8[thr], progress=False), LAYER_NAMES)
  g = golden("bnb_int8")
  y = layer(jnp.asarray(g[f"linear8bit_thr{thr}_x"], jnp.float16))
  ref = g[f"linear8bit_thr{thr}_y"]
  assert y.dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2**-10, atol=2**-10)
  out = tmp_path / "back.safetensors"
  bnb.save(out, interop.state_dict(layer, EXPORT_NAMES.get), metadata=bnb.metadata(LINEAR8[thr]))
  assert out.read_bytes() == LINEAR8[thr].read_bytes()


def test_a_file_from_another_layout_is_refused():
  params = bnb.load(LINEAR4[1], progress=False)
  for quant_type, dq, pattern in [("fp4", True, r"quant_type differ"),
                                  ("nf4", False, r"nested_blocksize differ")]:
    layer = nnx.eval_shape(lambda: jqnn.Linear4bit(256, 64, quant_type=quant_type, blocksize=64,
                                                   double_quant=dq, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=rf"tensor 'weight' \(for 'kernel'\) is QuantState\(nf4"
                                         rf".*{pattern}"):
      interop.load_into(layer, params, LAYER_NAMES)
  wide = nnx.eval_shape(lambda: jqnn.Linear4bit(512, 64, quant_type="nf4", double_quant=True,
                                                rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"'weight'.*shape=\(64, 256\).*shape=\(64, 512\)"):
    interop.load_into(wide, params, LAYER_NAMES)
  int8 = nnx.eval_shape(lambda: jqnn.Linear8bitLt(256, 64, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"'weight'.*dequantizes to float16.*float32.*cast=True"):
    interop.load_into(int8, bnb.load(LINEAR8[0], progress=False), LAYER_NAMES)


# -- a transformers-named checkpoint into jaxquant.models.LlamaForCausalLM by the Llama rules ----

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position=16)
QLORA = jqnn.QuantConfig(load_in_4bit=True, quant_type="nf4", double_quant=True,
                         quantize_embeddings=False, skip_modules=("lm_head",))


def _float_llama():
  return LlamaForCausalLM(CFG, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))


def _nf4_llama():
  model = _float_llama()
  jqnn.quantize_model(model, QLORA, progress=False)
  return model


def _hf_checkpoint(directory):
  """A sharded bf16 checkpoint with transformers' Llama names (and an old rotary buffer)."""
  rng = np.random.default_rng(0)
  h, kv, v = CFG.hidden_size, CFG.num_kv_heads * CFG.head_dim, CFG.vocab_size
  t = {"model.embed_tokens.weight": rng.standard_normal((v, h)),
       "model.norm.weight": 1 + rng.standard_normal(h) / 10,
       "lm_head.weight": rng.standard_normal((v, h)) / 8}
  for i in range(CFG.num_layers):
    p = f"model.layers.{i}"
    for name, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
      t[f"{p}.self_attn.{name}.weight"] = rng.standard_normal((rows, h)) / 8
    for name in ("gate_proj", "up_proj", "down_proj"):
      t[f"{p}.mlp.{name}.weight"] = rng.standard_normal((h, h)) / 8
    for name in ("input_layernorm", "post_attention_layernorm"):
      t[f"{p}.{name}.weight"] = 1 + rng.standard_normal(h) / 10
  t = {k: a.astype(ml_dtypes.bfloat16) for k, a in t.items()}
  t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(CFG.head_dim // 2, np.float32)
  bnb.save(directory, {k: jnp.asarray(a) for k, a in t.items()}, max_shard_size=40_000)
  assert (directory / "model.safetensors.index.json").exists()
  return t


def test_llama_checkpoint_quantized_into_the_llama_model_by_name(tmp_path):
  tensors = _hf_checkpoint(tmp_path / "hf")
  model = nnx.eval_shape(_nf4_llama)  # allocates nothing
  interop.load_into(model, bnb.iter_load(tmp_path / "hf", progress=False), interop.LLAMA_RULES)
  q = model.layers[1].self_attn.q_proj.quant_state
  w = tensors["model.layers.1.self_attn.q_proj.weight"]
  assert _states_equal(q, jq.quantize_4bit(jnp.asarray(w), 64, True, "nf4"))
  np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]),
                                tensors["lm_head.weight"].T)
  np.testing.assert_array_equal(np.asarray(model.layers[0].post_attn_norm.scale[...]),
                                tensors["model.layers.0.post_attention_layernorm.weight"])
  # The same as loading the float model (kernels transposed) and quantizing it afterwards.
  reference = nnx.eval_shape(_float_llama)
  interop.load_into(reference, bnb.iter_load(tmp_path / "hf", progress=False),
                    interop.LLAMA_RULES)
  jqnn.quantize_model(reference, QLORA, progress=False)
  ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) * 5 % CFG.vocab_size
  np.testing.assert_array_equal(np.asarray(model(ids), np.float32),
                                np.asarray(reference(ids), np.float32))
  # Out again under transformers' names, in bitsandbytes' format, and back in.
  exported = interop.state_dict(model, interop.LLAMA_RULES)
  assert set(exported) == set(tensors) - {"model.layers.0.self_attn.rotary_emb.inv_freq"}
  np.testing.assert_array_equal(np.asarray(exported["lm_head.weight"]), tensors["lm_head.weight"])
  bnb.save(tmp_path / "q", exported, max_shard_size=30_000)
  weight_map = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())[
      "weight_map"]
  blob = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
  raw = safetensors.numpy.load_file(str(tmp_path / "q" / weight_map[blob]))
  assert json.loads(bytes(raw[blob]))["nested_blocksize"] == 256
  again = nnx.eval_shape(_nf4_llama)
  interop.load_into(again, bnb.load(tmp_path / "q", progress=False), interop.LLAMA_RULES)
  assert _states_equal(again.layers[1].self_attn.q_proj.quant_state, q)
  # With LoRA adapters added, the same rules find the wrapped base layers.
  lora_model = _nf4_llama()
  jqnn.add_lora(lora_model, jqnn.LoraConfig(r=4, alpha=8), rngs=nnx.Rngs(3))
  interop.load_into(lora_model, bnb.load(tmp_path / "q", progress=False), interop.LLAMA_RULES,
                    strict=False)
  assert _states_equal(lora_model.layers[1].self_attn.q_proj.base.quant_state, q)
  assert isinstance(lora_model.layers[1].self_attn.q_proj.lora_b, nnx.LoRAParam)


def test_rules_hooks_and_plain_trees():
  rules = interop.NameRules((("enc.{i}.{kind}.w", "blocks.{i}.{kind}.kernel"),
                             ("enc.{i}.buf", None)))
  assert rules("enc.12.attn.w") == "blocks.12.attn.kernel" and rules("enc.0.buf") is None
  assert rules.inverse("blocks.3.mlp.kernel") == "enc.3.mlp.w"
  with pytest.raises(KeyError, match="no rule maps tensor 'dec.0.w'"):
    rules("dec.0.w")
  with pytest.raises(ValueError, match="same placeholders"):
    interop.NameRules((("a.{i}.w", "b.w"),))
  custom = interop.llama_rules(attn="attn", mlp="ffn", layers="blocks")
  assert (interop.LLAMA_RULES("model.layers.2.input_layernorm.weight")
          == "layers.2.input_norm.scale")
  assert custom("model.layers.2.mlp.down_proj.weight") == "blocks.2.ffn.down_proj.kernel"
  # Linen-style variables: a new tree, the float kernel transposed, dtypes cast on request.
  variables = {"params": {"Dense_0": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}}
  w = np.arange(6, dtype=np.float32).reshape(2, 3)
  out = interop.load_into(variables, {"fc.weight": w, "fc.bias": np.ones(2, np.float16)},
                          lambda n: "params.Dense_0." + {"weight": "kernel"}.get(
                              n.split(".")[1], n.split(".")[1]), cast=True)
  np.testing.assert_array_equal(out["params"]["Dense_0"]["kernel"], w.T)
  assert out["params"]["Dense_0"]["bias"].dtype == jnp.float32
  assert float(variables["params"]["Dense_0"]["kernel"].sum()) == 0  # the input is untouched
  assert list(interop.model_paths(variables)) == ["params.Dense_0.bias", "params.Dense_0.kernel"]


def test_mapping_failures_name_the_tensor_and_the_path():
  layer = nnx.eval_shape(lambda: jqnn.Linear4bit(256, 64, quant_type="nf4", double_quant=True,
                                                 rngs=nnx.Rngs(0)))
  params = bnb.load(LINEAR4[1], progress=False)
  cases = [
      ({**params, "extra": np.ones(3)}, LAYER_NAMES, {},
       r"tensor 'extra' is not mapped to a model path.*strict=False"),
      (params, {"weight": "kernal", "bias": "bias"}, {},
       r"tensor 'weight' maps to model path 'kernal', which the model does not have; "
       r"close model paths: \['kernel'\]"),
      ({"weight": params["weight"]}, LAYER_NAMES, {},
       r"fills no value for model variable\(s\) 'bias'"),
      ({**params, "bias": np.ones(32, np.float32)}, LAYER_NAMES, {},
       r"tensor 'bias' \(for 'bias'\) has shape \[32\]; the model's 'bias' is float32\[64\]"),
      ({**params, "bias": np.ones(64, np.float16)}, LAYER_NAMES, {},
       r"tensor 'bias' \(for 'bias'\) is float16\[64\].*float32\[64\]; pass cast=True"),
      ({"weight": params["weight"], "w2": params["weight"]}, {"weight": "kernel", "w2": "kernel"},
       {"strict": False}, r"tensors 'weight' and 'w2' both map to 'kernel'"),
      ({**params, "weight": np.ones((64, 256), np.float32)}, LAYER_NAMES, {"convert": False},
       r"'weight'.*float tensor float32\[64, 256\].*convert=True to quantize"),
  ]
  for tensors, names, kwargs, pattern in cases:
    with pytest.raises(ValueError, match=pattern):
      interop.load_into(layer, tensors, names, **kwargs)
  dense = nnx.eval_shape(lambda: nnx.Linear(256, 64, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"'weight'.*QuantState\(nf4.*float float32\[256, 64\]"
                                       r".*convert=True to dequantize"):
    interop.load_into(dense, params, LAYER_NAMES, convert=False)
  with pytest.raises(ValueError, match=r"'weight' \(for 'kernel'\) has shape \[128, 64\] after "
                                       r"the torch \(out, in\) -> Flax \(in, out\) transpose"):
    interop.load_into(dense, {"weight": np.ones((64, 128), np.float32), "bias": np.ones(64)},
                      LAYER_NAMES, cast=True)
  # A dequantized bitsandbytes weight in a float model (convert=True): the same matmul.
  interop.load_into(dense, params, LAYER_NAMES)
  x = jnp.asarray(golden("bnb_linear4bit_dq1_io")["x"])
  np.testing.assert_allclose(np.asarray(dense(x)), golden("bnb_linear4bit_dq1_io")["y"],
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(TypeError, match="name_map must be None, a mapping or a callable"):
    interop.load_into(layer, params, 3)
  with pytest.raises(ValueError, match=r"model variable '(kernel|bias)': no rule maps model path"):
    interop.state_dict(layer, interop.LLAMA_RULES)
