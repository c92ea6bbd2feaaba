"""Test environment: 8 fake CPU devices for sharding tests, GPU tests skipped off-GPU,
deterministic hypothesis profile."""

import os

# Must happen before jax is imported anywhere.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=25)
settings.load_profile("ci")


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def pytest_collection_modifyitems(config, items):
  del config
  if _on_gpu():
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU (compiled Pallas kernel)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
