"""Sharded quantized fine-tuning on a ``jax.sharding.Mesh``.

- :func:`make_mesh` builds a ``(data, fsdp)`` mesh; :class:`PartitionRules` says what is split.
- :func:`plan` / :func:`partition_specs` / :func:`state_shardings` decide a PartitionSpec for
  every array: each QuantState's packed data, absmax and nested absmax split together with
  the rows of its weight, LoRA adapters following their base weight, optimizer state
  following its parameters.
- :func:`shard_model` / :func:`shard_state` place a model or any state tree;
  :func:`per_device_bytes` says what each device holds.
- :func:`use_mesh` runs every quantized linear per shard through ``shard_map`` (XLA cannot
  partition a Pallas custom call): the 4-bit matmul (:func:`sharded_matmul_4bit`) and the
  int8 ones (LLM.int8() ``int8_linear``, ``int8_weight_only_linear``; every ``Linear8bitLt``
  / ``Dense8bitLt``), each device gathering the quantized weight rows (never a dequantized
  copy) and multiplying its own slice of the batch.
- :func:`make_train_step` builds the sharded (Q)LoRA step (data x FSDP, one ``jax.jit`` with
  explicit in/out shardings); :func:`global_batch` assembles a batch from each process's rows
  when several hosts run it (after ``jax.distributed.initialize``).
"""

from jaxquant.sharding._distributed import global_batch as global_batch
from jaxquant.sharding._infer import Plan as Plan
from jaxquant.sharding._infer import named_shardings as named_shardings
from jaxquant.sharding._infer import partition_specs as partition_specs
from jaxquant.sharding._infer import plan as plan
from jaxquant.sharding._matmul import sharded_matmul_4bit as sharded_matmul_4bit
from jaxquant.sharding._matmul import use_mesh as use_mesh
from jaxquant.sharding._local import local_quant_state as local_quant_state
from jaxquant.sharding._mesh import DATA as DATA
from jaxquant.sharding._mesh import FSDP as FSDP
from jaxquant.sharding._mesh import batch_sharding as batch_sharding
from jaxquant.sharding._mesh import make_mesh as make_mesh
from jaxquant.sharding._per_shard import gather_state as gather_state
from jaxquant.sharding._place import model_shardings as model_shardings
from jaxquant.sharding._place import per_device_bytes as per_device_bytes
from jaxquant.sharding._place import shard_model as shard_model
from jaxquant.sharding._place import shard_state as shard_state
from jaxquant.sharding._place import state_shardings as state_shardings
from jaxquant.sharding._rules import PartitionRules as PartitionRules
from jaxquant.sharding._rules import quant_state_specs as quant_state_specs
from jaxquant.sharding._train import ShardedTrainer as ShardedTrainer
from jaxquant.sharding._train import TrainState as TrainState
from jaxquant.sharding._train import make_train_step as make_train_step

__all__ = [
    "DATA",
    "FSDP",
    "PartitionRules",
    "Plan",
    "ShardedTrainer",
    "TrainState",
    "batch_sharding",
    "gather_state",
    "global_batch",
    "local_quant_state",
    "make_mesh",
    "make_train_step",
    "model_shardings",
    "named_shardings",
    "partition_specs",
    "per_device_bytes",
    "plan",
    "quant_state_specs",
    "shard_model",
    "shard_state",
    "sharded_matmul_4bit",
    "state_shardings",
    "use_mesh",
]
