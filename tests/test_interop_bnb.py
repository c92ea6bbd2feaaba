"""jaxquant.interop.bnb against checkpoints written by bitsandbytes (tests/data/bnb/).

Linear4bit and Linear8bitLt state dicts load into QuantStates whose outputs match the recorded
bitsandbytes outputs; export reproduces every tensor, the JSON blob and the whole file byte for
byte; sharded checkpoints load lazily; quantize-on-load equals quantizing the loaded tensor;
bad files raise errors that name the tensor.
"""

import json
import os
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import jaxquant as jq
from jaxquant.interop import bnb
from jaxquant.interop import _qload, _safetensors
from tests.helpers import BNB, golden

LINEAR4 = {dq: BNB / f"bnb_linear4bit_dq{dq}_state.safetensors" for dq in (0, 1)}
LINEAR8 = {thr: BNB / f"bnb_linear8bit_thr{thr}_state.safetensors" for thr in (0, 6)}
ALL_FILES = list(LINEAR4.values()) + list(LINEAR8.values())
BLOB = "weight.quant_state.bitsandbytes__nf4"


def _raw(path) -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(str(path))


def _bytes(a) -> bytes:
  a = np.asarray(a)
  return a.dtype.name.encode() + str(a.shape).encode() + a.tobytes()


def _write(path, tensors, metadata=None):
  safetensors.numpy.save_file(tensors, str(path), metadata=metadata)
  return path


def _assert_states_equal(a: jq.QuantState, b: jq.QuantState):
  assert (a.shape, a.dtype, a.blocksize, a.quant_type, a.nested_blocksize) == (
      b.shape, b.dtype, b.blocksize, b.quant_type, b.nested_blocksize)
  for f in ("data", "absmax", "code", "nested_absmax", "nested_code", "offset"):
    x, y = getattr(a, f), getattr(b, f)
    assert (x is None) == (y is None), f
    if x is not None:
      assert _bytes(x) == _bytes(y), f


# -- bitsandbytes files in -------------------------------------------------------------------

@pytest.mark.parametrize("dq", (0, 1))
def test_linear4bit_state_dict_gives_recorded_outputs(dq):
  params = bnb.load(LINEAR4[dq], progress=False)
  assert set(params) == {"weight", "bias"}
  w = params["weight"]
  assert isinstance(w, jq.QuantState)
  assert (w.quant_type, w.shape, w.dtype, w.blocksize) == ("nf4", (64, 256), jnp.float32, 64)
  assert w.nested == bool(dq) and w.data.shape == (64, 128) and w.absmax.shape == (64, 4)
  io = golden(f"bnb_linear4bit_dq{dq}_io")
  y = jq.matmul_4bit(jnp.asarray(io["x"]), w, params["bias"])
  assert y.dtype == jnp.float32
  # float32 rounding: products of exactly representable codes, summed over K=256 in another
  # order than bitsandbytes' CUDA kernel.
  np.testing.assert_allclose(np.asarray(y), io["y"], rtol=1e-5, atol=1e-5)
  # Our quantizer reproduces bitsandbytes' bytes from the recorded float weight.
  ours = jq.quantize_4bit(io["w"], 64, bool(dq), "nf4")
  np.testing.assert_array_equal(np.asarray(ours.data), np.asarray(w.data))
  if not dq:
    np.testing.assert_array_equal(np.asarray(ours.absmax), np.asarray(w.absmax))


@pytest.mark.parametrize("thr", (0, 6))
def test_linear8bit_state_dict_gives_recorded_outputs(thr):
  params = bnb.load(LINEAR8[thr], progress=False)
  assert set(params) == {"weight", "bias"}
  w = params["weight"]
  assert (w.quant_type, w.shape, w.dtype) == ("int8_rowwise", (64, 256), jnp.float16)
  g = golden("bnb_int8")
  x = jnp.asarray(g[f"linear8bit_thr{thr}_x"], jnp.float16)
  y = jq.int8_linear(x, w, params["bias"], threshold=float(thr))
  assert y.dtype == jnp.float16
  ref = g[f"linear8bit_thr{thr}_y"]
  # float16 outputs: within one float16 ulp of |y| <= 16 (the outlier columns' 16-bit
  # product is summed in another order than cuBLAS).
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2**-10, atol=2**-10)
  if thr == 0:
    np.testing.assert_array_equal(np.asarray(y, np.float32), ref)
  # quantize_int8 of the recorded float weight gives the file's SCB exactly and its CB up to
  # exact .5 ties, which bitsandbytes' CUDA kernel rounds with an approximate reciprocal
  # (1 of 16384 codes, off by one).
  ours = jq.quantize_int8(g["w"])
  np.testing.assert_array_equal(np.asarray(ours.absmax), np.asarray(w.absmax))
  diff = np.asarray(ours.data, np.int32) - np.asarray(w.data, np.int32)
  assert np.abs(diff).max() <= 1 and np.count_nonzero(diff) <= 1


