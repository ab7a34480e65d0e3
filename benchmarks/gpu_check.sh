#!/usr/bin/env bash
# One-call GPU verification of dawin_ext: build against the torch installed on the GPU machine, run
# the whole test suite with CUDA visible, run the kernel tests under compute-sanitizer (memcheck,
# racecheck), run the GPU benchmarks (bandwidth fractions against a measured device-to-device copy),
# and write one report, $OUT/gpu_report.md, next to the logs (7 files: the device tool returns 8 at most).
#
# 1. Here, on a machine with PyPI access (once; the lent GPU machines have no network and no
#    open_clip_torch):     bash benchmarks/gpu_check.sh prepare
#    This downloads the wheels open_clip_torch needs for Python 3.12 into .whl/ (git-ignored).
# 2. On the GPU machine (device tool `run`, carry [".whl"]):
#                          bash benchmarks/gpu_check.sh            (= all)
#    or a subset of phases: bash benchmarks/gpu_check.sh build test sanitize bench
#    Each phase has a time box (GPU_CHECK_<PHASE>_S seconds) so that the report is always written
#    inside one 600 s call; a phase that runs out is reported as TIMED OUT, never as passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
REPORT=$OUT/gpu_report.md
# Default boxes sum to about 560 s, inside the device tool's 600 s per call. If a phase times out,
# split the phases over two calls and raise its box, e.g.
#   GPU_CHECK_TEST_S=380 bash benchmarks/gpu_check.sh build test
#   bash benchmarks/gpu_check.sh sanitize bench     (builds again first on a fresh machine)
BUILD_S=${GPU_CHECK_BUILD_S:-180}
TEST_S=${GPU_CHECK_TEST_S:-140}
SANITIZE_S=${GPU_CHECK_SANITIZE_S:-70}
BENCH_S=${GPU_CHECK_BENCH_S:-50}
PYBENCH_S=${GPU_CHECK_PYBENCH_S:-50}
KERNEL_TESTS=(tests/test_entropy_ops.py tests/test_sample_combine_op.py tests/test_samplewise_linear_op.py)
[[ -f tests/test_blend_op.py ]] && KERNEL_TESTS+=(tests/test_blend_op.py)
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0)

prepare() {
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '/.whl/' >>.git/info/exclude; }
  local plat=()
  for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do plat+=(--platform "$p"); done
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d .whl "${WHEELS[@]}"
  ls -l .whl
}

section() { printf '\n## %s\n\n' "$1" >>"$REPORT"; }
# status NAME RC: a line for the summary table; 124 is timeout's exit status.
STATUS=()
status() {
  local verdict=PASSED
  if [[ $2 -eq 124 ]]; then verdict="TIMED OUT"; elif [[ $2 -ne 0 ]]; then verdict="FAILED (rc $2)"; fi
  STATUS+=("| $1 | $verdict |")
}
# tail_log FILE N: the last N lines of a log, fenced, into the report.
tail_log() {
  { echo '```'; tail -n "$2" "$1"; echo '```'; } >>"$REPORT"
}

