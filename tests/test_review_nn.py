"""Review pass of jaxquant.nn: drop-in fidelity with Flax, scan-over-layers models, the
documented LoRA optimizer recipes, and the examples' flag checks. Small shapes only."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxquant.nn as jqnn

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


class _TiedLM(nn.Module):
  """A bf16 table whose tied head gets a float32 query (after a float32 norm, say)."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(32, 64, param_dtype=jnp.bfloat16)
    return embed.attend(embed(ids).astype(jnp.float32))


@pytest.mark.parametrize("bits", [4, 8])
def test_linen_attend_promotes_query_like_nn_embed(bits):
  """nn.Embed.attend with dtype=None computes in the promotion of query and table dtypes
  (float32 logits here); the converted table and Embed4bit/8bit must do the same."""
  model, ids = _TiedLM(), jnp.arange(6)[None]
  variables = model.init(jax.random.key(0), ids)
  assert model.apply(variables, ids).dtype == jnp.float32
  config = jqnn.QuantConfig(load_in_4bit=True) if bits == 4 else jqnn.QuantConfig(
      load_in_8bit=True)
  qvars = jqnn.quantize_model(variables, config)
  assert jqnn.quantized_apply(model, qvars, ids).dtype == jnp.float32
  layer = (jqnn.Embed4bit if bits == 4 else jqnn.Embed8bit)(32, 64, param_dtype=jnp.bfloat16)
  lvars = layer.init(jax.random.key(0), ids)
  assert layer.apply(lvars, jnp.ones((2, 64)), method="attend").dtype == jnp.float32
  assert layer.apply(lvars, jnp.ones((2, 64), jnp.bfloat16),
                     method="attend").dtype == jnp.bfloat16
  assert layer.apply(lvars, ids).dtype == jnp.bfloat16  # the lookup keeps the table's dtype
  stable = jqnn.StableEmbed(32, 64, param_dtype=jnp.bfloat16)
  svars = stable.init(jax.random.key(0), ids)
  assert stable.apply(svars, jnp.ones((2, 64)), method="attend").dtype == jnp.float32


