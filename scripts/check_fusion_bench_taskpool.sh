#!/usr/bin/env bash
# fusion_bench 0.2.33's CLIP task pools import transformers 4.x names (CLIPVisionTransformer) that transformers 5
# removed, so under the main environment's transformers 5 the task-pool test of tests/integrations/test_fusion_bench.py
# skips. This runs the fusion_bench and HF CLIP tests once more in a venv layered on the main environment
# (--system-site-packages: same torch, same built dawin_ext) with the transformers/datasets pair fusion_bench supports,
# and fails if anything skips there.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FB_COMPAT_VENV:-build/fusion-bench-t4-venv}
python -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install --quiet "transformers==4.57.6" "datasets==4.1.1"
"$venv/bin/python" -c "import transformers; from fusion_bench.taskpool.clip_vision.taskpool import CLIPVisionModelTaskPool; print('fusion_bench task pool imports with transformers', transformers.__version__)"
out=$("$venv/bin/python" -m pytest -q -p no:cacheprovider -rs tests/integrations/test_fusion_bench.py tests/integrations/test_hf_clip.py 2>&1) || { echo "$out"; exit 1; }
echo "$out" | tail -3
if echo "$out" | grep -q "skipped"; then
  echo "check_fusion_bench_taskpool: tests skipped under transformers 4.x (see above)"
  exit 1
fi
echo "check_fusion_bench_taskpool: PASSED"
