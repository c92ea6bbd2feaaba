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
