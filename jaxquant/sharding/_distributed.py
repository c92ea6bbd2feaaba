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

from jaxquant.sharding._mesh import DATA, FSDP, batch_sharding

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
  """
  shardings = batch_sharding(mesh, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((np.shape(x)[0] * jax.process_count(),) + np.shape(x)[1:],
                                     np.asarray(x).dtype), local), batch_axes=batch_axes)
  return jax.tree.map(lambda s, x: jax.make_array_from_process_local_data(s, np.asarray(x)),
                      shardings, local)
