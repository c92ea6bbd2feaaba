"""Fused optimizer updates on blockwise 8-bit state (bitsandbytes' 8-bit optimizers).

- ``families.py``: per-family state layout, hyperparameter vector and update math (shared).
- ``exact.py``: search-free encoder of the dynamic 8-bit maps, byte-identical to the
  reference's binary search (used by the kernel).
- ``reference.py``: the pure-jnp step, the fallback and the oracle.
- ``kernel.py``: the fused Pallas kernel (dequantize, update, requantize, write, one pass).
- ``api.py``: registers ``optim_update_8bit`` ("xla", "pallas", "interpret") and
  ``optim_update_fp32`` ("xla").
"""