# -- out again, byte for byte ------------------------------------------------------------------

@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.stem)
def test_export_reproduces_every_tensor_and_the_file(path, tmp_path):
  original = _raw(path)
  exported = bnb.to_state_dict(bnb.load(path, progress=False))
  assert set(exported) == set(original)
  for k in original:
    assert _bytes(exported[k]) == _bytes(original[k]), k
  blobs = [k for k in original if "quant_state" in k]
  for k in blobs:  # the JSON blob: same key order, separators and float repr
    assert bytes(exported[k]) == bytes(original[k])
  out = tmp_path / "out.safetensors"
  bnb.save(out, bnb.load(path, progress=False), metadata=bnb.metadata(path))
  assert out.read_bytes() == path.read_bytes()


def test_default_metadata_is_transformers(tmp_path):
  out = tmp_path / "m.safetensors"
  bnb.save(out, bnb.load(LINEAR4[1], progress=False))
  assert bnb.metadata(out) == {"format": "pt"}
  assert set(_raw(out)) == set(_raw(LINEAR4[1]))


@pytest.mark.parametrize("storage", ("float16", "bfloat16", "float32"))
def test_quant_storage_is_a_bitcast(storage, tmp_path):
  params = bnb.load(LINEAR4[1], progress=False)
  out = tmp_path / "s.safetensors"
  bnb.save(out, params, quant_storage=storage)
  raw = _raw(out)
  item = np.dtype(jnp.dtype(storage)).itemsize
  assert raw["weight"].dtype == jnp.dtype(storage) and raw["weight"].shape == (8192 // item, 1)
  # The same bytes, NaN bit patterns included.
  assert raw["weight"].tobytes() == _raw(LINEAR4[1])["weight"].tobytes()
  _assert_states_equal(bnb.load(out, progress=False)["weight"], params["weight"])


CASES = [  # (shape, quant_type, blocksize, double quant, dtype)
    ((48, 128), "nf4", 64, False, jnp.float32),
    ((48, 128), "fp4", 128, True, jnp.bfloat16),
    ((3, 1000), "nf4", 64, True, jnp.float16),  # ragged: flat layout, odd block
    ((7, 33), "fp4", 32, False, jnp.float32),   # odd element count: padded final nibble
]


@pytest.mark.parametrize("shape,qt,bs,dq,dtype", CASES)
def test_jaxquant_states_round_trip(shape, qt, bs, dq, dtype, tmp_path):
  w = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
  state = jq.quantize_4bit(w, bs, dq, qt)
  tree = {"layer.weight": state, "layer.bias": jnp.arange(shape[0], dtype=dtype)}
  bnb.save(tmp_path / "a.safetensors", tree)
  back = bnb.load(tmp_path / "a.safetensors", progress=False)
  _assert_states_equal(back["layer.weight"], state)
  assert _bytes(back["layer.bias"]) == _bytes(tree["layer.bias"])
  raw = _raw(tmp_path / "a.safetensors")
  blob = json.loads(bytes(raw[f"layer.weight.quant_state.bitsandbytes__{qt}"]))
  assert list(blob)[:4] == ["quant_type", "blocksize", "dtype", "shape"]
  assert blob["dtype"] == jnp.dtype(dtype).name and blob["shape"] == list(shape)


def test_int8_state_round_trip(tmp_path):
  w = jax.random.normal(jax.random.key(2), (32, 64), jnp.float32)
  tree = {"model.fc.weight": jq.quantize_int8(w)}
  bnb.save(tmp_path / "i.safetensors", tree)
  raw = _raw(tmp_path / "i.safetensors")
  assert set(raw) == {"model.fc.weight", "model.fc.SCB", "model.fc.weight_format"}
  assert raw["model.fc.weight_format"].shape == () and int(raw["model.fc.weight_format"]) == 0
  back = bnb.load(tmp_path / "i.safetensors", int8_dtype=jnp.float32, progress=False)
  _assert_states_equal(back["model.fc.weight"], tree["model.fc.weight"])


# -- sharded checkpoints, lazily ---------------------------------------------------------------

def _model_tree():
  key = jax.random.key(3)
  tree = {}
  for i in range(3):
    k1, k2, key = jax.random.split(key, 3)
    tree[f"model.layers.{i}.mlp.up_proj.weight"] = jq.quantize_4bit(
        jax.random.normal(k1, (64, 128)), 64, i % 2 == 1, "nf4")
    tree[f"model.layers.{i}.mlp.up_proj.bias"] = jax.random.normal(k2, (64,))
  tree["model.norm.weight"] = jnp.ones((128,), jnp.bfloat16)
  return tree


def test_sharded_checkpoint_loads_lazily_with_progress(tmp_path, capsys):
  tree = _model_tree()
  files = bnb.save(tmp_path / "ckpt", tree, max_shard_size=6000)
  index = tmp_path / "ckpt" / "model.safetensors.index.json"
  assert str(index) in files and len(files) >= 3
  weight_map = json.loads(index.read_text())["weight_map"]
  assert weight_map["model.layers.0.mlp.up_proj.weight.absmax"] == weight_map[
      "model.layers.0.mlp.up_proj.weight"]  # a parameter's tensors stay together
  reads = []
  real_read = _safetensors.TensorSource.read

  def counting_read(self, name):
    reads.append(name)
    return real_read(self, name)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(_safetensors.TensorSource, "read", counting_read)
    loaded = {}
    for name, value in bnb.iter_load(tmp_path / "ckpt", progress=True):
      # Each step reads only the tensors of the parameter it yields.
      assert reads and all(r == name or r.startswith(name + ".") for r in reads), (name, reads)
      reads.clear()
      loaded[name] = value
  assert "Loading ckpt" in capsys.readouterr().err
  assert set(loaded) == set(tree)
  for k, v in tree.items():
    if isinstance(v, jq.QuantState):
      _assert_states_equal(loaded[k], v)
    else:
      assert _bytes(loaded[k]) == _bytes(v)
  # The index file and the directory load the same.
  assert set(bnb.load(index, progress=False)) == set(tree)


def test_a_parameter_split_across_shards(tmp_path):
  raw = _raw(LINEAR4[1])
  first = {k: v for k, v in raw.items() if k in ("weight", "bias")}
  second = {k: v for k, v in raw.items() if k not in first}
  _write(tmp_path / "a.safetensors", first)
  _write(tmp_path / "b.safetensors", second)
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {**{k: "a.safetensors" for k in first},
                                      **{k: "b.safetensors" for k in second}}}))
  _assert_states_equal(bnb.load(tmp_path, progress=False)["weight"],
                       bnb.load(LINEAR4[1], progress=False)["weight"])


