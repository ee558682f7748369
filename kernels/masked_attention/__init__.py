"""Masked-patch attention (MAR / VideoMAE): attention among each example's valid tokens.

reference.py defines the math in XLA, pallas.py is the flash-style kernel (forward and custom_vjp
backward), api.py dispatches, visible_tokens.py gathers/scatters visible tokens, bench.py measures.
"""

from jaxlab.kernels.masked_attention.api import choose_implementation, masked_attention
from jaxlab.kernels.masked_attention.pallas import KernelConfig, default_config
from jaxlab.kernels.masked_attention.reference import masked_attention_reference
from jaxlab.kernels.masked_attention.visible_tokens import (
    gather_visible,
    scatter_visible,
    visible_indices,
)

__all__ = [
    "KernelConfig",
    "choose_implementation",
    "default_config",
    "gather_visible",
    "masked_attention",
    "masked_attention_reference",
    "scatter_visible",
    "visible_indices",
]
