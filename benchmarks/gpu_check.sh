#!/usr/bin/env bash
# One-call GPU verification of dawin_ext on a bare GPU machine (the device tool: one command of at most
# 600 s, no network, its own python3 + torch, files written under $OUT come back, 8 at most).
#
# 1. Here, with PyPI access (once):     bash benchmarks/gpu_check.sh prepare
#    downloads the wheels the GPU machine lacks (open_clip_torch and its missing dependencies, for
#    CPython 3.12) into .whl/ (git-ignored; carried with the call).
# 2. Here, before spending device time:  bash benchmarks/gpu_check.sh --rehearse
#    runs every step that needs no GPU exactly as the GPU run will (wheel set, install, the tests'
#    imports, the scripts of the sanitizer and bandwidth phases on the CPU, the time boxes); the CUDA
#    steps are reported as SKIPPED. It must pass before a GPU run.
# 3. On the GPU machine (device tool `run`, carry [".whl"], timeout_s 600):
#                                        bash benchmarks/gpu_check.sh            (= all)
#    or some phases:                     bash benchmarks/gpu_check.sh build ktest sanitize
#
# Phases, in order of value, each in a time box (GPU_CHECK_<PHASE>_S seconds; unused seconds of earlier
# phases carry over; the whole run stops at GPU_CHECK_TOTAL_S = 480 s so that the report is always
# written inside one 600 s call). A phase that runs out is reported as TIMED OUT, never as passed.
#   setup     venv with the machine's packages + the carried wheels; ninja on PATH      (20 s)
#   build     DAWIN_EXT_BUILD=cuda, TORCH_CUDA_ARCH_LIST=9.0, in place                 (160 s)
#   ktest     the kernel tests' CUDA cases                                              (80 s)
#   sanitize  compute-sanitizer self-test, kernel-path coverage, then memcheck, racecheck
#             and synccheck in parallel on benchmarks/gpu_sanitize_cases.py             (90 s)
#   bench     benchmarks/gpu_bandwidth.py: op alone (CUDA events) and whole Python call (50 s)
#   cudatests the rest of the suite's CUDA tests (-k cuda; the CPU tests run in CI)     (80 s)
#   pybench   (not in `all`) pytest-benchmark's CUDA cases
# Output under $OUT (at most 8 files): gpu_report.md, setup.log, build.log, ktest.log, sanitize.log,
# bandwidth.json, cudatests.log.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PY0=${PYTHON:-python3} # the machine's python (on the GPU machine: the image's, with its own torch)
OUT=${OUT:-/tmp/gpu_check_out}
VENV=${GPU_CHECK_VENV:-/tmp/gpu_check_venv}
mkdir -p "$OUT"
REPORT=$OUT/gpu_report.md
LOGS=/tmp/gpu_check_logs # scratch logs that do not come back (only $OUT does)
mkdir -p "$LOGS"

PHASES_ALL=(setup build ktest sanitize bench nccl cudatests)
declare -A BOX=(
  [setup]=${GPU_CHECK_SETUP_S:-20}
  [build]=${GPU_CHECK_BUILD_S:-160}
  [ktest]=${GPU_CHECK_KTEST_S:-80}
  [sanitize]=${GPU_CHECK_SANITIZE_S:-90}
  [bench]=${GPU_CHECK_BENCH_S:-50}
  [nccl]=${GPU_CHECK_NCCL_S:-30}
  [cudatests]=${GPU_CHECK_CUDATESTS_S:-50}
  [pybench]=${GPU_CHECK_PYBENCH_S:-60}
)
TOTAL_S=${GPU_CHECK_TOTAL_S:-480}
CALL_LIMIT_S=600 # the device tool's limit for one command
KERNEL_TESTS=(tests/ops/test_entropy_ops.py tests/ops/test_sample_combine_op.py tests/ops/test_samplewise_linear_op.py
  tests/ops/test_blend_op.py tests/integrations/test_lora.py)
# What the GPU machine lacks, pinned; open_clip's other needs (torch, torchvision, regex, tqdm,
# huggingface_hub, safetensors, timm) are in its image (KINDS.md). --rehearse checks this closure.
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0)
# The GPU image's Python packages (KINDS.md, "Python packages already there", read 2026-11-17).
IMAGE_PACKAGES="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov
pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich
sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
# Requirements that the GPU run does not need (linters, formatters).
NOT_NEEDED_ON_GPU="ruff clang-format"

