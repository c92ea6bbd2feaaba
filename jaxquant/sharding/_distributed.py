"""Several hosts: global batches from each process's own rows.

Every process runs the same program and starts with ``jax.distributed.initialize(...)``
(arguments from the cluster's environment, or ``coordinator_address``, ``num_processes``,
``process_id``). Then ``jax.devices()`` lists the
devices of all processes, a mesh from :func:`jaxquant.sharding.make_mesh` spans them, and
``shard_state`` / the train step place and compute on all of them (each process holds the
shards of its own devices; ``all_gather`` of the packed weights crosses hosts through the
collectives backend: NCCL on GPUs, gloo on CPUs). Each process feeds only its slice of the
batch (:func:`global_batch`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxquant.sharding._mesh import DATA, FSDP, axis_size, batch_sharding

__all__ = ["global_batch"]


def global_batch(local: Any, mesh: Mesh, *,
                 batch_axes: str | Sequence[str] = (DATA, FSDP)) -> Any:
  """A global batch from each process's own rows (``jax.make_array_from_process_local_data``).

  Args:
    local: pytree of numpy / jax arrays: this process's rows. With one process it is the
      whole batch.
    mesh: the (global) mesh.
    batch_axes: mesh axes splitting the batch dimension.

  Returns:
    Pytree of global ``jax.Array`` s of leading size ``sum over processes``, split over
    ``batch_axes`` as the train step expects.

  Raises:
    ValueError: with several processes, batch axes that split nothing, or a leaf that is a
      scalar or whose global leading size does not divide over the batch axes (it cannot be
      assembled from per-process rows).
  """
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  processes = jax.process_count()
  shards = axis_size(mesh, batch_axes)
  if processes > 1 and shards == 1:
    raise ValueError(f"global_batch: batch_axes={batch_axes!r} split nothing on the mesh "
                     f"{dict(mesh.shape)}; with several processes the batch must be split "
                     "over axes that span them")

  def global_shape(path, x):
    shape = np.shape(x)
    if processes > 1 and (not shape or (shape[0] * processes) % shards):
      what = "a scalar" if not shape else f"{shape[0] * processes} rows"
      raise ValueError(f"global_batch: leaf {jax.tree_util.keystr(path)} is {what}, which does "
                       f"not split over the {shards} devices of batch_axes={batch_axes!r}; "
                       "with several processes every leaf needs a leading (batch) dimension "
                       "whose global size is a multiple of that")
    lead = (shape[0] * processes,) if shape else ()
    return jax.ShapeDtypeStruct(lead + shape[1:], np.asarray(x).dtype)

  shapes = jax.tree_util.tree_map_with_path(global_shape, local)
  shardings = batch_sharding(mesh, shapes, batch_axes=batch_axes)
  # the global shape is given so that JAX refuses rows its sharding cannot place (e.g. batch
  # axes that do not span the processes) instead of inferring a smaller array
  return jax.tree.map(lambda s, x, g: jax.make_array_from_process_local_data(
      s, np.asarray(x), g.shape), shardings, local, shapes)
