#!/usr/bin/env bash
# Builds dawin_ext against the oldest supported torch in a throwaway venv, CPU and CUDA, and runs the
# kernel tests against each build. Nothing outside the venvs is touched: the builds go to their own
# directories and are loaded through DAWIN_EXT_C (the in-place dawin_ext/_C*.so is left alone).
#
#   bash scripts/check_torch_compat.sh                     # parts "cpu cuda" against the floor torch
#   KEEP_VENV=1 bash scripts/check_torch_compat.sh        # keep $WORK for a look afterwards
#   COMPAT_WORK=DIR COMPAT_REUSE_VENV=1 bash ...           # rerun in a kept $WORK: same venv, finished objects kept
#   COMPAT_PARTS=cpu (or cuda) bash ...                    # one part only
#
# The floor is pyproject's "torch>=X.Y" (today 2.11): 2.11.0 is the oldest PyPI torch built with CUDA 13,
# the first CUDA whose full nvcc is on PyPI (cuda-toolkit[nvcc,cccl,crt,nvvm] at the release torch pins), so both the CPU
# and the CUDA build can be checked here; it is also the GPU machine's torch. One venv serves both parts:
# Part "cpu":  DAWIN_EXT_BUILD=cpu build, import (build_info says no CUDA), kernel tests.
# Part "cuda": DAWIN_EXT_BUILD=cuda build with the venv's own nvcc as CUDA_HOME (compiled, not run: no GPU
#   here), import, a CUDA kernel registered for every public op, kernel tests on the CPU.
# Why not lower: the CPU sources alone need 2.6 (csrc/cpu/samplewise_linear_cpu.cpp calls the fp32
#   overload of at::native::cpublas::brgemm(..., bool is_vnni), first shipped in 2.6.0), and a CPU build
#   against 2.6.0 did pass here once (benchmarks/RESULTS.md, "Torch compatibility"). But torch 2.6 to 2.10
#   are CUDA 12 wheels on PyPI and a CUDA 12 nvcc cannot be had here (PyPI's nvidia-cuda-nvcc-cu12 wheels
#   hold only ptxas and libnvvm; Debian bookworm has no CUDA 12 toolkit), so their CUDA build cannot be
#   checked, and the declared floor is the oldest torch whose CPU and CUDA builds both are. No part for
#   2.6: import dawin_ext refuses a torch below the declared floor, so such a check would need a bypass.
# The venvs are isolated (no --system-site-packages) so that this machine's CUDA 13 headers and torch
# cannot leak into a build. Needs PyPI and about 7 GB in $TMPDIR; one venv at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
start=$(date +%s)

floor=$(sed -n 's/^ *"torch>=\([0-9][0-9.]*\).*/\1/p' pyproject.toml | head -n 1)
if [[ -z $floor ]]; then
  echo "check_torch_compat: no \"torch>=X.Y\" in pyproject.toml's dependencies" >&2
  exit 1
fi
[[ $floor == *.*.* ]] || floor=$floor.0
TORCH_VERSION=${TORCH_VERSION:-$floor}
PARTS=${COMPAT_PARTS:-cpu cuda}
for part in $PARTS; do
  [[ $part == cpu || $part == cuda ]] || {
    echo "check_torch_compat: unknown part '$part' in COMPAT_PARTS (cpu, cuda)" >&2
    exit 1
  }
done
ARCHS=${TORCH_CUDA_ARCH_LIST:-9.0} # one architecture: the API is what is checked, not the code
# What the builds and the kernel tests import; ninja so that the build runs in parallel, as in CI.
EXTRA=(setuptools wheel ninja numpy scipy scikit-learn pytest hypothesis)
TESTS=(tests/ops/test_entropy_ops.py tests/ops/test_blend_op.py tests/ops/test_sample_combine_op.py
  tests/ops/test_samplewise_linear_op.py)