REHEARSE=0
START=$SECONDS
BANK=0 # seconds left over by earlier phases
STATUS=()

log() { echo "gpu_check [$((SECONDS - START)) s]: $*" >&2; }
section() { printf '\n## %s\n\n' "$1" >>"$REPORT"; }
fence() { { echo '```'; cat; echo '```'; } >>"$REPORT"; }
# row PHASE VERDICT: a line of the summary table.
row() { STATUS+=("| $1 | $2 | $((SECONDS - PHASE_T0)) s of ${ALLOWED:-?} s |"); }
# verdict RC: PASSED / TIMED OUT / FAILED (rc N); 124 and 137 are timeout's.
verdict() {
  case $1 in
    0) echo PASSED ;;
    124 | 137) echo "TIMED OUT" ;;
    *) echo "FAILED (rc $1)" ;;
  esac
}
# allowance PHASE: this phase's box plus the bank, never past the total. A rehearsal's CPU stand-ins
# take no GPU time, so they run under 5x the box and no total (the boxes' sum is checked instead).
allowance() {
  if [[ $REHEARSE == 1 ]]; then
    echo $((5 * BOX[$1]))
    return
  fi
  local left=$((TOTAL_S - (SECONDS - START)))
  local a=$((BOX[$1] + BANK))
  ((a > left)) && a=$left
  ((a < 0)) && a=0
  echo "$a"
}
# within SECONDS CMD...: CMD under a time box (TERM, then KILL 5 s later).
within() {
  local s=$1
  shift
  timeout -k 5 "$s" "$@"
}

prepare() {
  # Keep .whl/ out of git (info/exclude lives in the common git dir, also for a worktree).
  local exclude
  exclude=$(git rev-parse --git-path info/exclude 2>/dev/null) &&
    { grep -qx '/.whl/' "$exclude" 2>/dev/null || { mkdir -p "$(dirname "$exclude")" && echo '/.whl/' >>"$exclude"; }; }
  local plat=()
  for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do plat+=(--platform "$p"); done
  "$PY0" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d .whl "${WHEELS[@]}" || return 1
  ls -l .whl
}

# Names as pip normalises them (PEP 503).
norm() { tr 'A-Z_.' 'a-z--' | sed 's/--*/-/g'; }

# check_wheel_set: every requirement of the project (dependencies + test extra) and of every carried
# wheel (its Requires-Dist, extras left out) is in the GPU image or carried in .whl/.
check_wheel_set() {
  IMAGE_PACKAGES=$IMAGE_PACKAGES NOT_NEEDED=$NOT_NEEDED_ON_GPU WHEELS="${WHEELS[*]}" "$PY0" - <<'PYEOF'
import glob, os, re, sys, tomllib, zipfile

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def req_name(req):
    return norm(re.split(r"[ <>=!~;(\[]", req.strip(), maxsplit=1)[0])

have = {norm(n) for n in os.environ["IMAGE_PACKAGES"].split()}
carried = {}
for w in sorted(glob.glob(".whl/*.whl")):
    carried[norm(os.path.basename(w).split("-")[0])] = w
missing = [f"{n} (in WHEELS but not in .whl/: run prepare)" for n in map(req_name, os.environ["WHEELS"].split())
           if n not in carried]
needs = {}
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for r in project["dependencies"] + project.get("optional-dependencies", {}).get("test", []):
    needs.setdefault(req_name(r), "pyproject.toml")
for name, w in carried.items():
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line and "extra==" not in line:
                needs.setdefault(req_name(line.split(":", 1)[1]), name)
skip = {norm(n) for n in os.environ["NOT_NEEDED"].split()}
for n, why in sorted(needs.items()):
    if n not in have and n not in carried and n not in skip:
        missing.append(f"{n} (needed by {why})")
if missing:
    print("missing on the GPU machine (neither in its image nor in .whl/):", "; ".join(missing))
    print("add them to WHEELS in benchmarks/gpu_check.sh and run prepare again")
    sys.exit(1)
print(f"wheel set complete: {len(needs)} requirements covered by the image or by {sorted(carried)}")
PYEOF
}

