"""Host-offloaded optimizer state: the JAX counterpart of bitsandbytes' paged optimizers.

bitsandbytes allocates paged state in CUDA unified memory and lets the driver migrate pages.
JAX has no unified memory; it has *memory kinds*: an array lives in the device's HBM
(``"device"``) or in page-locked host memory (``"pinned_host"``), and inside ``jit``
``jax.device_put(x, jax.memory.Space.Device / Host)`` is an asynchronous copy over the host link.

The 8-bit transforms with ``offload=True`` keep every state array in ``pinned_host``; between
steps the device holds none of it. Inside the jitted update (``offload_chunk=None``, the
default) each parameter's state is copied in whole, updated by the fused kernel and copied out,
leaf by leaf in program order through :class:`LeafStream`: the copy of leaf ``i + 1`` waits
(``optimization_barrier``) for the update of leaf ``i - 1``, so it overlaps leaf ``i``'s update
and leaf ``i - 1``'s copy out (double buffering). Measured on an H100 (jax 0.11.2, W5 in
``benchmarks/optim_step.py``, 16 leaves of 8192^2): XLA stages 274 MB of state on the device
during the step (two leaves' worth; the whole 2.18 GB when the copies were of each leaf's
blocked views) and the step takes 1.8x the one-way host-link time (2.09x before; without the
barriers 4-14% slower than with them); both directions at once take 1.2x, the bound for any
schedule of these copies. ``benchmarks/offload_timeline.py`` shows why: XLA's GPU scheduler keeps
about two copies in flight and issues a leaf's copies in and out mostly one after the other.

``offload_chunk=n`` instead streams each leaf in chunks of ``n`` elements through a ``lax.scan``
that is software-pipelined by hand: iteration ``k`` copies chunk ``k + 1`` in, updates chunk
``k`` and copies it out (the scan stacks it into a host buffer). It bounds the device's share
of the state to a few chunks in principle, but XLA executes the dynamic slice of a host array as
host computation, and it measured slower; it is kept as an option and tested for equality.

``offload_state(tx)`` turns any Optax transform into one whose state lives on the host; for the
jaxquant 8-bit transforms it switches on the streaming above, for any other transform it moves
the whole state in at the start of ``update`` and out at the end (JAX's documented recipe).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

__all__ = ["to_host", "to_device", "host_memory_supported", "offload_state", "memory_kinds",
           "n_chunks", "stream_blocks", "LeafStream", "PREFETCH"]

HOST_KIND = "pinned_host"
_MAX_CHUNKS = 4096
# Leaves of state copied in ahead of the update that needs them (see LeafStream).
PREFETCH: int | None = 1


@functools.cache
def host_memory_supported() -> bool:
  """Whether the default device has a ``pinned_host`` memory (CPU and CUDA backends do)."""
  try:
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
  except (AttributeError, RuntimeError, NotImplementedError):
    return False
  return HOST_KIND in kinds and hasattr(jax, "memory")


def _require_host_memory() -> None:
  if not host_memory_supported():
    raise ValueError(
        f"offload=True needs a '{HOST_KIND}' memory kind on {jax.devices()[0]}, which this "
        "backend does not expose; use offload=False")


def to_host(tree: Any) -> Any:
  """Every array of ``tree`` in ``pinned_host`` memory (same sharding otherwise)."""
  _require_host_memory()
  return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Host), tree)


def to_device(tree: Any) -> Any:
  """Every array of ``tree`` in device memory."""
  return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device), tree)


def memory_kinds(tree: Any) -> dict[str, int]:
  """Bytes of the concrete arrays of ``tree`` per memory kind, e.g. ``{"pinned_host": n}``."""
  totals: dict[str, int] = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      continue
    kind = getattr(sharding, "memory_kind", None) or "device"
    totals[kind] = totals.get(kind, 0) + leaf.nbytes
  return totals


def n_chunks(n_blocks: int, blocksize: int, chunk_elems: int | None) -> int:
  """How many equal chunks to stream ``n_blocks`` blocks in: the smallest divisor of
  ``n_blocks`` giving chunks of at most ``chunk_elems`` elements (1 when the leaf fits in one
  chunk, when ``chunk_elems`` is None, or when no divisor gives a reasonable count)."""
  if chunk_elems is None:
    return 1
  want = -(-n_blocks * blocksize // chunk_elems)
  if want <= 1:
    return 1
  for count in range(want, min(n_blocks, 4 * want, _MAX_CHUNKS) + 1):
    if n_blocks % count == 0:
      return count
  return 1


def stream_blocks(update: Callable, gb: jax.Array, pb: jax.Array | None,
                  codes: tuple[jax.Array, ...], absmax: tuple[jax.Array, ...], chunks: int):
  """Run ``update`` over ``chunks`` equal row-chunks, the states streamed from host memory.

  Args:
    update: ``update(g, p, codes, absmax) -> (out, new_codes, new_absmax)`` on device arrays
      ``(rows, blocksize)`` / ``(rows,)``.
    gb, pb: gradient and parameter (or ``None``) in the blocked view ``(n_blocks, blocksize)``,
      on the device.
    codes, absmax: per state, ``uint8 (n_blocks, blocksize)`` and ``float32 (n_blocks,)`` in
      host memory.
    chunks: a divisor of ``n_blocks``.

  Returns:
    ``(out, new_codes, new_absmax)``: ``out`` on the device, the new states in host memory.
  """
  n_blocks = gb.shape[0]
  rows = n_blocks // chunks
  stack = lambda x: x.reshape(chunks, rows, *x.shape[1:])  # noqa: E731
  host_codes = tuple(stack(c) for c in codes)
  host_absmax = tuple(stack(a) for a in absmax)

  def fetch(k):
    take = lambda x: jax.lax.dynamic_index_in_dim(x, k, keepdims=False)  # noqa: E731
    return to_device((tuple(take(c) for c in host_codes), tuple(take(a) for a in host_absmax)))

  def body(carry, xs):
    k, (q, a) = carry
    following = fetch(jnp.minimum(k + 1, chunks - 1))
    g, p = xs
    out, new_q, new_a = update(g, p, q, a)
    return (k + 1, following), (out, to_host(tuple(new_q)), to_host(tuple(new_a)))

  xs = (stack(gb), None if pb is None else stack(pb))
  _, (out, new_codes, new_absmax) = jax.lax.scan(body, (jnp.int32(0), fetch(0)), xs)
  return (out.reshape(gb.shape), tuple(c.reshape(n_blocks, -1) for c in new_codes),
          tuple(a.reshape(n_blocks) for a in new_absmax))


class LeafStream:
  """Host-resident per-leaf state brought to the device in program order, a bounded number of
  leaves ahead of the update that needs it.

  XLA alone starts every host-to-device copy at the top of the program (nothing limits them), so
  the whole state lands on the device before the first update and the step runs the two link
  directions one after the other. Here the copy of leaf ``j`` goes through an
  ``optimization_barrier`` with the output of leaf ``j - 1 - prefetch``: it cannot start before
  that update is done. With ``prefetch=1`` (double buffering), leaf ``i + 1`` comes in while
  leaf ``i`` is updated and leaf ``i - 1``'s new state goes out, so the device holds about
  three leaves of state and both link directions are busy at once.

  Args:
    items: per leaf, a pytree of host arrays (the leaf's state).
    prefetch: leaves fetched ahead of the one being updated; ``None`` adds no ordering (XLA's
      schedule).
  """

  def __init__(self, items: list[Any], prefetch: int | None = PREFETCH):
    self._items = items
    self._prefetch = prefetch
    self._fetched: dict[int, Any] = {}
    self._done: dict[int, Any] = {}

  def _fetch(self, j: int) -> None:
    if j >= len(self._items) or j in self._fetched:
      return
    item = self._items[j]
    gate = None if self._prefetch is None else self._done.get(j - 1 - self._prefetch)
    if gate is not None:
      item, _ = jax.lax.optimization_barrier((item, gate))
    self._fetched[j] = to_device(item)

  def get(self, i: int) -> Any:
    """Leaf ``i``'s state on the device (and the next leaves' copies issued)."""
    self._fetch(i)
    for j in range(i + 1, i + 1 + (self._prefetch or 0)):
      self._fetch(j)
    return self._fetched.pop(i)

  def done(self, i: int, output: Any) -> None:
    """Record an output of leaf ``i``'s update: later copies wait for it."""
    self._done[i] = output


def offload_state(tx: optax.GradientTransformation, *,
                  chunk: int | None = None) -> optax.GradientTransformationExtraArgs:
  """``tx`` with its state kept in host memory between steps.

  Args:
    tx: any Optax transform. A jaxquant 8-bit transform moves its state leaf by leaf (see the
      module docstring); any other moves its whole state to the device for the update and back.
    chunk: for jaxquant transforms, ``offload_chunk`` (elements per streamed chunk).

  Returns:
    A transform whose ``init`` returns host-resident state and whose ``update`` returns the new
    state in host memory.
  """
  from jaxquant.optim import _core  # the core imports this module

  if isinstance(tx, _core.Optimizer8bit):
    return tx.with_options(offload=True, offload_chunk=chunk)
  _require_host_memory()

  def init_fn(params):
    return to_host(tx.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    inner = optax.with_extra_args_support(tx)
    new_updates, new_state = inner.update(updates, to_device(state), params, **extra_args)
    return new_updates, to_host(new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
