#!/bin/bash
# No DALI needed. The model GPU tests (the residual-norm compiled test's float64 check first), then the step with our
# kernels' default tilings beside torch's modules, then the profile of compile_graphs_ours by kernel category.
#   BUDGET=560 bash scripts/gpu_jobs/step_h100.sh     (after `source .device/env.sh` where DALI/xformers are staged)
source scripts/gpu_jobs/common.sh
step 200 tests.txt python -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_models_gpu.py
step 200 bench.txt python -m tokenlabel bench step --providers compile_graphs_auto,compile_graphs_ours --out "$OUT/bench" \
  --no-plot
step 120 profile.txt python scripts/profile_step.py --out "$OUT/profile" --provider compile_graphs_ours
