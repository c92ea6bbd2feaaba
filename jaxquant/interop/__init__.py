"""Checkpoint interoperability: :mod:`jaxquant.interop.bnb` reads and writes the safetensors
checkpoints of transformers + bitsandbytes."""

from jaxquant.interop import bnb as bnb

__all__ = ["bnb"]
