#!/bin/bash
# No DALI needed. The model GPU tests (the residual-norm compiled test's float64 check among them), then the step with
# our kernels' default tilings beside torch's modules (and with conv1's weight gradient ours), then the profiles of
# compile_graphs_ours and _c1w by kernel category (does our conv1 weight gradient replace cuDNN's 460-480 us kernel?).
#   BUDGET=560 bash scripts/gpu_jobs/step_h100.sh     (after `source .device/env.sh` where DALI/xformers are staged)
source scripts/gpu_jobs/common.sh
step 170 tests.txt python -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_models_gpu.py
step 230 bench.txt python -m tokenlabel bench step --out "$OUT/bench" --no-plot \
  --providers compile_graphs_auto,compile_graphs_ours,compile_graphs_ours_c1w
step 80 profile.txt python scripts/profile_step.py --out "$OUT/profile" --provider compile_graphs_ours
step 80 profile.txt python scripts/profile_step.py --out "$OUT/profile_c1w" --provider compile_graphs_ours_c1w