class _Block(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(64, 64, rngs=rngs)

  def __call__(self, x):
    return x + jnp.tanh(self.lin(x))


class _ScannedLM(nnx.Module):
  """Scan over layers: three blocks built with nnx.vmap (kernels (3, 64, 64)), a 2-D head."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _Block(rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(64, 8, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def step(block, x):
      return block(x)

    return self.head(step(self.blocks, x))


def test_lora_on_scanned_layers():
  """add_lora('all-linear') on a model whose layers are stacked by nnx.vmap and run by
  nnx.scan: stacked adapters that the scan slices (it crashed inside lax.scan), trainable
  and mergeable; dropout on such a layer is refused before anything is changed."""
  x = jnp.linspace(-2.0, 2.0, 128).reshape(2, 64)
  model = _ScannedLM(nnx.Rngs(0))
  fwd = nnx.jit(lambda m: m(x))
  with pytest.raises(ValueError, match="blocks.lin.*dropout=0.0"):
    jqnn.add_lora(model, jqnn.LoraConfig(r=4, dropout=0.1))
  assert not jqnn.lora_modules(model)  # nothing was wrapped
  y0 = fwd(model)
  jqnn.add_lora(model, jqnn.LoraConfig(r=4, alpha=8))
  lora = model.blocks.lin
  assert lora.lora_a.shape == (3, 64, 4) and lora.lora_b.shape == (3, 4, 64)
  bound = 1 / np.sqrt(64)  # PEFT's kaiming-uniform bound, per layer
  assert 0.8 * bound < float(jnp.abs(lora.lora_a[...]).max()) <= bound
  np.testing.assert_array_equal(fwd(model), y0)
  lora.lora_b.set_value(jnp.linspace(-0.1, 0.1, 3 * 4 * 64).reshape(3, 4, 64))
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2),
                           argnums=nnx.DiffState(0, jqnn.lora_filter)))(model)
  assert grads["blocks"]["lin"]["lora_a"].shape == (3, 64, 4)
  assert all(float(jnp.abs(g).max()) > 0 for g in grads["blocks"]["lin"]["lora_a"][...])
  # reference: the scan unrolled by hand, adapter of layer i on layer i
  k, b = model.blocks.lin.base.kernel[...], model.blocks.lin.base.bias[...]
  a, bb = lora.lora_a[...], lora.lora_b[...]
  h = x
  for i in range(3):
    h = h + jnp.tanh(h @ k[i] + b[i][None] + (h @ a[i]) @ bb[i] * 2.0)
  y = fwd(model)
  np.testing.assert_allclose(y, model.head(h), rtol=1e-5, atol=1e-5)
  jqnn.merge_lora(model)
  assert type(model.blocks.lin) is nnx.Linear
  np.testing.assert_allclose(fwd(model), y, rtol=1e-5, atol=1e-5)


def test_lora_mask_recipe_freezes_everything_else():
  """lora_mask's documented recipe: over all Params, only the adapters move (optax.masked
  alone, the recipe it gave before, passes the raw gradient to the frozen biases)."""
  model = nnx.Sequential(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), nnx.Linear(64, 8,
                                                                         rngs=nnx.Rngs(1)))
  jqnn.quantize_model(model, jqnn.QuantConfig(load_in_4bit=True))
  jqnn.add_lora(model, jqnn.LoraConfig(r=4))
  tx = optax.multi_transform({True: optax.adam(1e-2), False: optax.set_to_zero()},
                             jqnn.lora_mask)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  frozen = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam)))
  x = jnp.ones((2, 64))

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model))

  step(model, optimizer)
  step(model, optimizer)
  assert _leaves_equal(nnx.state(model, nnx.Not(nnx.LoRAParam)), frozen)
  assert float(jnp.abs(model.layers[1].lora_b[...]).max()) > 0


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                  strict=True))


def _example(name):
  spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name,argv,flag", [
    ("llama_qlora", ["--rank", "0"], "--rank"),
    ("llama_qlora", ["--lr", "-1"], "--lr"),
    ("llama_qlora", ["--hidden", "0"], "--hidden"),
    ("llama_qlora", ["--batch-size", "0"], "--batch-size"),
    ("llama_qlora", ["--seq", "100000"], "--seq"),
    ("llama_qlora", ["--hidden", "448"], "--hidden"),  # 14 heads, 3 KV heads
    ("qlora_finetune", ["--alpha", "0"], "--alpha"),
    ("qlora_finetune", ["--data", "/nonexistent.tsv"], "--data"),
])
def test_examples_refuse_bad_flags_before_any_work(name, argv, flag, capsys):
  """A bad flag stops the example at parse time with argparse's usage error naming it (the
  rank or learning rate of llama_qlora was refused only after the float base model had
  trained, and a bad --seq crashed inside numpy)."""
  with pytest.raises(SystemExit) as exc:
    _example(name).parse_args(argv)
  assert exc.value.code == 2
  assert flag in capsys.readouterr().err
  _example(name).parse_args([])  # the defaults are accepted


@pytest.mark.parametrize("layer", [jqnn.Linear4bit, jqnn.Linear8bitLt])
def test_dequantize_keeps_preferred_element_type(layer):
  """nnx.Linear(dtype=bf16, preferred_element_type=f32) returns float32; its quantized form
  does, and so must the nnx.Linear that dequantize_model gives back (it returned bf16)."""
  model = nnx.Sequential(nnx.Linear(64, 8, dtype=jnp.bfloat16,
                                    preferred_element_type=jnp.float32, rngs=nnx.Rngs(0)))
  x = jnp.ones((2, 64), jnp.bfloat16)
  assert model(x).dtype == jnp.float32
  config = (jqnn.QuantConfig(load_in_4bit=True) if layer is jqnn.Linear4bit
            else jqnn.QuantConfig(load_in_8bit=True))
  jqnn.quantize_model(model, config)
  assert type(model.layers[0]) is layer and model(x).dtype == jnp.float32
  jqnn.dequantize_model(model)
  assert type(model.layers[0]) is nnx.Linear and model(x).dtype == jnp.float32
  assert model.layers[0].preferred_element_type == jnp.float32


def test_quantize_model_twice_says_already_quantized():
  """A second quantize_model call (or one with the other bit width) names the cause."""
  model = nnx.Sequential(nnx.Linear(64, 8, rngs=nnx.Rngs(0)))
  jqnn.quantize_model(model, jqnn.QuantConfig(load_in_8bit=True))
  with pytest.raises(ValueError, match="already quantized.*dequantize_model"):
    jqnn.quantize_model(model, jqnn.QuantConfig(load_in_4bit=True))
  dense = nn.Dense(8)
  variables = dense.init(jax.random.key(0), jnp.ones((1, 64)))
  qvars = jqnn.quantize_model(variables, jqnn.QuantConfig(load_in_8bit=True))
  with pytest.raises(ValueError, match="already quantized.*dequantize_model"):
    jqnn.quantize_model(qvars, jqnn.QuantConfig(load_in_8bit=True))


class _ScaledDense(nn.Dense):
  def __call__(self, x):
    return super().__call__(x) * 10.0


class _ScaledEmbed(nn.Embed):
  """Gemma-style: the lookup is scaled, the tied head is not."""

  def __call__(self, ids):
    return super().__call__(ids) * 8.0


def _linen_8bit_error(model: nn.Module, ids: jax.Array) -> float:
  """Relative error of ``model`` run by ``quantized_apply`` on its LLM.int8() variables
  against the float model."""
  variables = model.init(jax.random.key(0), ids)
  want = model.apply(variables, ids)
  qvars = jqnn.quantize_model(variables, jqnn.QuantConfig(load_in_8bit=True))
  got = jqnn.quantized_apply(model, qvars, ids)
  return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


class _Subclassed(nn.Module):
  @nn.compact
  def __call__(self, ids):
    embed = _ScaledEmbed(32, 64)
    return embed.attend(_ScaledDense(64)(embed(ids)))


def test_linen_subclass_overrides_still_run():
  """Converted nn.Dense / nn.Embed subclasses that override __call__ and call super() keep
  their own code (the interceptor replaced the whole override: the scales were lost)."""
  assert _linen_8bit_error(_Subclassed(), jnp.arange(8)[None]) < 0.05


@pytest.mark.parametrize("rngs", [nnx.Rngs(3), np.int64(3)], ids=["Rngs", "np.int64"])
def test_linen_add_lora_takes_the_rngs_nnx_takes(rngs):
  """add_lora's rngs (documented: nnx.Rngs, a seed or a key) on Linen variables: an
  nnx.Rngs or a NumPy integer seed failed inside jax.random."""
  variables = nn.Dense(8).init(jax.random.key(0), jnp.ones((1, 64)))
  lora = jqnn.add_lora(variables, jqnn.LoraConfig(r=2), rngs=rngs)["lora"]
  assert lora["adapter"].lora_a.shape == (64, 2)
  if isinstance(rngs, np.integer):  # the same draw as the int seed
    same = jqnn.add_lora(variables, jqnn.LoraConfig(r=2), rngs=3)["lora"]
    np.testing.assert_array_equal(lora["adapter"].lora_a, same["adapter"].lora_a)
    model = jqnn.add_lora(nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0))),
                          jqnn.LoraConfig(r=2), rngs=rngs)  # and on an NNX model
    assert model.layers[0].lora_a.shape == (8, 2)


def test_quantize_model_names_the_layer_with_bad_weights():
  """A NaN weight (or, for LLM.int8(), one beyond float16's range) is reported with the
  layer's path, not just as 'kernel'; Linen variables are not changed."""
  model = nnx.Sequential(nnx.Linear(64, 64, rngs=nnx.Rngs(0)),
                         nnx.Linear(64, 8, rngs=nnx.Rngs(1)))
  model.layers[1].kernel.set_value(model.layers[1].kernel[...].at[0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="layer 'layers.1'.*NaN"):
    jqnn.quantize_model(model, jqnn.QuantConfig(load_in_4bit=True))
  variables = {"params": {"head": {"kernel": jnp.full((64, 8), 1e6), "bias": jnp.zeros(8)}}}
  with pytest.raises(ValueError, match="layer 'head'.*float16"):
    jqnn.quantize_model(variables, jqnn.QuantConfig(load_in_8bit=True))
  assert set(variables["params"]["head"]) == {"kernel", "bias"}


class _LinenScanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    block = nn.scan(_LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                    length=2)
    x, _ = block(name="blocks")(x, None)
    return nn.Dense(8, name="head")(x)


class _LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(16)(x), None


def test_linen_all_linear_warns_about_scanned_layers(caplog):
  """'all-linear' on Linen variables cannot reach layers scanned by nn.scan (their scan does
  not slice a 'lora' collection): say so instead of skipping them silently."""
  variables = _LinenScanned().init(jax.random.key(0), jnp.ones((1, 16)))
  with caplog.at_level("WARNING", logger="jaxquant.nn"):
    lora = jqnn.add_lora(variables, jqnn.LoraConfig(r=2))["lora"]
  assert set(lora) == {"head"}
  assert "blocks.Dense_0" in caplog.text and "stacked" in caplog.text


def test_quantize_model_says_why_nothing_was_converted():
  """A scan-over-layers model whose only 2-D layer is skipped: the error names the stacked
  layers kept in float (it claimed the model had no nnx.Linear at all)."""
  model = _ScannedLM(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'blocks.lin' \(weight of shape \(3, 64, 64\)"):
    jqnn.quantize_model(model, jqnn.QuantConfig(load_in_4bit=True, skip_modules=("head",)))
  variables = _LinenScanned().init(jax.random.key(0), jnp.ones((1, 16)))
  with pytest.raises(ValueError, match=r"'blocks.Dense_0' \(kernel of shape \(2, 16, 16\)"):
    jqnn.quantize_model(variables, jqnn.QuantConfig(load_in_8bit=True, skip_modules=("head",)))


class _Partitioned(nn.Module):
  """Sharding-annotated Linen params: kernels boxed by nn.with_(logical_)partitioning."""

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    x = nn.Dense(64, kernel_init=nn.with_partitioning(init, (None, "model")),
                 bias_init=nn.with_partitioning(nn.initializers.zeros_init(), ("model",)))(x)
    return nn.Dense(8, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))(x)


def test_linen_boxed_partitioned_params():
  """quantize_model / add_lora / merge_lora on variables holding partitioning boxes (crashed
  with AttributeError; add_lora found no Dense)."""
  model, x = _Partitioned(), jnp.linspace(-1.0, 1.0, 128).reshape(2, 64)
  variables = model.init(jax.random.key(0), x)
  want = model.apply(variables, x)
  qvars, summary = jqnn.quantize_model(variables, jqnn.QuantConfig(load_in_8bit=True),
                                       return_summary=True)
  assert [r.name for r in summary.layers] == ["Dense_0", "Dense_1"]
  got = jqnn.quantized_apply(model, qvars, x)
  assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 0.05
  lvars = jqnn.add_lora(variables, jqnn.LoraConfig(r=2))
  assert set(lvars["lora"]) == {"Dense_0", "Dense_1"}
  lvars["lora"] = jax.tree.map(lambda a: a + 0.01, lvars["lora"])
  adapted = jqnn.quantized_apply(model, lvars, x)
  merged = jqnn.merge_lora(lvars)
  np.testing.assert_allclose(model.apply(merged, x), adapted, rtol=1e-4, atol=1e-4)


class _Shared(nnx.Module):
  """One Linear reachable as 'proj' and 'tied' (tied weights), one other layer."""

  def __init__(self, rngs):
    self.tied = nnx.Linear(64, 64, rngs=rngs)
    self.proj = self.tied
    self.out = nnx.Linear(64, 8, rngs=rngs)

  def __call__(self, x):
    return self.out(self.tied(self.proj(x)))


def test_shared_layer_is_matched_by_any_of_its_paths():
  """skip_modules / target_modules naming the second path of a shared layer ('tied'; the
  graph lists it as 'proj') were ignored, or refused as matching no layer."""
  model = _Shared(nnx.Rngs(0))
  _, summary = jqnn.quantize_model(model, jqnn.QuantConfig(load_in_8bit=True,
                                                           skip_modules=("tied",)),
                                   return_summary=True)
  assert type(model.tied) is nnx.Linear and model.tied is model.proj
  assert type(model.out) is jqnn.Linear8bitLt and not summary.unused_skip_patterns
  jqnn.add_lora(model, jqnn.LoraConfig(r=2, target_modules=("tied",)))
  assert type(model.tied) is jqnn.LoraLinear and model.tied is model.proj
  assert type(model.out) is jqnn.Linear8bitLt
  assert len(jqnn.lora_modules(model)) == 1


def test_memory_footprint_counts_rng_keys():
  """A model holding an rng stream (nnx.Dropout, LoRA dropout) has PRNG key arrays, whose
  extended dtype numpy cannot read: memory_footprint raised TypeError."""
  model = nnx.Sequential(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), nnx.Dropout(0.1, rngs=nnx.Rngs(1)))
  keys = [a for a in jax.tree.leaves(nnx.state(model))
          if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)]
  assert keys
  want = 4 * (64 * 64 + 64) + sum(jax.random.key_data(k).nbytes for k in keys) + 4  # count
  assert jqnn.memory_footprint(model) == want
  abstract = nnx.eval_shape(lambda: nnx.Dropout(0.1, rngs=nnx.Rngs(1)))
  assert jqnn.memory_footprint(abstract) == want - 4 * (64 * 64 + 64)


class _ReadsTable(nn.Module):
  """A tied head written against the table itself, not attend."""

  def setup(self):
    self.embed = nn.Embed(32, 64)

  def __call__(self, ids):
    return self.embed(ids) @ self.embed.embedding.T


def test_linen_converted_embed_exposes_its_table():
  """Code reading nn.Embed's ``embedding`` attribute ran into AttributeError once the table
  was quantized; it now reads the dequantized table."""
  assert _linen_8bit_error(_ReadsTable(), jnp.arange(6)[None]) < 0.02


def test_save_lora_of_the_bare_linen_collection_says_what_to_pass(tmp_path):
  """The README trains ``lora = qvars.pop("lora")``; saving that dict alone was refused with
  'the model holds no LoRA adapters; add them with add_lora'."""
  model = nn.Sequential([nn.Dense(8)])
  variables = jqnn.add_lora(model.init(jax.random.key(0), jnp.ones((1, 64))),
                            jqnn.LoraConfig(r=2))
  lora = variables.pop("lora")
  with pytest.raises(ValueError, match=r"'lora' collection alone.*\{\*\*variables, 'lora'"):
    jqnn.save_lora(tmp_path / "adapter", lora)
  jqnn.save_lora(tmp_path / "adapter", {**variables, "lora": lora})


def test_quantize_model_reports_linear_subclasses():
  """Subclasses of nnx.Linear (flax's own nnx.LoRALinear, a user's layer) are left in float
  on purpose; the summary now lists them instead of leaving them out silently."""
  model = nnx.Sequential(nnx.LoRALinear(64, 64, lora_rank=2, rngs=nnx.Rngs(0)),
                         nnx.Linear(64, 8, rngs=nnx.Rngs(1)))
  _, summary = jqnn.quantize_model(model, jqnn.QuantConfig(load_in_8bit=True),
                                   return_summary=True)
  assert [r.name for r in summary.layers] == ["layers.1"]
  assert summary.skipped[0][0] == "layers.0" and "LoRALinear" in summary.skipped[0][1]


def test_layer_quantizers_take_a_constant_inside_jit():
  """A weight closed over by a jitted function is concrete: the finiteness and float16-range
  checks run on its value (they raised TracerBoolConversionError)."""
  from jaxquant.nn import _common
  w = jnp.asarray(np.random.default_rng(0).standard_normal((64, 32)), jnp.float32)
  q4 = jax.jit(lambda: _common.quantize_kernel_4bit(w, quant_type="nf4", blocksize=64,
                                                     double_quant=False))()
  eager = _common.quantize_kernel_4bit(w, quant_type="nf4", blocksize=64, double_quant=False)
  np.testing.assert_array_equal(np.asarray(q4.data), np.asarray(eager.data))
  q8 = jax.jit(lambda: _common.quantize_kernel_8bit(w))()
  np.testing.assert_array_equal(np.asarray(q8.data),
                                np.asarray(_common.quantize_kernel_8bit(w).data))
  bad = w.at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="NaN or Inf"):
    jax.jit(lambda: _common.quantize_kernel_8bit(bad))()
