"""Optax optimizers with blockwise 8-bit state (bitsandbytes' 8-bit optimizers) and host-offloaded
("paged") state.

Transforms (Optax's ``scale_by_*`` with 8-bit state): :func:`scale_by_adam_8bit`,
:func:`scale_by_lion_8bit`, :func:`scale_by_sgd_momentum_8bit`, :func:`scale_by_rmsprop_8bit`,
:func:`scale_by_adagrad_8bit`, :func:`scale_by_ademamix_8bit`.

Aliases (Optax's names and defaults): :func:`adam8bit`, :func:`adamw8bit`, :func:`lion8bit`,
:func:`sgd8bit`, :func:`rmsprop8bit`, :func:`adagrad8bit`, :func:`ademamix8bit`,
:func:`lamb8bit`, :func:`lars8bit`.

Also: :func:`update_and_apply` (update and write the parameters in one fused pass),
:func:`offload_state` (keep any transform's state in host memory), :func:`percentile_clipping`,
:class:`Options` (storage options accepted as keywords by every transform and alias).
"""

from jaxquant.optim._aliases import adagrad8bit as adagrad8bit
from jaxquant.optim._aliases import adam8bit as adam8bit
from jaxquant.optim._aliases import adamw8bit as adamw8bit
from jaxquant.optim._aliases import ademamix8bit as ademamix8bit
from jaxquant.optim._aliases import lamb8bit as lamb8bit
from jaxquant.optim._aliases import lars8bit as lars8bit
from jaxquant.optim._aliases import lion8bit as lion8bit
from jaxquant.optim._aliases import rmsprop8bit as rmsprop8bit
from jaxquant.optim._aliases import sgd8bit as sgd8bit
from jaxquant.optim._clipping import PercentileClippingState as PercentileClippingState
from jaxquant.optim._clipping import percentile_clipping as percentile_clipping
from jaxquant.optim._config import Options as Options
from jaxquant.optim._core import Optimizer8bit as Optimizer8bit
from jaxquant.optim._core import update_and_apply as update_and_apply
from jaxquant.optim._offload import host_memory_supported as host_memory_supported
from jaxquant.optim._offload import memory_kinds as memory_kinds
from jaxquant.optim._offload import offload_state as offload_state
from jaxquant.optim._state import dequantize as dequantize_state
from jaxquant.optim._state import state_nbytes as state_nbytes
from jaxquant.optim._transforms import ScaleByAdagrad8bitState as ScaleByAdagrad8bitState
from jaxquant.optim._transforms import ScaleByAdam8bitState as ScaleByAdam8bitState
from jaxquant.optim._transforms import ScaleByAdemamix8bitState as ScaleByAdemamix8bitState
from jaxquant.optim._transforms import ScaleByLion8bitState as ScaleByLion8bitState
from jaxquant.optim._transforms import ScaleByRms8bitState as ScaleByRms8bitState
from jaxquant.optim._transforms import ScaleBySgdMomentum8bitState as ScaleBySgdMomentum8bitState
from jaxquant.optim._transforms import scale_by_adagrad_8bit as scale_by_adagrad_8bit
from jaxquant.optim._transforms import scale_by_adam_8bit as scale_by_adam_8bit
from jaxquant.optim._transforms import scale_by_ademamix_8bit as scale_by_ademamix_8bit
from jaxquant.optim._transforms import scale_by_lion_8bit as scale_by_lion_8bit
from jaxquant.optim._transforms import scale_by_rmsprop_8bit as scale_by_rmsprop_8bit
from jaxquant.optim._transforms import scale_by_sgd_momentum_8bit as scale_by_sgd_momentum_8bit

__all__ = [
    "adagrad8bit", "adam8bit", "adamw8bit", "ademamix8bit", "lamb8bit", "lars8bit", "lion8bit",
    "rmsprop8bit", "sgd8bit", "scale_by_adagrad_8bit", "scale_by_adam_8bit",
    "scale_by_ademamix_8bit", "scale_by_lion_8bit", "scale_by_rmsprop_8bit",
    "scale_by_sgd_momentum_8bit", "ScaleByAdagrad8bitState", "ScaleByAdam8bitState",
    "ScaleByAdemamix8bitState", "ScaleByLion8bitState", "ScaleByRms8bitState",
    "ScaleBySgdMomentum8bitState", "Optimizer8bit", "Options", "update_and_apply",
    "offload_state", "host_memory_supported", "memory_kinds", "percentile_clipping",
    "PercentileClippingState", "dequantize_state", "state_nbytes",
]