WORK=${COMPAT_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/dawin_compat.XXXXXX")}
cleanup() {
  if [[ -z ${KEEP_VENV:-} ]]; then rm -rf "$WORK"; else echo "check_torch_compat: kept $WORK"; fi
}
trap cleanup EXIT
LOG=$WORK/log
mkdir -p "$LOG"
step() { echo "== [$(($(date +%s) - start)) s] $*"; }
die() {
  echo "check_torch_compat: $*" >&2
  exit 1
}
RESULTS=()

# venv NAME PACKAGES...: a fresh isolated venv at $WORK/NAME (the previous one is removed: disk).
venv() {
  local name=$1
  shift
  PY=$WORK/venv-$name/bin/python
  PATH=$WORK/venv-$name/bin:$BASE_PATH
  export PATH
  if [[ -n ${COMPAT_REUSE_VENV:-} && -x $PY ]]; then
    step "venv $name: reusing $WORK/venv-$name (COMPAT_REUSE_VENV)"
  else
    rm -rf "$WORK"/venv-*
    step "venv $name: $*"
    python3 -m venv "$WORK/venv-$name"
    "$PY" -m pip install -q --no-cache-dir "$@" "${EXTRA[@]}" >"$LOG/pip-$name.log" 2>&1 || {
      tail -n 30 "$LOG/pip-$name.log"
      die "pip install failed (log above)"
    }
  fi
  read -r TV TCUDA SITE < <("$PY" -c 'import site, torch; print(torch.__version__, torch.version.cuda, site.getsitepackages()[0])')
  echo "   torch $TV (CUDA $TCUDA), $("$PY" -V)"
}
BASE_PATH=$PATH

# build NAME MODE [env...]: out-of-tree build into $WORK/NAME, log in $LOG/NAME.log; sets SO.
build() {
  local name=$1 mode=$2
  shift 2
  step "build $name against torch $TV (DAWIN_EXT_BUILD=$mode)"
  local t0=$SECONDS
  if ! env "$@" DAWIN_EXT_BUILD="$mode" MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py -q build_ext \
    --build-temp "$WORK/$name/temp" --build-lib "$WORK/$name/lib" >"$LOG/$name.log" 2>&1; then
    grep -E "error" "$LOG/$name.log" | head -n 30
    tail -n 20 "$LOG/$name.log"
    die "$name build against torch $TV FAILED"
  fi
  SO=$(ls "$WORK/$name"/lib/dawin_ext/_C*.so)
  echo "   built in $((SECONDS - t0)) s: $SO"
}

# check_import WITH_CUDA: the build in $SO is the one loaded, and says what it should.
check_import() {
  DAWIN_EXT_C=$SO PYTHONPATH=$ROOT "$PY" - "$1" <<'PYEOF'
import os, sys, torch, dawin_ext, dawin_ext.ops._loader as L
assert os.path.samefile(L._C.__file__, os.environ["DAWIN_EXT_C"]), L._C.__file__
info = dawin_ext.build_info()
print("   build_info:", info)
want_cuda = sys.argv[1] == "1"
assert info["with_cuda"] is want_cuda, info
if want_cuda:
    ops = ("softmax_entropy", "entropy_coefficients", "blend_", "sample_combine", "samplewise_linear", "samplewise_lora")
    missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dawin_ext::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel for {missing}"
    print(f"   CUDA kernels registered for all {len(ops)} ops (compiled, not run: no GPU here)")
PYEOF
}

run_tests() {
  step "kernel tests against that build (CPU)"
  DAWIN_EXT_C=$SO PYTHONPATH=$ROOT OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" \
    "${TESTS[@]}" >"$LOG/pytest-$1.log" 2>&1 || {
    tail -n 40 "$LOG/pytest-$1.log"
    die "kernel tests against torch $TV FAILED"
  }
  KERNEL_TESTS=$(tail -n 1 "$LOG/pytest-$1.log" | tr -d '=' | sed 's/^ *//; s/ *$//')
  echo "   $KERNEL_TESTS"
}

# link_cudart CUDA_HOME: torch's extension build links -lcudart from CUDA_HOME/lib64; pip ships .so.N.
link_cudart() {
  local lib
  lib=$(find "$SITE/nvidia" -name 'libcudart.so.*' | head -n 1)
  [[ -n $lib ]] || die "no libcudart.so.* under $SITE/nvidia"
  mkdir -p "$1/lib64"
  [[ -e $1/lib64/libcudart.so ]] || ln -s "$lib" "$1/lib64/libcudart.so"
}

has_part() { [[ " $PARTS " == *" $1 "* ]]; }

if has_part cpu || has_part cuda; then
  venv floor "torch==$TORCH_VERSION"
  [[ $TV == "$TORCH_VERSION"* ]] || die "asked for torch $TORCH_VERSION, got $TV"
  if has_part cuda; then
    # torch's own pin of the CUDA toolkit wheels: nvcc; cccl (libcu++'s <nv/target>, which cuda_fp16.h includes);
    # and crt + nvvm pinned to nvcc's release -- nvidia-cuda-nvcc requires them unpinned, so pip takes the newest
    # (13.5), whose cicc writes PTX 9.5 that the 13.0 ptxas refuses ("Unsupported .version 9.5").
    pin=$("$PY" -c 'import importlib.metadata as m, re; print(next(re.search(r"==([0-9.]+)", r).group(1) for r in m.requires("torch") if r.startswith("cuda-toolkit")))') ||
      die "torch $TV names no cuda-toolkit requirement (a CUDA 13 torch does)"
    step "cuda-toolkit[nvcc,cccl,crt,nvvm]==$pin (torch $TV's own pin)"
    "$PY" -m pip install -q --no-cache-dir "cuda-toolkit[nvcc,cccl,crt,nvvm]==$pin" >>"$LOG/pip-floor.log" 2>&1 || {
      tail -n 30 "$LOG/pip-floor.log"
      die "pip install cuda-toolkit[nvcc,cccl,crt,nvvm] failed"
    }
    nvcc=$(find "$SITE/nvidia" -path '*/bin/nvcc' -type f | head -n 1)
    [[ -n $nvcc ]] || die "no bin/nvcc under $SITE/nvidia after installing cuda-toolkit[nvcc]"
    cuda_home=$(dirname "$(dirname "$nvcc")")
    link_cudart "$cuda_home"
    nv=$("$nvcc" --version | grep -o 'release [0-9.]*' | cut -d' ' -f2)
    echo "   CUDA_HOME=$cuda_home: nvcc $nv"
  fi
  if has_part cpu; then
    build floor-cpu cpu
    check_import 0
    run_tests floor-cpu
    RESULTS+=("torch $TV: CPU build, import, kernel tests ($KERNEL_TESTS) PASSED")
  fi
  if has_part cuda; then
    build floor-cuda cuda CUDA_HOME="$cuda_home" TORCH_CUDA_ARCH_LIST="$ARCHS"
    check_import 1
    run_tests floor-cuda
    RESULTS+=("torch $TV (CUDA $TCUDA, nvcc $nv): CUDA build (sm $ARCHS; compiled, not run), import, CUDA kernels registered, kernel tests on the CPU ($KERNEL_TESTS) PASSED")
  fi
fi

step "check_torch_compat: PASSED in $(($(date +%s) - start)) s"
printf '   %s\n' "${RESULTS[@]}"
