"""dawin-ext: fused kernels and a thin API for weight-space interpolation (WiSE-FT, DaWin, AdaWiSE)."""

from __future__ import annotations

from .exact import SampleWiseInterpolator, UnsupportedParameterError, task_vector_coefficients
from .integrations.checkpoints import CheckpointFormatError, UnsafeCheckpointError, load_state_dict, save_state_dict
from .methods.adawise import AdaWiSE
from .methods.blended import BlendedModels
from .methods.dawin import DaWin, dawin_coefficients
from .methods.inference import evaluate_accuracy
from .methods.mixture import BetaMixture, DirichletMixture
from .methods.multitask import DaWinMultiTask, task_vectors_from
from .methods.wise_ft import diagonal_fisher, output_ensemble, wise_ft, wise_ft_sweep
from .ops import (
    BLENDABLE_DTYPES,
    EntropyCoefficients,
    blend,
    entropy_coefficients,
    interpolation,
    sample_combine,
    samplewise_depthwise_conv2d,
    samplewise_linear,
    samplewise_linear_weights,
    softmax_entropy,
)
from .ops._loader import BUILD_INFO, CudaKernelsMissingWarning, ExtensionNotBuiltError

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
    "samplewise_depthwise_conv2d",
    "samplewise_linear",
    "samplewise_linear_weights",
    "save_state_dict",
    "softmax_entropy",
    "task_vector_coefficients",
    "UnsafeCheckpointError",
]
