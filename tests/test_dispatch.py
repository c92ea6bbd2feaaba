"""Backend selection: explicit argument, JAXQUANT_BACKEND, auto."""

import numpy as np
import pytest

import jaxquant as jq
import pallas_kernels
from jaxquant import _dispatch

W = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)


def test_auto_on_cpu_is_xla():
  assert _dispatch.select("quantize_4bit", None, W, blocksize=64, quant_type="nf4") in ("xla", "pallas")
  assert _dispatch.select("quantize_4bit", "xla", W, blocksize=64, quant_type="nf4") == "xla"


def test_explicit_unavailable_backend_is_an_error(monkeypatch):
  # An op with no kernel registered: asking for it explicitly says so.
  monkeypatch.setattr(pallas_kernels._registry, "_REGISTRY",
                      {"quantize_4bit": {"xla": pallas_kernels.get("quantize_4bit", "xla")}})
  with pytest.raises(ValueError, match="backend='pallas' is not available for quantize_4bit"):
    jq.quantize_4bit(W, backend="pallas")
  with pytest.raises(ValueError, match="backend='interpret' is not available"):
    jq.quantize_4bit(W, backend="interpret")
  monkeypatch.setenv("JAXQUANT_BACKEND", "pallas")
  assert _dispatch.select("quantize_4bit", None, W, blocksize=64, quant_type="nf4") == "xla"


def test_env_var_validated(monkeypatch):
  monkeypatch.setenv("JAXQUANT_BACKEND", "gpu")
  with pytest.raises(ValueError, match="environment variable JAXQUANT_BACKEND must be one of"):
    jq.quantize_4bit(W)
  monkeypatch.setenv("JAXQUANT_BACKEND", "xla")
  state = jq.quantize_4bit(W)
  np.testing.assert_array_equal(np.asarray(state.data),
                                np.asarray(jq.quantize_4bit(W, backend="xla").data))


def test_auto_takes_the_reference_for_arrays_on_the_host_cpu(monkeypatch):
  """On a GPU machine, arrays placed on the CPU (or ops under jax.default_device(cpu)) run on
  the CPU, where the Triton kernels cannot lower: auto must pick the reference there, and an
  explicit backend='pallas' must say why it cannot run."""
  import jax
  monkeypatch.setattr(_dispatch, "_on_cuda_gpu", lambda: True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  kw = dict(blocksize=64, quant_type="nf4")
  on_cpu = jax.device_put(W, jax.devices("cpu")[0])
  assert _dispatch.select("quantize_4bit", None, on_cpu, **kw) == "xla"
  with pytest.raises(ValueError, match=r"backend='pallas' needs a CUDA GPU, but this op runs on "
                                       r"'cpu'"):
    _dispatch.select("quantize_4bit", "pallas", on_cpu, **kw)
  monkeypatch.setenv("JAXQUANT_BACKEND", "pallas")
  assert _dispatch.select("quantize_4bit", None, on_cpu, **kw) == "xla"
  monkeypatch.delenv("JAXQUANT_BACKEND")
  with jax.default_device(jax.devices("cpu")[0]):
    assert _dispatch.select("quantize_4bit", None, W, **kw) == "xla"
  # Uncommitted arrays with no default device: the (patched) GPU backend runs them.
  assert _dispatch.select("quantize_4bit", None, W, **kw) == "pallas"
