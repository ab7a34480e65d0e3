#!/usr/bin/env bash
# One entry point for a fresh machine:
#   bash run.sh demo   installs everything, builds the extension, runs the embedded benchmark
#   bash run.sh test   installs everything, builds the extension, runs the test suite
# Both are idempotent: a second run reuses the installed packages and the built extension.
set -euo pipefail
cd "$(dirname "$0")"

setup() {
  # torch 2.14.1 is the CUDA 13.0 build; on this project's machines pip takes it from local disk.
  python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
  python -m pip install --quiet setuptools wheel pybind11 ninja
  # CUDA sources are compiled whenever a toolkit and a CUDA torch are present (see setup.py).
  MAX_JOBS="${MAX_JOBS:-2}" python -m pip install --quiet --no-build-isolation -e ".[test,plots]"
  python -c "import dawin_ext; print('dawin_ext build:', dawin_ext.build_info())"
}

case "${1:-}" in
  demo)
    setup
    shift
    dawin-ext demo "$@"
    ;;
  test)
    setup
    shift
    python -m pytest -q tests "$@"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: bash run.sh {demo|test|setup} [extra args]" >&2
    exit 2
    ;;
esac
