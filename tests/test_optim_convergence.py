"""Convergence on a real data set: every 8-bit optimizer against its float32 Optax counterpart.

Task: scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes, no download), a
64-128-10 ReLU MLP, full-batch training for 40 steps from the same initialization. The hidden
layer (8192 weights) and the output layer (1280 weights, with ``min_8bit_size=1024``) have 8-bit
state; the biases stay in float32 (bitsandbytes' rule for small tensors).

Criterion: final training loss within 2% of the float32 optimizer's (LAMB: 5%, see below).

LAMB is the exception and the reason is bitsandbytes' state format, not the code: with blockwise
8-bit state, elements whose gradient is ~1e-3.5 of their block's largest lose their second
moment to the unsigned map's smallest code (3e-7 of the absmax) while their first moment
survives in the signed map, so a few elements of the Adam direction ``m / (sqrt(v) + eps)`` are
several times too large. Adam's per-element step hides this; LAMB divides the whole layer's step
by the norm of that direction (trust ratio) and so takes ~4% shorter steps. Measured: 3.0% higher
loss after 40 steps. (bitsandbytes has no 8-bit LAMB kernel on CUDA at all.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax import contrib

import jaxquant.optim as jo

sklearn_datasets = pytest.importorskip("sklearn.datasets")

STEPS = 40
OPTS = dict(min_8bit_size=1024)

PAIRS = {
    "adam": (jo.adam8bit(3e-3, **OPTS), optax.adam(3e-3), 0.02),
    "adamw": (jo.adamw8bit(3e-3, weight_decay=1e-2, **OPTS),
              optax.adamw(3e-3, weight_decay=1e-2), 0.02),
    "lion": (jo.lion8bit(1e-3, **OPTS), optax.lion(1e-3), 0.02),
    "sgd": (jo.sgd8bit(0.1, momentum=0.9, **OPTS), optax.sgd(0.1, momentum=0.9), 0.02),
    "rmsprop": (jo.rmsprop8bit(1e-3, **OPTS), optax.rmsprop(1e-3), 0.02),
    "adagrad": (jo.adagrad8bit(0.05, **OPTS), optax.adagrad(0.05), 0.02),
    "ademamix": (jo.ademamix8bit(3e-3, **OPTS), contrib.ademamix(3e-3), 0.02),
    "lamb": (jo.lamb8bit(1e-2, **OPTS), optax.lamb(1e-2), 0.05),
    "lars": (jo.lars8bit(0.5, **OPTS), optax.lars(0.5), 0.02),
}


def _data():
  x, y = sklearn_datasets.load_digits(return_X_y=True)
  return jnp.asarray(x / 16.0, jnp.float32), jax.nn.one_hot(jnp.asarray(y), 10)


def _init():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w1": 0.125 * jax.random.normal(k1, (64, 128)), "b1": jnp.zeros(128),
          "w2": 0.09 * jax.random.normal(k2, (128, 10)), "b2": jnp.zeros(10)}


def _loss(params, x, y):
  h = jax.nn.relu(x @ params["w1"] + params["b1"][None, :])
  return optax.softmax_cross_entropy(h @ params["w2"] + params["b2"][None, :], y).mean()


def _train(tx, x, y):
  def body(carry, _):
    p, s = carry
    g = jax.grad(_loss)(p, x, y)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  @jax.jit
  def run(p):
    (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), None, length=STEPS)
    return _loss(p, x, y)

  return float(run(_init()))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_final_loss_close_to_float32_optax(name):
  x, y = _data()
  tx8, tx32, tol = PAIRS[name]
  loss8, loss32 = _train(tx8, x, y), _train(tx32, x, y)
  assert np.isfinite(loss8)
  assert loss32 < 0.9 * float(_loss(_init(), x, y)), "the float32 run must actually train"
  assert abs(loss8 - loss32) <= tol * loss32, (loss8, loss32)