# -- quantize on load ---------------------------------------------------------------------------

def _float_checkpoint(path, dtype=ml_dtypes.bfloat16):
  rng = np.random.default_rng(0)
  tensors = {
      "model.embed_tokens.weight": rng.standard_normal((100, 128)).astype(dtype),
      "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((128, 128)).astype(dtype),
      "model.layers.0.mlp.down_proj.weight": rng.standard_normal((128, 192)).astype(dtype),
      "model.layers.0.input_layernorm.weight": np.ones((128,), dtype),
      "lm_head.weight": rng.standard_normal((100, 128)).astype(dtype),
  }
  _write(path, tensors, {"format": "pt"})
  return tensors


@pytest.mark.parametrize("qt,dq", [("nf4", False), ("fp4", True)])
def test_quantize_on_load_equals_quantizing_each_tensor(qt, dq, tmp_path):
  tensors = _float_checkpoint(tmp_path / "model.safetensors")
  out = bnb.quantize_on_load(tmp_path, quant_type=qt, compress_statistics=dq, progress=False)
  assert set(out) == set(tensors)
  quantized = {k for k, v in out.items() if isinstance(v, jq.QuantState)}
  assert quantized == {"model.layers.0.self_attn.q_proj.weight",
                       "model.layers.0.mlp.down_proj.weight"}
  for k in quantized:
    _assert_states_equal(out[k], jq.quantize_4bit(jnp.asarray(tensors[k]), 64, dq, qt))
    assert out[k].dtype == jnp.bfloat16
  for k in set(tensors) - quantized:
    assert _bytes(out[k]) == _bytes(tensors[k])