# The carried tree must fit the device tool's 64 MiB.
check_tree_size() {
  local bytes
  bytes=$({
    git ls-files -z --cached --others --exclude-standard
    find .whl -type f -print0 2>/dev/null
  } | xargs -0 -r du -cb 2>/dev/null | awk '$2 == "total" {s += $1} END {print s + 0}')
  echo "the working tree + .whl/ that travel: $((bytes / 1024 / 1024)) MiB (limit 64 MiB)"
  ((bytes < 60 * 1024 * 1024))
}

# setup: a venv whose own site-packages hold the carried wheels and whose .pth file adds the machine's
# site-packages (processing their .pth files) and the repository. Every process of $PY -- pytest,
# subprocesses that replace PYTHONPATH (test_cli_eval), scripts run by path -- sees the same packages,
# without PYTHONPATH. (`venv --system-site-packages` would not do: the GPU image's python3 is itself a
# venv, and a venv made from it sees the base interpreter's packages, not the image's torch.)
setup_env() {
  local rc=0
  {
    [[ $REHEARSE == 1 ]] && echo "(rehearsal: this machine's python stands in for the GPU machine's)"
    echo "machine python: $(command -v "$PY0") ($("$PY0" -V 2>&1))"
    if ! compgen -G ".whl/*.whl" >/dev/null; then
      echo "no .whl/ carried: open_clip's tests will fail. Run 'bash benchmarks/gpu_check.sh prepare' here first and carry .whl"
      return 1
    fi
    check_wheel_set || rc=1
    rm -rf "$VENV"
    "$PY0" -m venv --without-pip "$VENV" || return 1
    PY=$VENV/bin/python
    local purelib parent_sites
    purelib=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # One line: `import site; site.addsitedir(...); ...` (site runs .pth import lines with exec inside a
    # function, so a comprehension would not see `site`).
    parent_sites=$("$PY0" -c 'import site; print("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in site.getsitepackages()))')
    printf '%s\n%s\n' "$ROOT" "$parent_sites" >"$purelib/zz_gpu_check.pth"
    "$PY0" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$purelib" .whl/*.whl ||
      return 1
    if [[ -z ${CUDA_HOME:-} && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi
    [[ -n ${CUDA_HOME:-} ]] && export PATH=$PATH:$CUDA_HOME/bin
    # ninja: torch's extension build silently compiles one file at a time without it.
    local nbin
    nbin=$(dirname "$(readlink -f "$(command -v "$PY0")")")
    export PATH=$VENV/bin:$PATH:$(dirname "$(command -v "$PY0")"):$nbin
    if ! command -v ninja >/dev/null; then
      nbin=$("$PY" -c 'import ninja, os; print(ninja.BIN_DIR)' 2>/dev/null) && export PATH=$PATH:$nbin
    fi
    if ! command -v ninja >/dev/null; then
      echo "ninja is not on PATH and no ninja package was found: the build would run serially and overrun its box."
      echo "Carry the ninja wheel (add ninja==X to WHEELS) or install it. Stopping."
      return 1
    fi
    echo "ninja $(ninja --version) at $(command -v ninja)"
    # Every process must see the same packages, with PYTHONPATH unset or replaced (test_cli_eval sets it to
    # the repository root).
    # (find_spec: the compiled core is not built yet on a fresh machine, so dawin_ext is located, not imported.)
    local probe="
import importlib.util as u, os, sys, open_clip, torch
d = u.find_spec('dawin_ext').submodule_search_locations[0]
print(sys.executable, '| dawin_ext', d, '| open_clip', open_clip.__version__, open_clip.__file__, '| torch', torch.__version__)
assert open_clip.__file__.startswith(sys.prefix), ('open_clip is not the carried wheel', open_clip.__file__)
assert os.path.samefile(d, '$ROOT/dawin_ext'), ('dawin_ext is not this tree', d)
"
    for envset in "env -u PYTHONPATH" "env PYTHONPATH=$ROOT"; do
      echo "$envset: $($envset "$PY" -c "$probe" 2>&1 | tail -n 2 | tr '\n' ' ')"
      $envset "$PY" -c "$probe" >/dev/null 2>&1 || rc=1
    done
    # pyproject's requirements, as installed in this environment.
    "$PY" - <<'PYEOF' || rc=1
import importlib.metadata as md, re, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
missing = []
for r in p["dependencies"] + p.get("optional-dependencies", {}).get("test", []):
    name = re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0]
    if name in ("ruff", "clang-format"):
        continue
    try:
        md.version(name)
    except md.PackageNotFoundError:
        missing.append(name)
print("requirements missing here:", missing or "none")
raise SystemExit(1 if missing else 0)
PYEOF
    return $rc
  } >"$OUT/setup.log" 2>&1 || rc=$?
  return $rc
}

facts() {
  section "Machine and versions"
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | head -n 3
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")' 2>&1
    nvcc --version 2>&1 | tail -n 2
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(git status --porcelain 2>/dev/null | wc -l) changed files"
    echo "time boxes (s): $(for p in "${PHASES[@]}"; do printf '%s=%s ' "$p" "${BOX[$p]}"; done)total=$TOTAL_S"
  } | fence
}

