"""Orbax checkpoints of quantized models, LoRA adapters and 8-bit optimizer state.

QuantState metadata (quant type, blocksize, logical shape and dtype) and a CRC-32 of every
array travel in a JSON item beside Orbax's arrays and are checked on restore; arrays restore
bit-exactly onto any sharding.
"""

from jaxquant.checkpoint._manager import CheckpointManager as CheckpointManager
from jaxquant.checkpoint._orbax import PendingSave as PendingSave
from jaxquant.checkpoint._orbax import abstract as abstract
from jaxquant.checkpoint._orbax import metadata as metadata
from jaxquant.checkpoint._orbax import restore as restore
from jaxquant.checkpoint._orbax import save as save

__all__ = ["save", "restore", "metadata", "abstract", "CheckpointManager", "PendingSave"]