setup_env() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
      echo "gpu_check: installing the carried wheels failed" >&2
    export PYTHONPATH=/tmp/site:$ROOT
  else
    echo "gpu_check: no .whl/ carried; tests that need open_clip will fail (run '$0 prepare' here first)" >&2
    export PYTHONPATH=$ROOT
  fi
  if [[ -z ${CUDA_HOME:-} && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi
  export PATH=${CUDA_HOME:-/usr/local/cuda}/bin:$PATH PYTHONUNBUFFERED=1
  SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
}

facts() {
  section "Machine and versions"
  {
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")' 2>&1
    nvcc --version 2>&1 | tail -n 2
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
    echo '```'
  } >>"$REPORT"
}

build() {
  section "Build (DAWIN_EXT_BUILD=cuda, TORCH_CUDA_ARCH_LIST=9.0)"
  DAWIN_EXT_BUILD=cuda TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=$(nproc) \
    timeout "$BUILD_S" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  local rc=$?
  if [[ $rc -eq 0 ]]; then
    "$PY" - >>"$OUT/build.log" 2>&1 <<'PYEOF'
import torch, dawin_ext
info = dawin_ext.build_info()
print("build_info:", info)
assert info["with_cuda"], "the build has no CUDA kernels"
for op in ("softmax_entropy", "entropy_coefficients", "blend_", "sample_combine"):
    has = torch._C._dispatch_has_kernel_for_dispatch_key(f"dawin_ext::{op}", "CUDA")
    print(f"CUDA kernel for dawin_ext::{op}: {has}")
PYEOF
    rc=$?
  fi
  status build $rc
  tail_log "$OUT/build.log" 8
  return $rc
}

run_tests() {
  section "Whole test suite (CUDA visible)"
  timeout "$TEST_S" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rfE tests >"$OUT/pytest.log" 2>&1
  local rc=$?
  status "pytest tests/" $rc
  tail_log "$OUT/pytest.log" 25
}

sanitize() {
  if [[ ! -x $SANITIZER ]]; then
    section "compute-sanitizer"
    echo "compute-sanitizer not found" >>"$REPORT"
    status "compute-sanitizer" 127
    return
  fi
  # One allocation per tensor, so that an out-of-bounds access cannot land in the caching
  # allocator's pool unnoticed.
  local tool rc
  for tool in memcheck racecheck; do
    section "compute-sanitizer --tool $tool (CUDA cases of the kernel tests)"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$SANITIZE_S" "$SANITIZER" --tool "$tool" --error-exitcode 99 \
      "$PY" -m pytest -q -x -p no:cacheprovider -o addopts="" -k "cuda and not opcheck" "${KERNEL_TESTS[@]}" \
      >"$OUT/$tool.log" 2>&1
    rc=$?
    status "compute-sanitizer $tool" $rc
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/$tool.log" | tail -n 4 >>"$REPORT"
  done
}

bench() {
  section "GPU benchmarks: bandwidth fraction (target >= 0.85 of the measured copy)"
  timeout "$BENCH_S" "$PY" benchmarks/gpu_bandwidth.py --json "$OUT/bandwidth.json" >/tmp/gpu_check_bench.log 2>&1
  local rc=$?
  status "bandwidth benchmark" $rc
  cat /tmp/gpu_check_bench.log >>"$REPORT"
  section "pytest-benchmark suites, CUDA cases (medians: reference vs dawin_ext, same run)"
  timeout "$PYBENCH_S" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" benchmarks -k cuda --benchmark-only \
    --benchmark-columns=median,iqr,rounds --benchmark-json "$OUT/pytest_bench.json" >/tmp/gpu_check_pybench.log 2>&1
  rc=$?
  status "pytest-benchmark (CUDA)" $rc
  tail_log /tmp/gpu_check_pybench.log 60
}

# NCCL smoke run (issue 13): dawin_ext.distributed's collectives and DaWin's distributed fit on the one GPU, world
# size 1 (NCCL refuses two ranks on one device), against the same fit without a process group. Self-contained.
nccl_smoke() {
  section "NCCL smoke run: torchrun --nproc-per-node=1, DaWin in a process group vs without one"
  cat >/tmp/gpu_check_nccl_smoke.py <<'PYEOF'
import os
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from dawin_ext import DaWin, openclip
from dawin_ext import distributed as dd

device = torch.device(os.environ.get("SMOKE_DEVICE", "cuda"))  # SMOKE_DEVICE=cpu: the same script on gloo
group, device, _ = dd.init_from_env(device, 120.0)
assert group is not None, "torchrun's environment did not give a process group"
print("backend", dist.get_backend(group), "world", dist.get_world_size(group), "device", device)
openclip.register_tiny_configs()
torch.manual_seed(0)
model, _, tok = openclip.create_clip_model("dawin-tiny-vit")
clf = openclip.CLIPClassifier.from_clip(model, tok, ["cat", "dog", "car", "tree", "boat"], templates="classname")
clf = clf.to(device)
zs = {k: v.clone() for k, v in clf.state_dict().items()}
g = torch.Generator().manual_seed(1)
ft = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=g).to(device) for k, v in zs.items()}
x, y = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.arange(40) % 5
def loader(sampler=None):
    return DataLoader(TensorDataset(x, y), batch_size=8, sampler=sampler)