def test_quantize_on_load_int8_sharded_and_custom_filter(tmp_path):
  tensors = _float_checkpoint(tmp_path / "src.safetensors", np.float32)
  tree = {k: jnp.asarray(v) for k, v in tensors.items()}
  bnb.save(tmp_path / "sharded", tree, max_shard_size=70_000)
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  out = bnb.quantize_on_load(tmp_path / "sharded", quant_type="int8", progress=False,
                             should_quantize=lambda n, s, d: n.endswith("q_proj.weight"),
                             dtype=jnp.bfloat16)
  q = out["model.layers.0.self_attn.q_proj.weight"]
  _assert_states_equal(q, jq.quantize_int8(tensors["model.layers.0.self_attn.q_proj.weight"]))
  assert out["lm_head.weight"].dtype == jnp.bfloat16


def test_quantize_on_load_keeps_bnb_quantized_parameters(tmp_path):
  _write(tmp_path / "m.safetensors", _raw(LINEAR4[0]))
  out = bnb.quantize_on_load(tmp_path / "m.safetensors", progress=False)
  _assert_states_equal(out["weight"], bnb.load(LINEAR4[0], progress=False)["weight"])


@pytest.mark.parametrize("qt,bs,dq", [("nf4", 64, True), ("fp4", 32, False), ("int8", 64, False)])
def test_quantize_on_load_reads_large_weights_by_row_slices(qt, bs, dq, tmp_path, monkeypatch):
  rng = np.random.default_rng(1)
  tensors = {"a.weight": rng.standard_normal((96, 256)).astype(ml_dtypes.bfloat16),
             "b.weight": rng.standard_normal((97, 128)).astype(np.float32),  # ragged last slice
             "c.weight": rng.standard_normal((50, 100)).astype(np.float16)}  # blocks cross rows
  _write(tmp_path / "m.safetensors", tensors)
  monkeypatch.setattr(_qload, "CHUNK_ELEMENTS", 4096)
  whole, slices = [], []
  monkeypatch.setattr(_safetensors.TensorSource, "read",
                      lambda self, n, _r=_safetensors.TensorSource.read: whole.append(n) or
                      _r(self, n))
  monkeypatch.setattr(_safetensors.TensorSource, "read_rows",
                      lambda self, n, a, b, _r=_safetensors.TensorSource.read_rows:
                      slices.append((n, a, b)) or _r(self, n, a, b))
  out = bnb.quantize_on_load(tmp_path / "m.safetensors", quant_type=qt, blocksize=bs,
                             compress_statistics=dq, progress=False)
  big = {"a.weight", "b.weight"} | ({"c.weight"} if qt == "int8" else set())
  assert set(whole) == set(tensors) - big  # the large weights were never read whole
  assert {n for n, _, _ in slices} == big
  assert all((b - a) * tensors[n].shape[1] <= 4096 for n, a, b in slices)
  assert [(a, b) for n, a, b in slices if n == "b.weight"][-1] == (96, 97)
  for k, v in tensors.items():  # the same bytes as quantizing each tensor whole
    ref = jq.quantize_int8(v) if qt == "int8" else jq.quantize_4bit(jnp.asarray(v), bs, dq, qt)
    _assert_states_equal(out[k], ref)


def test_quantize_on_load_rejects_non_finite(tmp_path):
  w = np.ones((8, 64), np.float32)
  w[3, 5] = np.inf
  _write(tmp_path / "m.safetensors", {"fc.weight": w})
  with pytest.raises(ValueError, match=r"'fc.weight'.*non-finite.*index 197"):
    bnb.quantize_on_load(tmp_path / "m.safetensors", progress=False)
  big = np.ones((64, 128), np.float32)
  big[40, 3] = np.nan
  big[2, 5] = 1e5  # beyond float16, which LLM.int8() weights are quantized from
  _write(tmp_path / "b.safetensors", {"fc.weight": big})
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(_qload, "CHUNK_ELEMENTS", 1024)  # the error names the index in the whole tensor
    with pytest.raises(ValueError, match=r"'fc.weight'.*non-finite.*index 5123"):
      bnb.quantize_on_load(tmp_path / "b.safetensors", progress=False)
    with pytest.raises(ValueError, match=r"'fc.weight'.*beyond float16's range.*index 261"):
      bnb.quantize_on_load(tmp_path / "b.safetensors", quant_type="int8", progress=False)


# -- failures name the tensor --------------------------------------------------------------------

def _mutated(tmp_path, base, drop=(), **replace):
  raw = dict(_raw(base))
  for k in drop:
    del raw[k]
  raw.update(replace)
  return _write(tmp_path / "bad.safetensors", raw)


def _blob(d: dict) -> np.ndarray:
  return np.frombuffer(json.dumps(d).encode(), np.uint8).copy()


@pytest.mark.parametrize("drop,pattern", [
    (("weight.absmax",), r"'weight.absmax'.*missing"),
    (("weight.nested_quant_map",), r"'weight.nested_quant_map'.*missing"),
    ((BLOB,), r"quant_state.*missing.*'weight.absmax'"),
    (("weight",), r"'weight'.*missing"),
])
def test_missing_4bit_tensor(tmp_path, drop, pattern):
  with pytest.raises(ValueError, match=pattern):
    bnb.load(_mutated(tmp_path, LINEAR4[1], drop=drop), progress=False)


@pytest.mark.parametrize("drop,pattern", [
    (("SCB",), r"'SCB'.*missing"),
])
def test_missing_int8_tensor(tmp_path, drop, pattern):
  with pytest.raises(ValueError, match=pattern):
    bnb.load(_mutated(tmp_path, LINEAR8[0], drop=drop), progress=False)


def test_wrong_shapes_and_dtypes(tmp_path):
  raw = _raw(LINEAR4[1])
  cases = {
      "weight.absmax": raw["weight.absmax"][:-1],
      "weight.quant_map": raw["weight.quant_map"].astype(np.float16),
      "weight": raw["weight"][:-2],
      "weight.nested_absmax": np.ones((2,), np.float32),
  }
  for key, bad in cases.items():
    with pytest.raises(ValueError, match=f"tensor '{key}'"):
      bnb.load(_mutated(tmp_path, LINEAR4[1], **{key: bad}), progress=False)
  with pytest.raises(ValueError,
                     match="tensor 'weight': packed 4-bit data must be stored as.*got int16"):
    bnb.load(_mutated(tmp_path, LINEAR4[0], weight=raw["weight"].astype(np.int16)),
             progress=False)
  with pytest.raises(ValueError, match="tensor 'SCB'.*64 values of dtype float32"):
    bnb.load(_mutated(tmp_path, LINEAR8[0], SCB=np.ones((63,), np.float32)), progress=False)
  with pytest.raises(ValueError, match="tensor 'weight_format'.*col32"):
    bnb.load(_mutated(tmp_path, LINEAR8[0], weight_format=np.asarray(1, np.uint8)),
             progress=False)


def test_unknown_quant_type_and_bad_json(tmp_path):
  raw = _raw(LINEAR4[0])
  blob = raw[BLOB]
  d = json.loads(bytes(blob))
  bad = _mutated(tmp_path, LINEAR4[0], drop=(BLOB,),
                 **{"weight.quant_state.bitsandbytes__nf3": _blob({**d, "quant_type": "nf3"})})
  with pytest.raises(ValueError, match=r"bitsandbytes__nf3'.*unknown quant type 'nf3'"):
    bnb.load(bad, progress=False)
  with pytest.raises(ValueError, match=r"quant_type 'fp4'.*disagrees"):
    bnb.load(_mutated(tmp_path, LINEAR4[0], **{BLOB: _blob({**d, "quant_type": "fp4"})}),
             progress=False)
  with pytest.raises(ValueError, match=rf"'{BLOB}'.*not the UTF-8 JSON"):
    bnb.load(_mutated(tmp_path, LINEAR4[0], **{BLOB: blob[:-3]}), progress=False)
  with pytest.raises(ValueError, match=r"blocksize must be one of"):
    bnb.load(_mutated(tmp_path, LINEAR4[0], **{BLOB: _blob({**d, "blocksize": 48})}),
             progress=False)
  with pytest.raises(ValueError, match=r"unknown quant_state fields \['foo'\]"):
    bnb.load(_mutated(tmp_path, LINEAR4[0], **{BLOB: _blob({**d, "foo": 1})}), progress=False)
  with pytest.raises(ValueError, match=r"'weight.extra'.*not part of the bitsandbytes format"):
    bnb.load(_mutated(tmp_path, LINEAR4[0], **{"weight.extra": np.ones(2, np.float32)}),
             progress=False)


