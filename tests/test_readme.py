"""The README's self-contained Python examples run as written and print what the README shows.

The blocks are taken from README.md itself (so the test follows the text), in order: the
functional quick start, the NNX QLoRA example (which then trains one step), the Linen example
(one step), and the 8-bit optimizer snippet with parameters supplied here. The checkpoint and
sharding blocks name files and a 1.1B model and are covered by their own tests.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _block(start: str) -> str:
  """The README block whose first line starts with ``start``."""
  found = [b for b in _blocks() if b.lstrip().startswith(start)]
  assert len(found) == 1, f"README has {len(found)} python blocks starting with {start!r}"
  return found[0]


def _comment_after(block: str, marker: str) -> str:
  """The ``# ...`` comment lines that follow the line containing ``marker``, joined."""
  lines = block.splitlines()
  i = next(k for k, line in enumerate(lines) if marker in line)
  out = []
  for line in lines[i + 1:]:
    if not line.lstrip().startswith("#"):
      break
    out.append(line.lstrip()[1:].strip())
  return " ".join(out)


def _run(source: str, namespace: dict) -> str:
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(source, str(README), "exec"), namespace)  # noqa: S102  (the README's code)
  return out.getvalue()


def test_readme_examples_run_and_print_what_they_claim(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # the NNX example saves its adapters to ./adapters
  ns: dict = {}
  quick = _block("import jax, jax.numpy as jnp, numpy as np")
  printed = " ".join(_run(quick, ns).split())
  assert printed == " ".join(_comment_after(quick, "print(state)").split())
  assert ns["y"].shape == (8, 4096) and ns["y"].dtype == jnp.bfloat16
  assert ns["dx"].shape == (8, 4096)

  nnx_block = _block("import jax, jax.numpy as jnp, optax")
  printed = _run(nnx_block, ns)
  claim = re.search(r"print\(summary\)\s*#\s*\.\.\.\s*(.*)", nnx_block).group(1).strip()
  assert claim in printed, (claim, printed)
  assert np.isfinite(float(ns["loss"]))
  assert (tmp_path / "adapters").exists()

  linen_block = _block("from flax import linen as nn")
  _run(linen_block, ns)
  lora, opt_state, loss = ns["train_step"](ns["lora"], ns["opt_state"], ns["ids"])
  assert np.isfinite(float(loss))
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), lora, ns["lora"])
  assert any(jax.tree.leaves(moved))


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")  # CPU: no donation
def test_readme_optimizer_snippet():
  keys = jax.random.split(jax.random.key(0), 2)
  params = {"w": jax.random.normal(keys[0], (256, 64)), "b": jnp.zeros((64,))}
  grads = {"w": jax.random.normal(keys[1], (256, 64)) * 1e-2, "b": jnp.ones((64,)) * 1e-2}
  ns = {"jax": jax, "params": params, "grads": grads}
  before = jax.tree.map(np.asarray, params)
  _run(_block("import jaxquant.optim as jqo"), ns)
  for name in ("w", "b"):
    assert not np.allclose(np.asarray(ns["params"][name]), before[name]), name
  # 8-bit moments (codes, uint8) for the large leaf: 256 * 64 >= min_8bit_size
  assert sum(a.dtype == jnp.uint8 and a.size == 256 * 64 for a in jax.tree.leaves(ns["state"])) == 2


@pytest.mark.parametrize("start", ["import jax, jax.numpy as jnp, numpy as np",
                                   "import jax, jax.numpy as jnp, optax",
                                   "from flax import linen as nn",
                                   "import jaxquant.optim as jqo"])
def test_readme_blocks_are_found(start):
  assert _block(start)
