"""Regression tests from the review of the bitsandbytes interop (each failed before its fix)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jaxquant.interop import bnb
from tests.helpers import BNB

LINEAR4 = BNB / "bnb_linear4bit_dq1_state.safetensors"
BLOB = "weight.quant_state.bitsandbytes__nf4"


def _raw() -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(str(LINEAR4))


def test_int8_quant_storage_loads_and_saves(tmp_path):
  """transformers' bnb_4bit_quant_storage="int8" (bnb's dtype2bytes has it): the packed bytes
  are stored as an int8 view; load bitcasts them, save writes the same view."""
  raw = _raw()
  ref = bnb.from_state_dict(raw)["weight"]
  state = bnb.from_state_dict({**raw, "weight": raw["weight"].view(np.int8)})["weight"]
  np.testing.assert_array_equal(np.asarray(state.data), np.asarray(ref.data))
  out = tmp_path / "i8.safetensors"
  bnb.save(out, {"weight": state, "bias": jnp.asarray(raw["bias"])}, quant_storage="int8")
  back = safetensors.numpy.load_file(str(out))
  assert back["weight"].dtype == np.int8 and back["weight"].shape == raw["weight"].shape
  assert back["weight"].tobytes() == raw["weight"].tobytes()


@pytest.mark.parametrize("storage", [jnp.bfloat16, np.uint8])
def test_quant_storage_accepts_a_dtype(storage):
  state = bnb.from_state_dict(_raw())["weight"]
  a = bnb.to_state_dict({"weight": state}, quant_storage=storage)["weight"]
  assert a.dtype == jnp.dtype(storage)
  assert a.tobytes() == _raw()["weight"].tobytes()


def test_quant_storage_rejects_other_dtypes():
  state = bnb.from_state_dict(_raw())["weight"]
  for bad in ("float64", None, "int4x"):
    with pytest.raises(ValueError, match=r"quant_storage must be one of \('uint8', 'int8'"):
      bnb.to_state_dict({"weight": state}, quant_storage=bad)


@pytest.mark.parametrize("field,value", [("blocksize", 64.0), ("shape", [True, 16384])])
def test_blob_numbers_must_be_json_integers(field, value):
  """A float or bool where bitsandbytes writes an int is a ValueError naming the blob, not a
  TypeError from deep inside the layout code."""
  raw = _raw()
  d = json.loads(bytes(raw[BLOB]))
  d[field] = value
  raw[BLOB] = np.frombuffer(json.dumps(d).encode(), np.uint8).copy()
  with pytest.raises(ValueError, match=rf"tensor '{BLOB}': {field} must be"):
    bnb.from_state_dict(raw)


def test_quantize_on_load_dtype_casts_only_floating_tensors(tmp_path):
  """dtype=bfloat16 cast integer buffers too: BERT's position_ids 0..511 came back as bfloat16,
  128 of them wrong (bfloat16 holds integers exactly only up to 256)."""
  path = tmp_path / "m.safetensors"
  safetensors.numpy.save_file({
      "embeddings.position_ids": np.arange(512, dtype=np.int64)[None],
      "mask": np.ones(4, bool),
      "layer.dense.weight": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32),
      "layer.dense.bias": np.ones(64, np.float32)}, str(path))
  out = bnb.quantize_on_load(path, dtype=jnp.bfloat16, progress=False)
  ids = out["embeddings.position_ids"]
  assert np.dtype(ids.dtype) == np.int64 or jnp.dtype(ids.dtype) == jnp.int32
  np.testing.assert_array_equal(np.asarray(ids), np.arange(512)[None])
  assert out["mask"].dtype == jnp.bool_ and out["layer.dense.bias"].dtype == jnp.bfloat16
  with pytest.raises(TypeError, match=r"dtype must be a float dtype .*got int8"):
    bnb.quantize_on_load(path, dtype=jnp.int8, progress=False)
