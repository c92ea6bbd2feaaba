"""Several hosts, simulated on one machine: two CPU processes joined by
``jax.distributed.initialize`` (2 devices each, 4 in all) shard a 4-bit weight across both
processes and run the per-shard matmul on a batch built from each process's own rows
(``jaxquant.sharding.global_batch``). Cross-process all-gathers go through gloo.

Run by pytest, this file starts itself twice as ``python test_sharding_multihost.py RANK PORT``.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROWS_PER_PROCESS = 4


def _worker(rank: int, port: int, out: str) -> None:
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=rank, initialization_timeout=60)
  import jax.numpy as jnp

  import jaxquant as jq
  import jaxquant.sharding as js

  assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
  mesh = js.make_mesh(data=1, fsdp=4)  # spans both processes
  weight = jax.random.normal(jax.random.key(0), (512, 256), jnp.float32) * 0.02  # same on both
  state = jq.quantize_nf4(weight, 64, True)
  sharded = js.shard_state(state, mesh)
  assert not sharded.data.is_fully_addressable
  per = js.per_device_bytes(sharded)  # this process's two devices
  assert len(per) == 2
  x = np.asarray(jax.random.normal(jax.random.key(1), (2 * ROWS_PER_PROCESS, 256)))
  mine = x[rank * ROWS_PER_PROCESS:(rank + 1) * ROWS_PER_PROCESS]
  batch = js.global_batch(mine, mesh)
  assert batch.shape == x.shape
  y = jax.jit(lambda x, s: js.sharded_matmul_4bit(x, s, mesh=mesh))(batch, sharded)
  rows = sorted(y.addressable_shards, key=lambda s: s.index[0].start)
  local = np.concatenate([np.asarray(s.data) for s in rows])
  expect = np.asarray(jq.matmul_4bit(jnp.asarray(mine), state))
  np.savez(out, local=local, expect=expect, bytes=np.asarray(list(per.values())),
           total=state.nbytes)
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_share_a_quantized_weight(tmp_path):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  procs = [subprocess.Popen([sys.executable, __file__, str(r), str(port),
                             str(tmp_path / f"out{r}.npz")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for r in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=240)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail("the two processes did not finish in 240 s")
  for r, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {r} failed:\n{log[-3000:]}"
  for r in range(2):
    out = np.load(tmp_path / f"out{r}.npz")
    np.testing.assert_allclose(out["local"], out["expect"], rtol=1e-5, atol=1e-6)
    assert all(b <= out["total"] / 4 * 1.1 for b in out["bytes"])  # a quarter per device


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
