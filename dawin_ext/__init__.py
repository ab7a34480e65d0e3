"""dawin-ext: fused kernels and a thin API for weight-space interpolation (WiSE-FT, DaWin, AdaWiSE)."""

from __future__ import annotations

from ._loader import BUILD_INFO, CudaKernelsMissingWarning, ExtensionNotBuiltError
from .adawise import AdaWiSE
from .checkpoints import CheckpointFormatError, UnsafeCheckpointError, load_state_dict, save_state_dict
from .dawin import DaWin, dawin_coefficients
from .mixture import BetaMixture, DirichletMixture
from .models import BlendedModels, evaluate_accuracy
from .multitask import DaWinMultiTask, task_vectors_from
from .ops import (
    BLENDABLE_DTYPES,
    EntropyCoefficients,
    blend,
    entropy_coefficients,
    interpolation,
    sample_combine,
    samplewise_linear,
    samplewise_linear_weights,
    softmax_entropy,
)
from .samplewise import SampleWiseInterpolator, UnsupportedParameterError, task_vector_coefficients
from .wise_ft import diagonal_fisher, output_ensemble, wise_ft, wise_ft_sweep

__version__ = BUILD_INFO["version"]


def build_info() -> dict:
    """How the compiled core was built: version, with_cuda, cuda_version, torch_version.

    ``with_cuda`` is False for a CPU-only build, which ``DAWIN_EXT_BUILD=auto`` makes when torch is a CUDA
    build but no CUDA toolkit was found; importing dawin_ext then warns (CudaKernelsMissingWarning) if a
    CUDA device is visible.
    """
    return dict(BUILD_INFO)


__all__ = [
    "AdaWiSE",
    "BetaMixture",
    "BlendedModels",
    "DaWin",
    "DaWinMultiTask",
    "DirichletMixture",
    "dawin_coefficients",
    "diagonal_fisher",
    "evaluate_accuracy",
    "output_ensemble",
    "task_vectors_from",
    "wise_ft",
    "wise_ft_sweep",
    "BLENDABLE_DTYPES",
    "BUILD_INFO",
    "CheckpointFormatError",
    "CudaKernelsMissingWarning",
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
    "samplewise_linear",
    "samplewise_linear_weights",
    "save_state_dict",
    "softmax_entropy",
    "task_vector_coefficients",
    "UnsafeCheckpointError",
]
