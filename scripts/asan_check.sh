#!/usr/bin/env bash
# Builds the CPU kernels with AddressSanitizer + UndefinedBehaviorSanitizer into a separate build
# directory (the in-place dawin_ext/_C*.so is never touched) and runs the kernel tests against it.
# Exits non-zero on any sanitizer report or test failure.
#
#   bash scripts/asan_check.sh                 # default kernel tests
#   bash scripts/asan_check.sh tests/test_x.py # or any pytest arguments
#
# Python itself is not instrumented, so libasan (and libstdc++) is LD_PRELOADed; leak detection is off because the
# interpreter's own allocations would drown the report. The loader picks the sanitized build through
# DAWIN_EXT_C (see dawin_ext/ops/_loader.py).
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR="${DAWIN_EXT_ASAN_BUILD_DIR:-build/asan}"
CXX_BIN="${CXX:-c++}"
SAN_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
start=$(date +%s)

echo "== sanitizer build (CPU only) into $BUILD_DIR"
mkdir -p "$BUILD_DIR"
# setuptools appends CFLAGS/LDFLAGS to the compiler/linker command lines that torch's ninja build uses.
DAWIN_EXT_BUILD=cpu MAX_JOBS="${MAX_JOBS:-2}" CFLAGS="$SAN_FLAGS" LDFLAGS="-fsanitize=address,undefined" \
  python setup.py -q build_ext --build-temp "$BUILD_DIR/temp" --build-lib "$BUILD_DIR/lib" >"$BUILD_DIR.log" 2>&1 ||
  {
    tail -50 "$BUILD_DIR.log"
    echo "asan_check: sanitizer build failed (full log: $BUILD_DIR.log)" >&2
    exit 1
  }
SO=$(ls "$BUILD_DIR"/lib/dawin_ext/_C*.so)
# (grep without -q reads all of nm's output, so pipefail does not trip on SIGPIPE)
if ! nm -D "$SO" | grep __asan_ >/dev/null; then
  echo "asan_check: $SO is not instrumented (CFLAGS were not applied)" >&2
  exit 1
fi
# libstdc++ is preloaded too: python does not link it, and without it ASan's __cxa_throw interceptor
# finds no real __cxa_throw and aborts on the first C++ exception (every TORCH_CHECK that fires).
PRELOAD="$("$CXX_BIN" -print-file-name=libasan.so) $("$CXX_BIN" -print-file-name=libstdc++.so)"
echo "== built $SO in $(($(date +%s) - start)) s; preloading $PRELOAD"

if [ "$#" -eq 0 ]; then
  # The op-level tests: each kernel's own tests, the CUDA kernels' grids emulated on the CPU, the property
  # tests, the ops' bad-input and NaN cases, and the 4-thread tests (the high-level API's tests exercise no
  # other kernel code).
  set -- $(ls tests/ops/test_blend*.py tests/ops/test_entropy*.py tests/ops/test_sample_combine*.py \
    tests/ops/test_samplewise_linear*.py tests/ops/test_cuda_emulation.py tests/ops/test_properties.py 2>/dev/null | sort -u)
  if [ ! -f tests/ops/test_cuda_emulation.py ]; then
    echo "asan_check: tests/ops/test_cuda_emulation.py is missing" >&2
    exit 1
  fi
  if [ "$#" -eq 0 ]; then
    echo "asan_check: no kernel test files found" >&2
    exit 1
  fi
  set -- "$@" tests/test_bad_input.py::test_bad_input tests/test_bad_input.py::TestNaNPolicy \
    tests/test_bad_input.py::test_blend_never_silently_skips_a_floating_dtype \
    tests/ops/test_resources.py::test_four_threads_match_sequential \
    tests/ops/test_resources.py::test_four_threads_blend_into_separate_outputs
fi

LOG="$BUILD_DIR/pytest.log"
export DAWIN_EXT_C="$SO"
export LD_PRELOAD="$PRELOAD"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1"
# Fewer hypothesis examples under the (slow) sanitizer; the plain CI run does the full count.
export DAWIN_EXT_PROPERTY_EXAMPLES="${DAWIN_EXT_PROPERTY_EXAMPLES:-50}"
# Check that the sanitized library is the one that gets loaded.
python -c "
import os, dawin_ext.ops._loader as L
assert os.path.samefile(L._C.__file__, os.environ['DAWIN_EXT_C']), L._C.__file__
print('asan_check: loaded', L._C.__file__)
"
echo "== pytest $* (log: $LOG)"
set +e
python -m pytest -q -p no:cacheprovider --durations=10 "$@" 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
unset LD_PRELOAD
if grep -qE "ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$LOG"; then
  echo "asan_check: sanitizer report found (see $LOG)" >&2
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "asan_check: pytest exited with $status" >&2
  exit "$status"
fi
echo "asan_check: clean, $(($(date +%s) - start)) s in total"
