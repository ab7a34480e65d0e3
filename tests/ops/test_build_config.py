"""How the build chooses CPU or CUDA kernels (setup.py), and the import-time checks of dawin_ext.ops._loader.

The three installs that matter: a CUDA torch with a toolkit (CUDA kernels), a CUDA torch without one (the
usual `pip install torch` workstation: CPU kernels and a loud warning, or a hard error with
DAWIN_EXT_BUILD=cuda), and a CPU torch (CPU kernels).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from dawin_ext.ops import _loader

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup_py():
    """setup.py imported as a module (its setup() call only runs as __main__)."""
    spec = importlib.util.spec_from_file_location("dawin_ext_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    before = dict(os.environ)
    spec.loader.exec_module(module)
    assert dict(os.environ) == before, "importing setup.py changed the environment"
    return module


@pytest.fixture
def toolkit(tmp_path) -> str:
    """A directory that looks like a CUDA toolkit (bin/nvcc exists; its version is given separately)."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    return str(tmp_path)


def _nvcc(version: str):
    return lambda cuda_home: version


def test_cuda_torch_with_matching_toolkit_builds_cuda(setup_py, toolkit) -> None:
    for mode in ("auto", "cuda", "AUTO"):
        assert setup_py.decide_build(mode, "2.14.1+cu130", "13.0", toolkit, _nvcc("13.0")) == (True, None)
    # Same major, other minor: torch's own rule for extensions.
    assert setup_py.decide_build("auto", "2.6.0+cu124", "12.4", toolkit, _nvcc("12.8")) == (True, None)


@pytest.mark.parametrize("cuda_home", [None, "/nonexistent", "toolkit-without-nvcc"])
def test_cuda_torch_without_toolkit_falls_back_to_cpu_loudly(setup_py, tmp_path, cuda_home) -> None:
    if cuda_home == "toolkit-without-nvcc":
        cuda_home = str(tmp_path)
    with_cuda, warning = setup_py.decide_build("auto", "2.14.1+cu130", "13.0", cuda_home, _nvcc("13.0"))
    assert with_cuda is False
    assert "no CUDA toolkit (nvcc) was found" in warning
    assert "CPU kernels only" in warning
    # It says how to get the CUDA kernels, and how to silence it.
    assert "CUDA 13.x toolkit" in warning and "DAWIN_EXT_BUILD=cuda" in warning and "DAWIN_EXT_BUILD=cpu" in warning


@pytest.mark.parametrize("cuda_home", [None, "/nonexistent"])
def test_cuda_mode_without_toolkit_fails_hard(setup_py, cuda_home) -> None:
    with pytest.raises(setup_py.BuildConfigError, match=r"DAWIN_EXT_BUILD=cuda but .*no CUDA toolkit \(nvcc\)"):
        setup_py.decide_build("cuda", "2.14.1+cu130", "13.0", cuda_home, _nvcc("13.0"))


def test_toolkit_of_another_major_version(setup_py, toolkit) -> None:
    with_cuda, warning = setup_py.decide_build("auto", "2.14.1+cu130", "13.0", toolkit, _nvcc("12.4"))
    assert with_cuda is False
    assert f"nvcc at {toolkit} is CUDA 12.4 but torch 2.14.1+cu130 was built with CUDA 13.0" in warning
    with pytest.raises(setup_py.BuildConfigError, match="is CUDA 12.4 but torch"):
        setup_py.decide_build("cuda", "2.14.1+cu130", "13.0", toolkit, _nvcc("12.4"))


def test_nvcc_that_does_not_run(setup_py, toolkit) -> None:
    def broken(cuda_home):
        raise setup_py.BuildConfigError(f"could not run {cuda_home}/bin/nvcc --version: exec format error")

    with_cuda, warning = setup_py.decide_build("auto", "2.14.1+cu130", "13.0", toolkit, broken)
    assert with_cuda is False and "exec format error" in warning
    with pytest.raises(setup_py.BuildConfigError, match="exec format error"):
        setup_py.decide_build("cuda", "2.14.1+cu130", "13.0", toolkit, broken)


def test_real_nvcc_version_of_a_fake_toolkit_is_an_error_not_a_crash(setup_py, toolkit) -> None:
    # The fixture's nvcc is a script that exits 1 (or cannot be executed at all).
    with pytest.raises(setup_py.BuildConfigError, match="could not run"):
        setup_py.nvcc_version(toolkit)


def test_cpu_torch_builds_cpu_quietly(setup_py, toolkit) -> None:
    assert setup_py.decide_build("auto", "2.14.1+cpu", None, toolkit, _nvcc("13.0")) == (False, None)
    assert setup_py.decide_build("auto", "2.14.1+cpu", None, None, _nvcc("13.0")) == (False, None)
    with pytest.raises(setup_py.BuildConfigError, match="CPU-only build"):
        setup_py.decide_build("cuda", "2.14.1+cpu", None, toolkit, _nvcc("13.0"))


def test_cpu_mode_and_bad_mode(setup_py, toolkit) -> None:
    assert setup_py.decide_build("cpu", "2.14.1+cu130", "13.0", toolkit, _nvcc("13.0")) == (False, None)
    assert setup_py.decide_build("cpu", "2.14.1+cu130", "13.0", None, _nvcc("13.0")) == (False, None)
    with pytest.raises(setup_py.BuildConfigError, match="must be auto, cuda or cpu, got 'gpu'"):
        setup_py.decide_build("gpu", "2.14.1+cu130", "13.0", toolkit, _nvcc("13.0"))


def test_want_cuda_reads_torch_and_cuda_home(setup_py, monkeypatch, capsys) -> None:
    # The glue: DAWIN_EXT_BUILD from the environment, torch.version.cuda and cpp_extension.CUDA_HOME.
    monkeypatch.setattr(setup_py.torch.version, "cuda", "13.0")
    monkeypatch.setattr(setup_py.cpp_extension, "CUDA_HOME", "/nonexistent")
    monkeypatch.setenv("DAWIN_EXT_BUILD", "auto")
    assert setup_py.want_cuda() is False
    err = capsys.readouterr().err
    assert "dawin_ext build WARNING" in err and "no CUDA toolkit (nvcc) was found" in err
    monkeypatch.setenv("DAWIN_EXT_BUILD", "cuda")
    with pytest.raises(SystemExit):
        setup_py.want_cuda()
    assert "dawin_ext build error: DAWIN_EXT_BUILD=cuda but" in capsys.readouterr().err
    monkeypatch.setattr(setup_py.torch.version, "cuda", None)
    monkeypatch.setenv("DAWIN_EXT_BUILD", "auto")
    assert setup_py.want_cuda() is False
    assert "WARNING" not in capsys.readouterr().err


def _setup_py(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "setup.py", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_setup_py_without_toolkit_succeeds_and_says_so() -> None:
    # What a new user with `pip install torch` and no toolkit runs into first.
    res = _setup_py("--name", CUDA_HOME="/nonexistent", DAWIN_EXT_BUILD="auto")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "dawin-ext"
    assert "building CPU-only extension" in res.stderr
    if torch.version.cuda is not None:
        assert "dawin_ext build WARNING" in res.stderr and "CUDA_HOME=" in res.stderr
    res = _setup_py("--name", CUDA_HOME="/nonexistent", DAWIN_EXT_BUILD="cuda")
    assert res.returncode == 1
    assert "dawin_ext build error: DAWIN_EXT_BUILD=cuda but" in res.stderr


@pytest.mark.parametrize("version", ["2.11.0", "2.11.0+cu130", "2.14.1+cu130", "2.15.0a0+gitabc", "2.99.0"])
def test_supported_torch_versions_import(version) -> None:
    _loader._check_torch_version(version)


@pytest.mark.parametrize("version", ["2.10.0+cu128", "2.6.0", "2.4.0", "1.13.1", "3.0.0", "3.1.0+cpu"])
def test_unsupported_torch_versions_are_refused_clearly(version) -> None:
    with pytest.raises(
        _loader.ExtensionNotBuiltError, match=rf"supports torch >=2\.11,<3\.0 but torch {re.escape(version)}"
    ):
        _loader._check_torch_version(version)


def test_declared_torch_range_matches_the_loader() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    (lo_major, lo_minor), (hi_major, _) = _loader.SUPPORTED_TORCH
    declared = f'"torch>={lo_major}.{lo_minor},<{hi_major}"'
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert declared in deps, f"pyproject.toml's dependencies should declare {declared}"
    assert f"torch>={lo_major}.{lo_minor},<{hi_major}" in text.split("[build-system]", 1)[1].split("[project]", 1)[0]


@pytest.fixture
def fresh_warning_state(monkeypatch):
    monkeypatch.setattr(_loader, "_warned_cuda_missing", False)


def _warnings_from(info: dict, calls: int = 1) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(calls):
            _loader._warn_if_cuda_kernels_missing(info)
    return [w for w in caught if issubclass(w.category, _loader.CudaKernelsMissingWarning)]


def test_import_warns_once_when_a_gpu_is_visible_but_the_build_is_cpu_only(monkeypatch, fresh_warning_state) -> None:
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    caught = _warnings_from({"with_cuda": False}, calls=3)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "built without its CUDA kernels" in msg and "CUDA_HOME=" in msg and "DAWIN_EXT_BUILD=cuda" in msg


@pytest.mark.parametrize(
    "torch_cuda, devices, with_cuda",
    [("13.0", 1, True), ("13.0", 0, False), (None, 0, False)],
    ids=["cuda-build", "no-gpu-visible", "cpu-torch"],
)
def test_no_warning_otherwise(monkeypatch, fresh_warning_state, torch_cuda, devices, with_cuda) -> None:
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    assert _warnings_from({"with_cuda": with_cuda}) == []


def test_gpu_check_script_parses_and_its_boxes_fit_one_device_call() -> None:
    # The GPU check gets one 600 s call; its phases' default boxes must fit the total box, which leaves
    # room for the report. (`bash benchmarks/gpu_check.sh --rehearse` runs the rest of it on a CPU.)
    script = ROOT / "benchmarks" / "gpu_check.sh"
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = script.read_text()
    boxes = dict(re.findall(r"\[(\w+)\]=\$\{GPU_CHECK_\w+_S:-(\d+)\}", text))
    default_phases = re.search(r"^PHASES_ALL=\(([^)]*)\)", text, re.M).group(1).split()
    assert default_phases == ["setup", "build", "ktest", "sanitize", "bench", "nccl", "cudatests"]
    total = int(re.search(r"^TOTAL_S=\$\{GPU_CHECK_TOTAL_S:-(\d+)\}", text, re.M).group(1))
    assert sum(int(boxes[p]) for p in default_phases) <= total <= 540
