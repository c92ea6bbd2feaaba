"""jaxquant.checkpoint: Orbax round trips of a QLoRA training state, bit for bit.

The state: a quantized model (nf4 with double quant, fp4, LLM.int8() and float tensors), LoRA
adapters, and an 8-bit optimizer state (blockwise8 QuantStates in a NamedTuple, as optax keeps
its state), saved from one layout and restored onto another mesh; async saves; the
CheckpointManager; adapters-only checkpoints; saves killed mid-way; bad checkpoints refused with
errors naming the entry.
"""

import gc
import glob
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxquant as jq
from jaxquant import checkpoint as ck
from jaxquant import nn as jqnn
from jaxquant import optim as jqoptim

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Adam8bitState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


def _training_state(n_layers: int = 2) -> dict[str, Any]:
  keys = iter(jax.random.split(jax.random.key(0), 8 * n_layers))
  layers, lora = [], []
  for i in range(n_layers):
    layers.append({
        "q": jq.quantize_4bit(jax.random.normal(next(keys), (64, 256)), 64, True, "nf4"),
        "up": jq.quantize_4bit(jax.random.normal(next(keys), (64, 256), jnp.bfloat16), 128,
                               False, "fp4"),
        "down": jq.quantize_int8(jax.random.normal(next(keys), (64, 256), jnp.float16)),
        "bias": jax.random.normal(next(keys), (64,)),
    })
    lora.append({"q": {"a": jax.random.normal(next(keys), (256, 8)),
                       "b": jax.random.normal(next(keys), (8, 64)) * (i + 1)}})
  adapters = jax.tree.leaves(lora)
  opt = Adam8bitState(
      count=jnp.asarray(7, jnp.int32),
      mu=[jq.quantize_blockwise(g * 0.1, blocksize=256) for g in adapters],
      nu=[jq.quantize_blockwise(g * g, jq.codebooks.dynamic_map(False), blocksize=256)
          for g in adapters])
  return {"model": {"layers": layers, "norm": jnp.ones((256,), jnp.bfloat16)}, "lora": lora,
          "opt": opt, "step": 7, "lr": 1e-4}


@pytest.fixture(scope="module")
def state():
  return _training_state()