def test_truncated_and_corrupted_files(tmp_path):
  data = LINEAR4[1].read_bytes()
  (tmp_path / "trunc.safetensors").write_bytes(data[:-100])
  with pytest.raises(ValueError, match=r"trunc.safetensors is not a readable safetensors"):
    bnb.load(tmp_path / "trunc.safetensors", progress=False)
  (tmp_path / "short.safetensors").write_bytes(data[:5])
  with pytest.raises(ValueError, match=r"short.safetensors is not a readable"):
    bnb.load(tmp_path / "short.safetensors", progress=False)
  (n,) = struct.unpack("<Q", data[:8])
  header = bytearray(data)
  header[8 + n // 2] = ord("}")
  (tmp_path / "hdr.safetensors").write_bytes(bytes(header))
  with pytest.raises(ValueError, match=r"hdr.safetensors is not a readable"):
    bnb.load(tmp_path / "hdr.safetensors", progress=False)
  absmax = _raw(LINEAR4[0])["weight.absmax"].copy()
  absmax[3] = np.nan
  with pytest.raises(ValueError, match=r"'weight.absmax'.*non-finite.*corrupted"):
    bnb.load(_mutated(tmp_path, LINEAR4[0], **{"weight.absmax": absmax}), progress=False)


def test_broken_sharded_index(tmp_path):
  tree = _model_tree()
  bnb.save(tmp_path / "c", tree, max_shard_size=6000)
  index = tmp_path / "c" / "model.safetensors.index.json"
  wm = json.loads(index.read_text())
  files = sorted(set(wm["weight_map"].values()))
  os.rename(tmp_path / "c" / files[1], tmp_path / "moved")
  with pytest.raises(FileNotFoundError, match=rf"shard {files[1]}.*missing"):
    bnb.load(tmp_path / "c", progress=False)
  os.rename(tmp_path / "moved", tmp_path / "c" / files[1])
  wm["weight_map"]["model.norm.weight"] = files[0]
  index.write_text(json.dumps(wm))
  with pytest.raises(ValueError, match=r"'model.norm.weight'.*does not hold it"):
    bnb.load(tmp_path / "c", progress=False)
  index.write_text("{not json")
  with pytest.raises(ValueError, match="is not a safetensors index"):
    bnb.load(tmp_path / "c", progress=False)
  with pytest.raises(FileNotFoundError, match="no safetensors checkpoint"):
    bnb.load(tmp_path / "nothing.safetensors", progress=False)


def test_save_rejects_what_bnb_cannot_hold(tmp_path):
  opt_state = jq.quantize_blockwise(jnp.ones((4, 256)), blocksize=256)
  with pytest.raises(ValueError, match="'mu'.*blockwise8.*no bitsandbytes checkpoint format"):
    bnb.save(tmp_path / "x.safetensors", {"mu": opt_state})
  with pytest.raises(ValueError, match="'fc.kernel'.*'<module>.weight'"):
    bnb.save(tmp_path / "x.safetensors", {"fc.kernel": jq.quantize_int8(jnp.ones((4, 8)))})
  with pytest.raises(TypeError, match="'fc'.*flat mapping"):
    bnb.save(tmp_path / "x.safetensors", {"fc": {"weight": jnp.ones(3)}})
  with pytest.raises(ValueError, match="'fc.SCB' would be written twice"):
    bnb.save(tmp_path / "x.safetensors", {"fc.weight": jq.quantize_int8(jnp.ones((4, 8))),
                                          "fc.SCB": jnp.ones(4)})
  with pytest.raises(ValueError, match="not a multiple of float32"):
    bnb.save(tmp_path / "x.safetensors", {"w": jq.quantize_4bit(jnp.ones((1, 6)), 32)},
             quant_storage="float32")
