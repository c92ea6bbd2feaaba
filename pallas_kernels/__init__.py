"""Pallas GPU kernels for k-bit quantization, each beside its pure-jnp reference.

This package depends on jax only. Kernels take arrays and static parameters (codebooks are
arguments, not globals), so each family can be used and tested on its own:

- ``blockwise_quant``: blockwise 4-bit (nf4/fp4) and 8-bit quantize/dequantize.
- ``fourbit_matmul``: ``x @ dequant(W).T`` and its input gradient.
- ``int8_matmul``: LLM.int8() row-wise quantization, int8 matmul, outlier decomposition.

Every family has ``reference.py`` (pure jnp: the CPU fallback and the oracle the kernels are
tested against) and ``api.py`` (the entry points, taking ``implementation=``).
"""

from pallas_kernels import _registry
from pallas_kernels._registry import get as get
from pallas_kernels._registry import implementations as implementations
from pallas_kernels.blockwise_quant import api as _blockwise_api  # noqa: F401  (registers)
from pallas_kernels.fourbit_matmul import api as _fourbit_api  # noqa: F401  (registers)
from pallas_kernels.int8_matmul import api as _int8_api  # noqa: F401  (registers)
from pallas_kernels.optim_update import api as _optim_api  # noqa: F401  (registers)

__all__ = ["get", "implementations"]
