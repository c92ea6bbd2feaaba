"""bitsandbytes / transformers checkpoints: read, write, quantize on load.

``load(path)`` gives ``{parameter name: QuantState | jax.Array}`` from safetensors files written
by transformers + bitsandbytes (4-bit nf4/fp4 with or without double quantization, LLM.int8());
``save(path, tree)`` writes them back byte for byte; ``quantize_on_load(path)`` quantizes a
regular checkpoint tensor by tensor while reading it.
"""

from jaxquant.interop._io import TRANSFORMERS_METADATA as TRANSFORMERS_METADATA
from jaxquant.interop._io import from_state_dict as from_state_dict
from jaxquant.interop._io import iter_load as iter_load
from jaxquant.interop._io import load as load
from jaxquant.interop._io import metadata as metadata
from jaxquant.interop._io import save as save
from jaxquant.interop._io import to_state_dict as to_state_dict
from jaxquant.interop._qload import default_should_quantize as default_should_quantize
from jaxquant.interop._qload import quantize_on_load as quantize_on_load
from jaxquant.interop._qload import release_host_memory as release_host_memory

__all__ = ["load", "iter_load", "save", "metadata", "to_state_dict", "from_state_dict",
           "quantize_on_load", "default_should_quantize", "release_host_memory",
           "TRANSFORMERS_METADATA"]
