"""The compiled ops: typed wrappers, fake (meta) implementations, autograd rules, and the loader.

This is the only layer that names ``torch.ops.dawin_ext``; everything above calls these wrappers (the exact engine
uses the raw op handle ``_ops`` for its vmap rules). :mod:`.statedict` holds the state-dict checks the wrappers run
before any work is done.
"""

from __future__ import annotations

from .wrappers import (
    BLENDABLE_DTYPES,
    EntropyCoefficients,
    blend,
    entropy_coefficients,
    interpolation,
    sample_combine,
    samplewise_depthwise_conv2d,
    samplewise_linear,
    samplewise_linear_weights,
    samplewise_lora,
    samplewise_lora_factors,
    softmax_entropy,
)

# Private, for the exact engine: the raw op handle and which CPU kernel samplewise_linear uses.
from .wrappers import _ops as _ops
from .wrappers import samplewise_linear_cpu_path as samplewise_linear_cpu_path

__all__ = [
    "softmax_entropy",
    "entropy_coefficients",
    "EntropyCoefficients",
    "blend",
    "interpolation",
    "sample_combine",
    "samplewise_depthwise_conv2d",
    "samplewise_linear",
    "samplewise_linear_weights",
    "samplewise_lora",
    "samplewise_lora_factors",
    "BLENDABLE_DTYPES",
]