phase_build() {
  if [[ $REHEARSE == 1 ]]; then
    echo "SKIPPED (CUDA build; here the existing build is used: $(ls dawin_ext/_C*.so 2>/dev/null || echo none))"
    loaded_check
    return
  fi
  local rc
  DAWIN_EXT_BUILD=cuda TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=$(nproc) \
    within "$ALLOWED" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  rc=$?
  tail -n 6 "$OUT/build.log"
  ((rc == 0)) || return $rc
  "$PY" - 2>&1 <<'PYEOF' | tee -a "$OUT/build.log"
import torch, dawin_ext
info = dawin_ext.build_info()
print("build_info:", info)
assert info["with_cuda"], "the build has no CUDA kernels"
missing = [op for op in ("softmax_entropy", "entropy_coefficients", "blend_", "sample_combine", "samplewise_linear")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dawin_ext::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print("CUDA kernels registered for all 5 ops")
PYEOF
  loaded_check
}

# The compiled core that gets loaded must be this tree's (an editable install elsewhere must not win).
loaded_check() {
  "$PY" -c "
import os, dawin_ext, dawin_ext.ops._loader as L
print('loaded', L._C.__file__, dawin_ext.build_info())
assert os.path.realpath(L._C.__file__).startswith(os.path.realpath('$ROOT') + os.sep), 'not this tree: build it first'
"
}

pytest_box() { # pytest_box LOG ARGS...: pytest in the phase's box, the tail into the report
  local logf=$1
  shift
  within "$ALLOWED" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rfE "$@" >"$logf" 2>&1
  local rc=$?
  grep -E "^(FAILED|ERROR)" "$logf" | head -n 20
  tail -n 2 "$logf"
  return $rc
}

phase_ktest() {
  if [[ $REHEARSE == 1 ]]; then
    echo "SKIPPED (CUDA). Collecting the kernel tests under the venv instead (their imports):"
    pytest_box "$OUT/ktest.log" --collect-only "${KERNEL_TESTS[@]}"
    return
  fi
  pytest_box "$OUT/ktest.log" -k cuda "${KERNEL_TESTS[@]}"
}

SANITIZER_SELFTEST='#include <cstdio>
// Writes one element past a 32-int allocation; named like the project kernels so that the filter keeps it.
__global__ void dawin_ext_selftest_oob(int* p, int n) { p[n + threadIdx.x % 2] = 1; }
int main() {
  int* p = nullptr;
  if (cudaMalloc(&p, 32 * sizeof(int)) != cudaSuccess) return 3;
  dawin_ext_selftest_oob<<<1, 2>>>(p, 31);
  printf("selftest: %s\n", cudaGetErrorString(cudaDeviceSynchronize()));
  return 0;
}'

# sanitizer_selftest: sets SAN_FILTER; returns 0 if the sanitizer works here, 2 if it is unavailable.
sanitizer_selftest() {
  SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  if [[ ! -x $SANITIZER ]]; then
    echo "sanitizer UNAVAILABLE: compute-sanitizer not found"
    return 2
  fi
  local d=$LOGS/selftest out rc opt
  mkdir -p "$d"
  echo "$SANITIZER_SELFTEST" >"$d/oob.cu"
  if ! nvcc -arch=native -o "$d/oob" "$d/oob.cu" >"$d/nvcc.log" 2>&1 && ! nvcc -o "$d/oob" "$d/oob.cu" >>"$d/nvcc.log" 2>&1; then
    echo "sanitizer UNAVAILABLE: could not compile the self-test: $(tail -n 3 "$d/nvcc.log")"
    return 2
  fi
  # The kernel filter option was --filter before compute-sanitizer 2022.2, --kernel-name since.
  for opt in --kernel-name --filter; do
    out=$(within 60 "$SANITIZER" --tool memcheck "$opt" kns=dawin_ext --error-exitcode 99 "$d/oob" 2>&1)
    rc=$?
    if ((rc == 99)) && grep -q "Invalid __global__ write" <<<"$out"; then
      SAN_FILTER=("$opt" kns=dawin_ext)
      out=$(within 60 "$SANITIZER" --tool memcheck "$opt" kns=no_such_kernel --error-exitcode 99 "$d/oob" 2>&1)
      if (($? == 0)); then
        echo "sanitizer works: found the planted out-of-bounds write with $opt kns=dawin_ext, and not with kns=no_such_kernel"
      else
        echo "sanitizer works, but $opt kns=no_such_kernel still reported the planted error: the filter may not apply"
      fi
      return 0
    fi
  done
  echo "sanitizer UNAVAILABLE: the planted out-of-bounds write was not reported (rc $rc):"
  echo "$out" | head -n 8
  return 2
}

phase_sanitize() {
  local san=$OUT/sanitize.log rc=0
  : >"$san"
  if [[ $REHEARSE == 1 ]]; then
    echo "SKIPPED (CUDA): self-test, coverage and the three tools. The cases script on the CPU instead:"
    within "$ALLOWED" "$PY" benchmarks/gpu_sanitize_cases.py --device cpu 2>&1 | tee -a "$san" | tail -n 3
    return "${PIPESTATUS[0]}"
  fi
  sanitizer_selftest >"$LOGS/selftest.out" 2>&1
  rc=$?
  tee -a "$san" <"$LOGS/selftest.out"
  if ((rc == 2)); then
    SAN_VERDICT="UNAVAILABLE (see report)"
    return 0
  fi
  echo "-- kernel-path coverage (torch.profiler, no sanitizer):" | tee -a "$san"
  within 60 "$PY" benchmarks/gpu_sanitize_cases.py --device cuda --coverage >>"$san" 2>&1
  local cov=$?
  grep -E "^coverage:|cases passed" "$san" | tail -n 2
  # One allocation per tensor, so that an out-of-bounds access cannot land unnoticed in the caching
  # allocator's pool; only this project's kernels are instrumented, and torch's / cuBLAS's CUDA API
  # errors (probing calls they handle themselves) are not reported.
  local left=$((ALLOWED - (SECONDS - PHASE_T0)))
  if ((left < 15)); then
    echo "no time left in the box for the three tools"
    return 124
  fi
  local tool pids=()
  for tool in memcheck racecheck synccheck; do
    within "$left" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" "${SAN_FILTER[@]}" \
      --report-api-errors no --error-exitcode 99 --print-limit 20 \
      "$PY" benchmarks/gpu_sanitize_cases.py --device cuda >"$LOGS/$tool.log" 2>&1 &
    pids+=($!)
  done
  local i=0 r worst=0 summary=()
  for tool in memcheck racecheck synccheck; do
    wait "${pids[$i]}"
    r=$?
    i=$((i + 1))
    { echo "== compute-sanitizer --tool $tool (rc $r)"; cat "$LOGS/$tool.log"; } >>"$san"
    summary+=("$tool: $(verdict $r) -- $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|cases passed' "$LOGS/$tool.log" | tr '\n' ' ')")
    ((r != 0 && worst == 0)) && worst=$r
  done
  printf '%s\n' "${summary[@]}"
  grep -m 10 -E "Invalid|Race reported|Barrier error|========= +(at|by)" "$san" | head -n 10
  ((cov != 0)) && echo "coverage FAILED: some kernel path did not run (sanitize.log lists the kernels that did)"
  ((worst != 0)) && return $worst
  return $cov
}

phase_bench() {
  if [[ $REHEARSE == 1 ]]; then
    echo "SKIPPED (CUDA). The bandwidth script on small CPU inputs instead:"
    within "$ALLOWED" "$PY" benchmarks/gpu_bandwidth.py --rehearse --json "$OUT/bandwidth.json" 2>&1 | tail -n 20
    return "${PIPESTATUS[0]}"
  fi
  within "$ALLOWED" "$PY" benchmarks/gpu_bandwidth.py --json "$OUT/bandwidth.json" 2>&1
}

phase_cudatests() {
  local ignore=()
  for f in "${KERNEL_TESTS[@]}"; do ignore+=(--ignore "$f"); done
  if [[ $REHEARSE == 1 ]]; then
    echo "SKIPPED (CUDA). Collecting the whole suite under the venv instead (every test module's imports):"
    pytest_box "$OUT/cudatests.log" --collect-only tests
    return
  fi
  pytest_box "$OUT/cudatests.log" -k cuda "${ignore[@]}" tests
}

phase_pybench() {
  [[ $REHEARSE == 1 ]] && { echo "SKIPPED (CUDA)"; return 0; }
  within "$ALLOWED" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" benchmarks -k cuda --benchmark-only \
    --benchmark-columns=median,iqr,rounds >"$LOGS/pybench.log" 2>&1
  local rc=$?
  tail -n 40 "$LOGS/pybench.log"
  return $rc
}

run_phase() {
  local p=$1 rc out
  PHASE_T0=$SECONDS
  ALLOWED=$(allowance "$p")
  SAN_VERDICT=""
  section "$p (box ${BOX[$p]} s, allowed $ALLOWED s)"
  if ((ALLOWED < 5)); then
    echo "not run: the total box of $TOTAL_S s is spent" >>"$REPORT"
    row "$p" "NOT RUN (out of time)"
    return 1
  fi
  log "$p: up to $ALLOWED s"
  if [[ $p == setup ]]; then
    setup_env
    rc=$?
    tail -n 14 "$OUT/setup.log" | fence
    ((rc == 0)) && facts
  else
    "phase_$p" >"$LOGS/phase_$p.out" 2>&1
    rc=$?
    tail -n 40 "$LOGS/phase_$p.out" | fence
  fi
  local v
  v=$(verdict $rc)
  [[ -n $SAN_VERDICT ]] && v=$SAN_VERDICT
  # A rehearsal skips what needs the GPU; what it did run must pass.
  if [[ $REHEARSE == 1 && $p != setup && $rc == 0 ]]; then v="SKIPPED (needs the GPU; rehearsal parts passed)"; fi
  row "$p" "$v"
  BANK=$((BANK + BOX[$p] - (SECONDS - PHASE_T0)))
  ((BANK < 0)) && BANK=0
  log "$p: $v"
  return $rc
}

# NCCL smoke run: dawin_ext.methods.distributed's collectives and DaWin's distributed fit on the one GPU, world
# size 1 (NCCL refuses two ranks on one device), against the same fit without a process group. Self-contained.
phase_nccl() {
  cat >/tmp/gpu_check_nccl_smoke.py <<'PYEOF'
import os
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from dawin_ext import DaWin
from dawin_ext.integrations import openclip
from dawin_ext.methods import distributed as dd

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
  # A rehearsal runs the same script on gloo (CPU): the collectives and the fit path are the same code.
  local dev=cuda
  [[ $REHEARSE == 1 ]] && dev=cpu
  SMOKE_DEVICE=$dev within "$ALLOWED" "$PY" -m torch.distributed.run --nnodes=1 --nproc-per-node=1 \
    --master-addr=127.0.0.1 --master-port="${GPU_CHECK_NCCL_PORT:-29533}" /tmp/gpu_check_nccl_smoke.py 2>&1
}

finish() {
  {
    printf '\n## Summary (%s s in all; boxes sum to %s s, total box %s s)\n\n' "$((SECONDS - START))" "$BOX_SUM" "$TOTAL_S"
    printf '| phase | result | time |\n| --- | --- | --- |\n'
    printf '%s\n' "${STATUS[@]}"
  } >>"$REPORT"
  echo "gpu_check: report at $REPORT"
  cat "$REPORT"
}

main() {
  local args=()
  for a in "$@"; do
    if [[ $a == --rehearse ]]; then REHEARSE=1; else args+=("$a"); fi
  done
  set -- "${args[@]+"${args[@]}"}"
  if [[ ${1:-} == prepare ]]; then
    prepare
    return
  fi
  PHASES=("$@")
  [[ ${#PHASES[@]} -eq 0 || ${PHASES[0]} == all ]] && PHASES=("${PHASES_ALL[@]}")
  local p
  for p in "${PHASES[@]}"; do
    [[ -n ${BOX[$p]:-} ]] || {
      echo "usage: $0 [--rehearse] [prepare | all | setup build ktest sanitize bench nccl cudatests pybench]" >&2
      return 2
    }
  done
  # setup always; build first whenever no extension is built for this Python yet (a fresh machine).
  [[ " ${PHASES[*]} " == *" setup "* ]] || PHASES=(setup "${PHASES[@]}")
  local suffix
  suffix=$("$PY0" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  if [[ $REHEARSE == 0 && ! -f dawin_ext/_C$suffix && " ${PHASES[*]} " != *" build "* ]]; then
    PHASES=(setup build "${PHASES[@]:1}")
  fi
  BOX_SUM=0
  for p in "${PHASES[@]}"; do BOX_SUM=$((BOX_SUM + BOX[$p])); done
  if ((TOTAL_S > CALL_LIMIT_S - 60)); then
    echo "gpu_check: GPU_CHECK_TOTAL_S=$TOTAL_S leaves under 60 s of the device tool's $CALL_LIMIT_S s for the report" >&2
    return 2
  fi
  if [[ $REHEARSE == 1 ]]; then
    if [[ ! -d .whl ]] || ! compgen -G ".whl/*.whl" >/dev/null; then
      log "no .whl/ yet: running prepare first (it needs PyPI, as it will here before a GPU run)"
      prepare >"$LOGS/prepare.log" 2>&1 || {
        cat "$LOGS/prepare.log"
        return 1
      }
    fi
  elif ! nvidia-smi -L >/dev/null 2>&1 && [[ -z ${GPU_CHECK_ALLOW_NO_GPU:-} ]]; then
    # This rebuilds the extension in place: meant for the GPU machine's copy of the tree.
    echo "gpu_check: no NVIDIA GPU visible; run this on the GPU machine, or '$0 --rehearse' here" >&2
    return 3
  fi
  printf '# dawin_ext GPU check%s, %s\n' "$([[ $REHEARSE == 1 ]] && echo ' (REHEARSAL on a machine without a GPU)')" \
    "$(date -u '+%Y-%m-%d %H:%M UTC')" >"$REPORT"
  if [[ $REHEARSE == 1 ]]; then
    section "Rehearsal checks"
    {
      echo "phases in order: ${PHASES[*]}"
      echo "time boxes: $(for p in "${PHASES[@]}"; do printf '%s=%s ' "$p" "${BOX[$p]}"; done)sum=$BOX_SUM, total box $TOTAL_S, call limit $CALL_LIMIT_S"
      check_tree_size
    } 2>&1 | fence
    check_tree_size >/dev/null || STATUS+=("| tree size | FAILED (over the limit) | |")
    ((BOX_SUM <= TOTAL_S)) || STATUS+=("| time boxes | FAILED (sum $BOX_SUM > total $TOTAL_S) | |")
  fi
  trap finish EXIT
  PY=$PY0
  for p in "${PHASES[@]}"; do
    if ! run_phase "$p"; then
      case $p in
        setup | build)
          log "$p failed: stopping (see $REPORT)"
          return 1
          ;;
      esac
    fi
  done
  # Non-zero when anything failed, timed out or was not run (an unavailable sanitizer is not a failure).
  if printf '%s\n' "${STATUS[@]}" | grep -qE "FAILED|TIMED OUT|NOT RUN"; then
    return 1
  fi
  return 0
}

main "$@"
