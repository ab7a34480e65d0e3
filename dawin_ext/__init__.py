"""dawin-ext: fused kernels and a thin API for weight-space interpolation (WiSE-FT, DaWin, AdaWiSE)."""

from __future__ import annotations

from ._loader import BUILD_INFO, ExtensionNotBuiltError
from .checkpoints import CheckpointFormatError, UnsafeCheckpointError, load_state_dict, save_state_dict
from .ops import (
    BLENDABLE_DTYPES,
    EntropyCoefficients,
    blend,
    entropy_coefficients,
    interpolation,
    sample_combine,
    softmax_entropy,
)
from .samplewise import SampleWiseInterpolator, UnsupportedParameterError, task_vector_coefficients

__version__ = BUILD_INFO["version"]


def build_info() -> dict:
    """How the compiled core was built: version, with_cuda, cuda_version, torch_version."""
    return dict(BUILD_INFO)


__all__ = [
    "BLENDABLE_DTYPES",
    "BUILD_INFO",
    "CheckpointFormatError",
    "EntropyCoefficients",
    "ExtensionNotBuiltError",
    "blend",
    "build_info",
    "entropy_coefficients",
    "interpolation",
    "load_state_dict",
    "SampleWiseInterpolator",
    "UnsupportedParameterError",
    "sample_combine",
    "save_state_dict",
    "softmax_entropy",
    "task_vector_coefficients",
    "UnsafeCheckpointError",
]
