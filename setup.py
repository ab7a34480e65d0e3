"""Build script for the dawin_ext compiled core.

DAWIN_EXT_BUILD selects the build:
  auto (default)  CUDA sources are compiled when torch is a CUDA build and a CUDA toolkit is found,
                  whether or not a GPU is visible; with a CPU-only torch, a CPU-only build.
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
from pathlib import Path

# torch.utils.cpp_extension reads CUDA_HOME at import; prefer the real toolkit over a wrapper on PATH.
if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = Path(__file__).parent
VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def fail(msg: str) -> None:
    sys.stderr.write(f"\ndawin_ext build error: {msg}\n\n")
    raise SystemExit(1)


def nvcc_version(cuda_home: str) -> str:
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    m = re.search(r"release (\d+)\.(\d+)", out.stdout)
    if out.returncode != 0 or not m:
        fail(f"could not run {cuda_home}/bin/nvcc --version: {out.stderr.strip()}")
    return f"{m.group(1)}.{m.group(2)}"


def want_cuda() -> bool:
    mode = os.environ.get("DAWIN_EXT_BUILD", "auto").lower()
    if mode not in ("auto", "cuda", "cpu"):
        fail(f"DAWIN_EXT_BUILD must be auto, cuda or cpu, got {mode!r}")
    if mode == "cpu":
        return False
    if torch.version.cuda is None:
        if mode == "cuda":
            fail("DAWIN_EXT_BUILD=cuda but the installed torch is a CPU-only build; install a CUDA build of torch.")
        return False
    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        fail(
            f"torch {torch.__version__} is a CUDA {torch.version.cuda} build but no CUDA toolkit (nvcc) was found. "
            "Set CUDA_HOME to a CUDA toolkit of the same major version, or set DAWIN_EXT_BUILD=cpu for a CPU-only build."
        )
    nv = nvcc_version(cuda_home)
    if nv.split(".")[0] != torch.version.cuda.split(".")[0]:
        fail(
            f"nvcc at {cuda_home} is CUDA {nv} but torch was built with CUDA {torch.version.cuda}. "
            "Point CUDA_HOME at a toolkit with the same major version, or set DAWIN_EXT_BUILD=cpu."
        )
    return True


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


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