def _entries(tree):
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def _assert_bit_exact(got, want):
  """Same structure, QuantState metadata, and bytes of every leaf (dtype and shape included)."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), (_, b) in zip(_entries(got), _entries(want)):
    if isinstance(b, (int, float)):
      assert type(a) is type(b) and a == b, path
      continue
    a, b = np.asarray(a), np.asarray(b)
    assert (a.dtype, a.shape) == (b.dtype, b.shape), path
    assert a.tobytes() == b.tobytes(), path


def _mesh(n: int, names=("x",)) -> Mesh:
  shape = (n,) if len(names) == 1 else (n // 2, 2)
  return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def _row_sharded(tree, mesh, axis="x"):
  """Every array with >= 2 dims and rows divisible by the axis, row-sharded; others replicated."""
  n = mesh.shape[axis]

  def place(x):
    if not hasattr(x, "shape"):
      return x
    spec = P(axis) if x.ndim >= 2 and x.shape[0] % n == 0 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))
  return jax.tree.map(place, tree)


# -- round trips -------------------------------------------------------------------------------

def test_training_state_restores_bit_exactly_onto_an_8_way_mesh(state, tmp_path):
  saved = _row_sharded(state, _mesh(2))  # written from a 2-way layout
  assert saved["model"]["layers"][0]["q"].data.sharding.spec == P("x")
  ck.save(tmp_path / "ckpt", saved)

  mesh8 = _mesh(8, ("data", "model"))

  def shard(name, abstract):  # rows over all 8 devices where they divide, else replicated
    rows = abstract.shape[0] if abstract.shape else 0
    return NamedSharding(mesh8, P(("data", "model")) if rows and rows % 8 == 0 else P())
  target = ck.abstract(state, shardings=shard)
  out = ck.restore(tmp_path / "ckpt", target)
  _assert_bit_exact(out, state)
  q = out["model"]["layers"][1]["q"]
  assert isinstance(q, jq.QuantState) and (q.quant_type, q.nested_blocksize) == ("nf4", 256)
  assert q.data.sharding == NamedSharding(mesh8, P(("data", "model")))
  assert q.data.addressable_shards[0].data.shape == (8, 128)
  assert q.offset.sharding == NamedSharding(mesh8, P())
  assert isinstance(out["opt"], Adam8bitState) and out["opt"].mu[0].quant_type == "blockwise8"
  # The restored state works, sharded: the same weights as before the round trip.
  np.testing.assert_array_equal(np.asarray(jq.dequantize_4bit(q)),
                                np.asarray(jq.dequantize_4bit(state["model"]["layers"][1]["q"])))


def test_restore_without_target_and_with_a_pytree_of_shardings(state, tmp_path):
  ck.save(tmp_path / "ckpt", state)  # from one device
  mesh4 = _mesh(4)
  out = ck.restore(tmp_path / "ckpt", shardings=NamedSharding(mesh4, P()))
  assert out["opt"]["mu"]["0"].quant_type == "blockwise8"  # plain nested dicts
  assert out["step"] == 7 and out["lr"] == 1e-4
  leaves = jax.tree.leaves(out)
  assert all(x.sharding.mesh.devices.size == 4 for x in leaves if isinstance(x, jax.Array))
  # A pytree of shardings like the target, a QuantState of shardings per quantized entry.
  rows = NamedSharding(mesh4, P("x"))
  shardings = jax.tree.map(lambda x: None, state, is_leaf=lambda x: isinstance(x, jq.QuantState))
  layer = state["model"]["layers"][0]
  shardings["model"]["layers"][0]["up"] = layer["up"].replace(
      data=rows, absmax=rows, code=NamedSharding(mesh4, P()))
  out = ck.restore(tmp_path / "ckpt", state, shardings=shardings)
  _assert_bit_exact(out, state)
  assert out["model"]["layers"][0]["up"].data.sharding == rows


def test_async_save_copies_before_returning(state, tmp_path):
  reference = jax.tree.map(np.asarray, state)
  donated = jax.tree.map(lambda x: x + 0 if isinstance(x, jax.Array) else x, state)
  pending = ck.save(tmp_path / "ckpt", donated, block=False)
  assert isinstance(pending, ck.PendingSave)
  for x in jax.tree.leaves(donated):  # the caller may free its buffers at once
    if isinstance(x, jax.Array):
      x.delete()
  assert pending.wait() == str(tmp_path / "ckpt") and pending.done()
  out = ck.restore(tmp_path / "ckpt", ck.abstract(state))
  _assert_bit_exact(jax.tree.map(np.asarray, out), reference)


def test_checkpoint_manager_steps_keep_and_interval(state, tmp_path):

  def at(step):
    return {**state, "lora": jax.tree.map(lambda a: a + step, state["lora"]), "step": step}
  with ck.CheckpointManager(tmp_path / "run", max_to_keep=2, save_interval_steps=2) as mngr:
    saved = [s for s in range(7) if mngr.save(s, at(s))]
    assert saved == [0, 2, 4, 6]
    mngr.wait_until_finished()
    assert mngr.all_steps() == [4, 6] and mngr.latest_step() == 6
    _assert_bit_exact(mngr.restore(target=state), at(6))
    _assert_bit_exact(mngr.restore(4, state), at(4))
    assert mngr.metadata(4)["entries"][-1]["path"] == ["step"]
    with pytest.raises(FileNotFoundError, match=r"no finalized checkpoint for step 2.*\[4, 6\]"):
      mngr.restore(2, state)
  assert sorted(os.listdir(tmp_path / "run")) == ["4", "6"]
  with ck.CheckpointManager(tmp_path / "run") as again:  # a resumed run sees the same steps
    assert again.all_steps() == [4, 6]
  with ck.CheckpointManager(tmp_path / "empty") as empty:
    with pytest.raises(FileNotFoundError, match="no finalized checkpoint"):
      empty.restore()
  with pytest.raises(ValueError, match="max_to_keep must be None or an int >= 1, got 0"):
    ck.CheckpointManager(tmp_path / "x", max_to_keep=0)


def test_adapters_only_checkpoint_is_small(state, tmp_path):
  ck.save(tmp_path / "full", state)
  ck.save(tmp_path / "lora", {"lora": state["lora"]})

  def size(d):
    return sum(p.stat().st_size for p in pathlib.Path(d).rglob("*") if p.is_file())
  adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(state["lora"]))
  assert size(tmp_path / "lora") < adapter_bytes + 40_000  # the arrays plus Orbax's metadata
  assert size(tmp_path / "lora") < size(tmp_path / "full") / 2
  assert [e["path"][0] for e in ck.metadata(tmp_path / "lora")["entries"]] == ["lora"] * 4
  # The adapters alone, from either checkpoint.
  _assert_bit_exact(ck.restore(tmp_path / "lora", {"lora": state["lora"]}),
                    {"lora": state["lora"]})
  _assert_bit_exact(ck.restore(tmp_path / "full", {"lora": state["lora"]}, strict=False),
                    {"lora": state["lora"]})
  with pytest.raises(ValueError, match=r"holds entries the target lacks: .*'model/layers/0/q'"
                                       ".*strict=False"):
    ck.restore(tmp_path / "full", {"lora": state["lora"]})
  with pytest.raises(ValueError, match=r"has no entry .*'model/layers/0/q'.*LoRA adapters only"):
    ck.restore(tmp_path / "lora", state)


class _QLoRA(nnx.Module):
  def __init__(self, rngs):
    self.q = jqnn.Linear4bit(256, 64, quant_type="nf4", double_quant=True, rngs=rngs)
    self.down = jqnn.Linear8bitLt(64, 64, threshold=6.0, rngs=rngs)

  def __call__(self, x):
    return self.down(self.q(x))


def _qlora_model():
  model = _QLoRA(nnx.Rngs(0))
  jqnn.add_lora(model, jqnn.LoraConfig(r=8, alpha=16), rngs=nnx.Rngs(1))
  return model


def test_nnx_qlora_model_and_8bit_optimizer_resume_exactly(tmp_path):
  """jaxquant.nn layers + LoRA + jaxquant.optim.adamw8bit: saved, restored from abstract
  targets (nothing allocated), and the next training step is identical."""
  model = _qlora_model()
  graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
  tx = jqoptim.adamw8bit(1e-2, min_8bit_size=0)
  opt_state = tx.init(lora)
  grads = jax.tree.map(lambda a: jnp.cos(a) * 0.1, lora)
  updates, opt_state = tx.update(grads, opt_state, lora)
  lora = optax.apply_updates(lora, updates)
  mu = opt_state.mu["q"]["lora_a"].get_value()
  assert isinstance(mu, jq.QuantState) and mu.quant_type == "blockwise8"
  ck.save(tmp_path / "run", {"lora": lora, "frozen": frozen, "opt": opt_state, "step": 1})
  ck.save(tmp_path / "adapters", {"lora": lora})

  abstract_model = nnx.eval_shape(_qlora_model)
  _, a_lora, a_frozen = nnx.split(abstract_model, nnx.LoRAParam, ...)
  target = {"lora": a_lora, "frozen": a_frozen, "opt": jax.eval_shape(tx.init, a_lora),
            "step": 0}
  out = ck.restore(tmp_path / "run", target)
  _assert_bit_exact(out, {"lora": lora, "frozen": frozen, "opt": opt_state, "step": 1})
  x = jnp.linspace(-1, 1, 512).reshape(2, 256)
  resumed = nnx.merge(graphdef, out["lora"], out["frozen"])
  assert isinstance(resumed.q.base.kernel, jqnn.QuantizedWeight)
  np.testing.assert_array_equal(np.asarray(resumed(x)),
                                np.asarray(nnx.merge(graphdef, lora, frozen)(x)))
  # The next step from the restored state equals the next step of the uninterrupted run.
  _, want = tx.update(grads, opt_state, lora)
  _, got = tx.update(grads, out["opt"], out["lora"])
  _assert_bit_exact(got, want)
  # The adapters alone: a small checkpoint, loaded into a freshly quantized model.
  fresh = _qlora_model()
  nnx.update(fresh, ck.restore(tmp_path / "adapters", {"lora": nnx.state(fresh,
                                                                        nnx.LoRAParam)})["lora"])
  np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(resumed(x)))


# -- interrupted saves -------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import asyncio, os, sys, time
    import numpy as np
    from orbax.checkpoint._src.path import atomicity
    from jaxquant import checkpoint as ck
    mode, d = sys.argv[1], sys.argv[2]

    def tree(step):
      return {"w": np.full((1 << 18,), step, np.float32), "b": np.arange(8) * step,
              "step": step}

    mngr = ck.CheckpointManager(os.path.join(d, "run"))
    mngr.save(1, tree(1))
    mngr.wait_until_finished()
    ck.save(os.path.join(d, "single"), tree(1))
    ck.save(os.path.join(d, "other"), tree(1))

    waiting = []

    async def hang(self, *args, **kwargs):  # every save stops before it commits
      waiting.append(self)
      await asyncio.sleep(600)
    atomicity.AtomicRenameTemporaryPath.finalize = hang
    mngr.save(2, tree(2))
    ck.save(os.path.join(d, "single"), tree(2), force=True, block=False)
    ck.save(os.path.join(d, "new"), tree(2), block=False)
    while len(waiting) < 3:  # all three have written their arrays and wait to commit
      time.sleep(0.005)
    if mode == "exit":
      os._exit(1)
    open(os.path.join(d, "saving"), "w").close()
    time.sleep(600)
""")


@pytest.mark.parametrize("mode", ["sigkill", "exit"])
def test_killed_save_never_restores_wrong_values(tmp_path, mode):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  child = subprocess.Popen([sys.executable, "-c", _CHILD, mode, str(tmp_path)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 90
    while not (tmp_path / "saving").exists() and child.poll() is None:
      assert time.monotonic() < deadline, "the child never reached the save"
      time.sleep(0.01)
    if mode == "sigkill":
      child.send_signal(signal.SIGKILL)
    log, _ = child.communicate(timeout=60)
  finally:
    if child.poll() is None:
      child.kill()
      child.communicate()
  assert child.returncode in (1, -signal.SIGKILL), log.decode()[-2000:]

  assert glob.glob(str(tmp_path / "run" / "2.orbax-checkpoint-tmp*"))  # the interrupted step
  with ck.CheckpointManager(tmp_path / "run") as mngr:
    assert mngr.all_steps() == [1] and mngr.latest_step() == 1
    out = mngr.restore()
    assert out["step"] == 1 and np.all(out["w"] == 1) and list(out["b"]) == list(range(8))
    with pytest.raises(FileNotFoundError, match="no finalized checkpoint for step 2"):
      mngr.restore(2)
    # The run resumes: saving step 2 again replaces the leftover temporary directory.
    mngr.save(2, {"w": np.full((1 << 18,), 2, np.float32), "b": np.arange(8) * 2, "step": 2})
    mngr.wait_until_finished()
    assert mngr.all_steps() == [1, 2] and mngr.restore(2)["step"] == 2
  # A forced overwrite that died leaves no checkpoint (never the half-written one).
  with pytest.raises(FileNotFoundError, match="no checkpoint at"):
    ck.restore(tmp_path / "single")
  with pytest.raises(FileNotFoundError, match="no checkpoint at"):
    ck.restore(tmp_path / "new")
  tmp = glob.glob(str(tmp_path / "new.orbax-checkpoint-tmp*"))
  assert tmp
  with pytest.raises(ValueError, match="temporary directory of an unfinished"):
    ck.restore(tmp[0])
  assert ck.restore(tmp_path / "other")["step"] == 1  # untouched


# -- bad checkpoints and bad targets -----------------------------------------------------------

@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
  tree = {"w": jq.quantize_4bit(jax.random.normal(jax.random.key(1), (64, 256)), 64, True,
                                "nf4"),
          "b": jnp.arange(64, dtype=jnp.float32), "count": 3}
  path = tmp_path_factory.mktemp("ck") / "ckpt"
  ck.save(path, tree)
  return path, tree


def test_another_layout_is_refused_naming_the_entry(small_ckpt):
  path, tree = small_ckpt
  w = tree["w"]

  def like(*args):  # an abstract QuantState (nothing computed or compiled)
    return jax.eval_shape(lambda: jq.quantize_4bit(jnp.ones((64, 256)), *args))
  cases = [
      ({**tree, "w": like(64, True, "fp4")}, r"entry 'w' .*nf4.*target expects.*fp4.*quant_type"),
      ({**tree, "w": like(128, True, "nf4")}, r"entry 'w' .*blocksize: 64 vs 128"),
      ({**tree, "w": like(64, False, "nf4")}, r"entry 'w' .*nested_blocksize: 256 vs None"),
      ({**tree, "b": jnp.zeros((64,), jnp.bfloat16)},
       r"entry 'b' .*float32\[64\], but the target expects bfloat16\[64\]"),
      ({**tree, "b": jnp.zeros((32,))}, r"entry 'b' .*float32\[64\].*float32\[32\]"),
      ({**tree, "b": jax.eval_shape(lambda: jq.quantize_int8(jnp.ones((64, 1))))},
       r"entry 'b' .*an array.*quantized"),
      ({**tree, "count": 3.0}, r"entry 'count' .*a Python int, the target has a Python float"),
      ({**tree, "extra": jnp.zeros(3)}, r"has no entry 'extra' that the target needs"),
      ({"w": w, "b": tree["b"]}, r"holds entries the target lacks: 'count'"),
      ([w, tree["b"], 3], r"no entry '0', '1', '2'"),
  ]
  for target, pattern in cases:
    with pytest.raises(ValueError, match=pattern):
      ck.restore(path, target)
  mesh3 = Mesh(np.array(jax.devices()[:3]), ("x",))
  with pytest.raises(ValueError, match=r"entry 'b': sharding .* does not fit shape \(64,\)"):
    ck.restore(path, tree, shardings=lambda name, a: (
        NamedSharding(mesh3, P("x")) if name == "b" else None))


def _copy(path, tmp_path):
  dst = tmp_path / "copy"
  shutil.copytree(path, dst)
  return dst


def _data_files(ckpt):
  return sorted(glob.glob(str(ckpt / "state" / "ocdbt.process_0" / "d" / "*")),
                key=os.path.getsize)


# Orbax abandons its other pending array reads when one fails; their coroutines are collected
# unawaited, which pytest reports as unraisable.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_and_truncated_files_are_refused(small_ckpt, tmp_path):
  path, tree = small_ckpt
  bad = _copy(path, tmp_path)
  largest = _data_files(bad)[-1]  # holds w/data, the 8 KB of packed nibbles
  raw = bytearray(pathlib.Path(largest).read_bytes())
  raw[len(raw) // 2] ^= 0x10
  pathlib.Path(largest).write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=r"entry 'w/data' of checkpoint .* is corrupted: .*CRC-32"):
    ck.restore(bad, tree)
  assert ck.restore(bad, tree, verify=False)["count"] == 3  # read anyway when asked
  pathlib.Path(largest).write_bytes(bytes(raw[: len(raw) // 3]))
  with pytest.raises(ValueError, match=r"corrupted or incomplete: entry 'w' cannot be read"):
    ck.restore(bad, tree)
  shutil.rmtree(bad)

  bad = _copy(path, tmp_path)
  (bad / "jaxquant" / "metadata").write_text("{not json")
  with pytest.raises(ValueError, match="cannot read the jaxquant metadata"):
    ck.restore(bad, tree)
  shutil.rmtree(bad)

  bad = _copy(path, tmp_path)
  shutil.rmtree(bad / "state")
  with pytest.raises(ValueError, match=r"corrupted or incomplete: entry '.*' cannot be read"):
    ck.restore(bad)
  with pytest.raises(FileNotFoundError, match="no checkpoint at"):
    ck.restore(tmp_path / "missing")
  gc.collect()  # Orbax's abandoned reads are reported here, not in a later test


def test_bad_trees_are_refused_at_save(tmp_path):
  with pytest.raises(TypeError, match=r"entry 'a/name' is a str"):
    ck.save(tmp_path / "a", {"a": {"name": "x"}})
  broken = jq.quantize_4bit(jnp.ones((8, 64)), 64).replace(absmax=jnp.ones((3,)))
  with pytest.raises(ValueError, match=r"entry 'w': QuantState.absmax has shape \(3,\)"):
    ck.save(tmp_path / "c", {"w": broken})
  with pytest.raises(ValueError, match="no arrays to save"):
    ck.save(tmp_path / "d", {})
  assert not os.path.exists(tmp_path / "a")


# -- flax.nnx.Optimizer with 8-bit moments: QuantStates before the first update, mappings of
# their arrays after it; a run must resume from a checkpoint of either form. --------------


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(64, 128, rngs=rngs)  # 8192 weights: 8-bit moments; bias: float32


def _nnx_setup():
  from jaxquant import optim as jo  # noqa: PLC0415
  model = _Net(nnx.Rngs(0))
  return model, nnx.Optimizer(model, jo.adamw8bit(1e-2), wrt=nnx.Param)


_X = jax.random.normal(jax.random.key(1), (4, 64))


@nnx.jit
def _nnx_step(model, optimizer):
  optimizer.update(model, nnx.grad(lambda m: jnp.mean(m.dense(_X) ** 2))(model))


def _leaves(*modules):
  return [np.asarray(x) for m in modules for x in jax.tree.leaves(nnx.state(m))]


def test_nnx_optimizer_resumes_from_updated_8bit_state(tmp_path):
  model, opt = _nnx_setup()
  for _ in range(2):
    _nnx_step(model, opt)
  kernel_mu = opt.opt_state.mu["dense"]["kernel"].get_value()
  assert not isinstance(kernel_mu, jq.QuantState)  # what flax holds after an update
  ck.save(tmp_path / "ck", {"model": nnx.state(model), "opt": nnx.state(opt)})
  model2, opt2 = _nnx_setup()  # fresh: QuantState moments
  assert isinstance(opt2.opt_state.mu["dense"]["kernel"].get_value(), jq.QuantState)
  restored = ck.restore(tmp_path / "ck", {"model": nnx.state(model2), "opt": nnx.state(opt2)},
                        strict=True)
  assert isinstance(restored["opt"]["opt_state"]["mu"]["dense"]["kernel"].get_value(),
                    jq.QuantState)
  nnx.update(model2, restored["model"])
  nnx.update(opt2, restored["opt"])
  for _ in range(2):
    _nnx_step(model, opt)
    _nnx_step(model2, opt2)
  for a, b in zip(_leaves(model, opt), _leaves(model2, opt2)):
    np.testing.assert_array_equal(a, b)


def test_nnx_optimizer_restores_fresh_8bit_state_into_updated_one(tmp_path):
  model, opt = _nnx_setup()
  ck.save(tmp_path / "ck", {"opt": nnx.state(opt)})  # QuantState moments
  model2, opt2 = _nnx_setup()
  _nnx_step(model2, opt2)  # now mappings, other values
  restored = ck.restore(tmp_path / "ck", {"opt": nnx.state(opt2)}, strict=True)
  nnx.update(opt2, restored["opt"])
  for moment in ("mu", "nu"):
    saved = getattr(opt.opt_state, moment)["dense"]
    back = getattr(opt2.opt_state, moment)["dense"]
    for field in ("data", "absmax", "code"):
      np.testing.assert_array_equal(np.asarray(back["kernel"].get_value()[field]),
                                    np.asarray(getattr(saved["kernel"].get_value(), field)))
    np.testing.assert_array_equal(np.asarray(back["bias"].get_value()),
                                  np.asarray(saved["bias"].get_value()))
  assert int(opt2.opt_state.count.get_value()) == 0


def test_quant_state_from_saved_arrays_checks_their_shapes(tmp_path):
  state = jq.quantize_blockwise(jnp.linspace(-1.0, 1.0, 4096, dtype=jnp.float32))
  ck.save(tmp_path / "ck", {"w": {"data": state.data[:2048], "absmax": state.absmax,
                                  "code": state.code}})
  with pytest.raises(ValueError, match=r"QuantState\.data is uint8\[2048\] in the checkpoint"):
    ck.restore(tmp_path / "ck", {"w": state})
  ck.save(tmp_path / "ok", {"w": {"data": state.data, "absmax": state.absmax,
                                  "code": state.code}})
  back = ck.restore(tmp_path / "ok", {"w": state})["w"]
  assert isinstance(back, jq.QuantState)
  np.testing.assert_array_equal(np.asarray(back.data), np.asarray(state.data))


def test_shardings_tree_with_none_nodes(tmp_path):
  mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
  tree = {"a": jnp.arange(16.0).reshape(4, 4), "b": None, "c": {"d": jnp.zeros((8,))}}
  ck.save(tmp_path / "ck", tree)
  split = NamedSharding(mesh, P("x"))
  back = ck.restore(tmp_path / "ck", tree, shardings={"a": split, "b": None, "c": {"d": None}})
  assert back["a"].sharding == split and back["b"] is None
  assert back["c"]["d"].sharding == tree["c"]["d"].sharding  # None: the target's own
  np.testing.assert_array_equal(np.asarray(back["a"]), np.asarray(tree["a"]))
  with pytest.raises(ValueError, match="shardings has entries the target lacks: 'e'"):
    ck.restore(tmp_path / "ck", tree, shardings={"a": split, "e": split})
