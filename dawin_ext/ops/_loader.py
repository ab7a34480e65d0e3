"""Loads the compiled extension and checks that it matches the torch it runs under.

Set DAWIN_EXT_C=/path/to/_C.so to load a specific build (used while developing kernels in a
separate build directory); otherwise the in-package ``dawin_ext._C`` is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import warnings
from types import ModuleType

import torch

# The torch versions this package supports: [floor, ceiling). Keep in sync with pyproject.toml's
# "torch>=2.11,<3" (tests/ops/test_build_config.py checks). 2.11 is the oldest torch whose CPU and CUDA builds
# are both checked (the oldest PyPI torch on CUDA 13, whose nvcc is on PyPI); see scripts/check_torch_compat.sh.
SUPPORTED_TORCH = ((2, 11), (3, 0))


class ExtensionNotBuiltError(ImportError):
    """Raised when the compiled core is missing or unusable."""


def _import_compiled() -> ModuleType:
    path = os.environ.get("DAWIN_EXT_C")
    try:
        if path:
            spec = importlib.util.spec_from_file_location("dawin_ext._C", path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        return importlib.import_module("dawin_ext._C")
    except ImportError as exc:
        raise ExtensionNotBuiltError(
            "dawin_ext's compiled core (dawin_ext._C) could not be imported: "
            f"{exc}. Build it with `pip install --no-build-isolation -e .` from the repository root "
            "(see README), with the same torch that is installed now."
        ) from exc


class CudaKernelsMissingWarning(UserWarning):
    """A CUDA device is visible but dawin_ext was built without its CUDA kernels."""


def _torch_release(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise ExtensionNotBuiltError(f"dawin_ext cannot parse the torch version {version!r}")
    return int(m.group(1)), int(m.group(2))


def _check_torch_version(version: str) -> None:
    """ImportError naming the supported range when ``version`` is outside [floor, ceiling)."""
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_TORCH
    if not (lo_major, lo_minor) <= _torch_release(version) < (hi_major, hi_minor):
        raise ExtensionNotBuiltError(
            f"dawin_ext supports torch >={lo_major}.{lo_minor},<{hi_major}.{hi_minor} but torch {version} is "
            f"installed. Install a torch in that range (pip install 'torch>={lo_major}.{lo_minor},<{hi_major}') "
            "and rebuild the extension against it: `pip install --no-build-isolation -e .`."
        )


_warned_cuda_missing = False


def _warn_if_cuda_kernels_missing(info: dict) -> bool:
    """Warns (once per process) when a CUDA device is visible but the build has no CUDA kernels.

    That is the build ``DAWIN_EXT_BUILD=auto`` makes with a CUDA torch and no CUDA toolkit. Only in that
    case is the device count asked for (through NVML where it can, so it does not initialise CUDA).
    Returns whether it warned.
    """
    global _warned_cuda_missing
    if _warned_cuda_missing or info["with_cuda"] or torch.version.cuda is None:
        return False
    if torch.cuda.device_count() == 0:
        return False
    _warned_cuda_missing = True
    warnings.warn(
        f"dawin_ext was built without its CUDA kernels (build_info()['with_cuda'] is False; torch "
        f"{torch.__version__} sees {torch.cuda.device_count()} CUDA device(s)), so dawin_ext ops on CUDA tensors "
        f"will raise. This happens when the build found no CUDA {torch.version.cuda.split('.')[0]}.x toolkit "
        "(nvcc). Install one and rebuild: CUDA_HOME=/path/to/cuda DAWIN_EXT_BUILD=cuda "
        "pip install --no-build-isolation -e .",
        CudaKernelsMissingWarning,
        stacklevel=3,
    )
    return True


def _check_cuda_match(info: dict) -> None:
    if not info["with_cuda"]:
        return
    built = str(info["cuda_version"])
    running = torch.version.cuda
    if running is None:
        raise ExtensionNotBuiltError(
            f"dawin_ext was built with CUDA {built} but the installed torch {torch.__version__} has no CUDA. "
            "Rebuild with `DAWIN_EXT_BUILD=cpu pip install --no-build-isolation -e .`, or install a CUDA build of torch."
        )
    if built.split(".")[0] != running.split(".")[0]:
        raise ExtensionNotBuiltError(
            f"dawin_ext was built with CUDA {built} but torch {torch.__version__} uses CUDA {running}. "
            "Rebuild the extension against the installed torch: `pip install --no-build-isolation -e .`."
        )


_check_torch_version(torch.__version__)
_C = _import_compiled()
BUILD_INFO: dict = dict(_C.build_info())
_check_cuda_match(BUILD_INFO)
_warn_if_cuda_kernels_missing(BUILD_INFO)
