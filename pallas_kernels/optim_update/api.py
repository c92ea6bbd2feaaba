"""Entry points of the optimizer-update family (see ``reference.py`` for semantics).

Ops, each taking ``(g, p, codes, absmax, maps, hparams, *, family, flags, write, max_unorm,
codebook)`` in the blocked layout ``(..., blocksize)``:

* ``optim_update_8bit``: ``"xla"`` (reference), ``"pallas"`` (fused Triton kernel) and
  ``"interpret"`` (the same kernel run by the Pallas interpreter);
* ``optim_update_fp32``: ``"xla"`` only (float32 state, small tensors; XLA fuses it).

The kernel covers blocksize 256, float32/bfloat16/float16 gradients and parameters, the dynamic
maps (``codebook="dynamic"``) and ``max_unorm == 0``; anything else goes to the reference. Its
codes are the reference's bytes for the same new state (``exact.py``).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _registry
from pallas_kernels.optim_update import kernel, reference

__all__ = ["update_8bit_xla", "update_8bit_pallas", "update_8bit_interpret", "supports"]

_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
KERNEL_BLOCKSIZE = kernel.BLOCKSIZE


def update_8bit_xla(g, p, codes, absmax, maps, hparams, *, family, flags=(), write="update",
                    max_unorm=0.0, codebook="dynamic", config=None):
  del codebook, config
  return reference.update_8bit(g, p, codes, absmax, maps, hparams, family=family, flags=flags,
                               write=write, max_unorm=max_unorm)


def _kernel_call(g, p, codes, absmax, maps, hparams, *, family, flags, write, max_unorm,
                 codebook, config, interpret):
  del codebook
  shape = g.shape
  bs = shape[-1]
  flat = lambda x: x.reshape(-1, bs)  # noqa: E731  (free: row-major, contiguous)
  out, new_codes, new_absmax = kernel.update_8bit(
      flat(g), None if p is None else flat(p), tuple(flat(q) for q in codes),
      tuple(a.reshape(-1) for a in absmax), maps, hparams, family=family, flags=flags,
      write=write, max_unorm=max_unorm, interpret=interpret,
      config=config or kernel.DEFAULT_CONFIG)
  return (out.reshape(shape), tuple(q.reshape(shape) for q in new_codes),
          tuple(a.reshape(shape[:-1]) for a in new_absmax))


def update_8bit_pallas(g, p, codes, absmax, maps, hparams, *, family, flags=(), write="update",
                       max_unorm=0.0, codebook="dynamic", config=None):
  return _kernel_call(g, p, codes, absmax, maps, hparams, family=family, flags=flags,
                      write=write, max_unorm=max_unorm, codebook=codebook, config=config,
                      interpret=False)


def update_8bit_interpret(g, p, codes, absmax, maps, hparams, *, family, flags=(),
                          write="update", max_unorm=0.0, codebook="dynamic", config=None):
  return _kernel_call(g, p, codes, absmax, maps, hparams, family=family, flags=flags,
                      write=write, max_unorm=max_unorm, codebook=codebook, config=config,
                      interpret=True)


def supports(g, p, codes, absmax, maps, hparams, *, family, flags=(), write="update",
             max_unorm=0.0, codebook="dynamic", config=None) -> bool:
  """Whether the fused kernel computes this call (else the reference does)."""
  del absmax, maps, hparams, family, flags, write, config
  if max_unorm or codebook != "dynamic":
    return False
  if g.ndim < 1 or g.shape[-1] != KERNEL_BLOCKSIZE or jnp.dtype(g.dtype) not in _FLOATS:
    return False
  if p is not None and (p.shape != g.shape or jnp.dtype(p.dtype) not in _FLOATS):
    return False
  if any(q.shape != g.shape or q.dtype != jnp.uint8 for q in codes):
    return False
  return g.size < 2**31 - 2**20  # int32 offsets inside the kernel


def update_fp32_xla(g, p, states, hparams, *, family, flags=(), write="update", max_unorm=0.0):
  return reference.update_fp32(g, p, states, hparams, family=family, flags=flags, write=write,
                               max_unorm=max_unorm)


_registry.register("optim_update_8bit", "xla", update_8bit_xla)
_registry.register("optim_update_8bit", "pallas", update_8bit_pallas, supports)
_registry.register("optim_update_8bit", "interpret", update_8bit_interpret, supports)
_registry.register("optim_update_fp32", "xla", update_fp32_xla)
