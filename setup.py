"""Build script for the dawin_ext compiled core.

DAWIN_EXT_BUILD selects the build:
  auto (default)  CPU + CUDA kernels when torch is a CUDA build and a CUDA toolkit (nvcc) of the same
                  major version is found, whether or not a GPU is visible. Otherwise CPU kernels only:
                  with a CPU-only torch quietly, and with a CUDA torch but no usable toolkit (the usual
                  `pip install torch` workstation) with a loud warning that says how to get the CUDA kernels.
  cuda            require the CUDA build (fails with a message if it is not possible).
  cpu             CPU kernels only.
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default here: "8.0;9.0").
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

# torch.utils.cpp_extension reads CUDA_HOME at import; prefer the real toolkit over a wrapper on PATH.
# (Only when building: tests import this file for decide_build and must not change their environment.)
if __name__ == "__main__":
    if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = Path(__file__).parent
VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


class BuildConfigError(Exception):
    """The requested build cannot be made; the message says why and what to do."""


def fail(msg: str) -> None:
    sys.stderr.write(f"\ndawin_ext build error: {msg}\n\n")
    raise SystemExit(1)


def nvcc_version(cuda_home: str) -> str:
    """The release of ``cuda_home``/bin/nvcc as "major.minor"; BuildConfigError if it cannot be run."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    except OSError as exc:
        raise BuildConfigError(f"could not run {cuda_home}/bin/nvcc --version: {exc}") from exc
    m = re.search(r"release (\d+)\.(\d+)", out.stdout)
    if out.returncode != 0 or not m:
        raise BuildConfigError(f"could not run {cuda_home}/bin/nvcc --version: {out.stderr.strip()}")
    return f"{m.group(1)}.{m.group(2)}"


def decide_build(
    mode: str,
    torch_version: str,
    torch_cuda: str | None,
    cuda_home: str | None,
    get_nvcc_version: Callable[[str], str] = nvcc_version,
) -> tuple[bool, str | None]:
    """Whether to compile the CUDA kernels, and the warning to print when ``auto`` falls back to CPU only.

    mode is DAWIN_EXT_BUILD; torch_cuda is ``torch.version.cuda`` (None for a CPU-only torch); cuda_home is
    the toolkit that torch.utils.cpp_extension found (None if none). Raises BuildConfigError where the
    requested build is impossible (``cuda`` without a usable toolkit, or an unknown mode).
    """
    mode = mode.lower()
    if mode not in ("auto", "cuda", "cpu"):
        raise BuildConfigError(f"DAWIN_EXT_BUILD must be auto, cuda or cpu, got {mode!r}")
    if mode == "cpu":
        return False, None
    if torch_cuda is None:
        if mode == "cuda":
            raise BuildConfigError(
                f"DAWIN_EXT_BUILD=cuda but torch {torch_version} is a CPU-only build; install a CUDA build of torch."
            )
        return False, None
    # A CUDA torch: the CUDA kernels need a toolkit of the same major version.
    problem = None
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        where = "no CUDA_HOME" if cuda_home is None else f"no {os.path.join(cuda_home, 'bin', 'nvcc')}"
        problem = f"torch {torch_version} is a CUDA {torch_cuda} build but no CUDA toolkit (nvcc) was found ({where})"
    else:
        try:
            nv = get_nvcc_version(cuda_home)
        except BuildConfigError as exc:
            problem = str(exc)
        else:
            if nv.split(".")[0] != torch_cuda.split(".")[0]:
                problem = f"nvcc at {cuda_home} is CUDA {nv} but torch {torch_version} was built with CUDA {torch_cuda}"
    if problem is None:
        return True, None
    major = torch_cuda.split(".")[0]
    how = (
        f"To get the CUDA kernels, install a CUDA {major}.x toolkit (nvcc) and rebuild with "
        f"CUDA_HOME=/path/to/cuda-{major}.x DAWIN_EXT_BUILD=cuda pip install --no-build-isolation -e ."
    )
    if mode == "cuda":
        raise BuildConfigError(f"DAWIN_EXT_BUILD=cuda but {problem}. {how} Or set DAWIN_EXT_BUILD=cpu.")
    return False, (
        f"{problem}. Building the CPU kernels only: dawin_ext ops on CUDA tensors will raise. {how} "
        "Set DAWIN_EXT_BUILD=cpu to build CPU-only without this warning."
    )


def want_cuda() -> bool:
    try:
        with_cuda, warning = decide_build(
            os.environ.get("DAWIN_EXT_BUILD", "auto"), torch.__version__, torch.version.cuda, cpp_extension.CUDA_HOME
        )
    except BuildConfigError as exc:
        fail(str(exc))
    if warning:
        bar = "!" * 100
        sys.stderr.write(f"\n{bar}\ndawin_ext build WARNING: {warning}\n{bar}\n\n")
    return with_cuda


def nvidia_include_dirs() -> list[str]:
    # torch's CUDA headers include cusparse.h / cublas_v2.h, which pip's nvidia-* wheels ship here.
    dirs = []
    for p in sys.path:
        dirs += glob.glob(os.path.join(p, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(p, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def extension():
    with_cuda = want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # Passed bare and stringified in C++ (quoted strings do not survive ninja's command lines).
    defines = [("DAWIN_EXT_VERSION", VERSION), ("DAWIN_EXT_TORCH_VERSION", torch.__version__)]
    cxx = ["-O3", "-fopenmp", "-std=c++20"]
    extra = {"cxx": cxx}
    link = ["-fopenmp"]
    include_dirs = [str(ROOT / "csrc")]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        defines.append(("DAWIN_EXT_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-std=c++20", "-lineinfo"]
        include_dirs += nvidia_include_dirs()
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    print(f"dawin_ext: building {'CPU + CUDA' if with_cuda else 'CPU-only'} extension", file=sys.stderr)
    return ext_cls(
        name="dawin_ext._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=defines,
        extra_compile_args=extra,
        extra_link_args=link,
    )


if __name__ == "__main__":  # setuptools and pip run this file as __main__; tests import decide_build only
    setup(
        ext_modules=[extension()],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )
