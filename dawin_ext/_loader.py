"""Loads the compiled extension and checks that it matches the torch it runs under.

Set DAWIN_EXT_C=/path/to/_C.so to load a specific build (used while developing kernels in a
separate build directory); otherwise the in-package ``dawin_ext._C`` is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch


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


_C = _import_compiled()
BUILD_INFO: dict = dict(_C.build_info())
_check_cuda_match(BUILD_INFO)