ref = DaWin(clf, zs, ft, offset_adjustment=True).fit(loader(), group=False)
dw = DaWin(clf, zs, ft, offset_adjustment=True).fit(loader(dd.ShardSampler(40, block=8)))
assert torch.equal(dw.coefficients_, ref.coefficients_), "lambda differs"
assert torch.equal(dw.labels_, ref.labels_) and dw.offset_ == ref.offset_, "mixture differs"
for mode in ("cluster", "exact"):
    a = dw.predict_dataset(loader(dd.ShardSampler(40, block=8)), mode)
    b = ref.predict_dataset(loader(), mode, group=False)
    print(mode, "max |diff|", float((a - b).abs().max()))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
rows, counts = dd.all_gather_rows(torch.arange(6.0, device=device).view(3, 2), group, "smoke")
assert counts == [3] and rows.device == device and rows.flatten().tolist() == list(range(6))
assert dd.all_sum_int([3, 4], group) == [3, 4]
assert dd.run_on_rank0(lambda: "same", group, "smoke") == "same"
dd.barrier(group, 30)
for _ in dd.GlobalProgress(40, "smoke", True, group).wrap(loader()):
    pass
print("NCCL smoke: OK")
dist.destroy_process_group()
PYEOF
  timeout "${GPU_CHECK_NCCL_S:-40}" "$PY" -m torch.distributed.run --nnodes=1 --nproc-per-node=1 \
    --master-addr=127.0.0.1 --master-port="${GPU_CHECK_NCCL_PORT:-29533}" /tmp/gpu_check_nccl_smoke.py \
    >/tmp/gpu_check_nccl_smoke.log 2>&1
  local rc=$?
  status "NCCL smoke (world size 1)" $rc
  tail_log /tmp/gpu_check_nccl_smoke.log 15
}

finish() {
  {
    printf '\n## Summary\n\n| phase | result |\n| --- | --- |\n'
    printf '%s\n' "${STATUS[@]}"
  } >>"$REPORT"
  echo "gpu_check: report at $REPORT"
  cat "$REPORT"
}

main() {
  local phases=("$@")
  [[ ${#phases[@]} -eq 0 || ${phases[0]} == all ]] && phases=(build test sanitize bench nccl)
  if [[ ${phases[0]} == prepare ]]; then
    prepare
    return
  fi
  # No extension built for this Python yet (a fresh machine): build first whatever was asked.
  local suffix
  suffix=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  if [[ ! -f dawin_ext/_C$suffix && " ${phases[*]} " != *" build "* ]]; then phases=(build "${phases[@]}"); fi
  # This rebuilds the extension in place: meant for the GPU machine's copy of the tree, not a
  # development checkout (GPU_CHECK_ALLOW_NO_GPU=1 runs it anyway, to test the script itself).
  if ! nvidia-smi -L >/dev/null 2>&1 && [[ -z ${GPU_CHECK_ALLOW_NO_GPU:-} ]]; then
    echo "gpu_check: no NVIDIA GPU visible; run this on the GPU machine (or set GPU_CHECK_ALLOW_NO_GPU=1)" >&2
    return 3
  fi
  printf '# dawin_ext GPU check, %s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" >"$REPORT"
  setup_env
  facts
  trap finish EXIT
  local p
  for p in "${phases[@]}"; do
    case $p in
      build) build || { echo "gpu_check: build failed, skipping the rest" >&2; return 1; } ;;
      test) run_tests ;;
      sanitize) sanitize ;;
      bench) bench ;;
      nccl) nccl_smoke ;;
      *)
        echo "usage: $0 [prepare | all | build test sanitize bench nccl]" >&2
        return 2
        ;;
    esac
  done
}

main "$@"
