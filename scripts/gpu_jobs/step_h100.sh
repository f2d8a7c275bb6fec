#!/bin/bash
# No DALI needed. The model GPU tests, then the step with all our kernels beside torch's modules and beside ours with
# cuDNN's conv1 weight gradient (what compile_graphs_ours was until 2026-12-05), then the profile of
# compile_graphs_ours by kernel category.
#   BUDGET=560 bash scripts/gpu_jobs/step_h100.sh     (after `source .device/env.sh` where DALI/xformers are staged)
source scripts/gpu_jobs/common.sh
step 250 tests.txt python -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_models_gpu.py
step 200 bench.txt python -m tokenlabel bench step --out "$OUT/bench" --no-plot \
  --providers compile_graphs_auto,compile_graphs_ours,compile_graphs_ours_cudnn_wgrad
step 80 profile.txt python scripts/profile_step.py --out "$OUT/profile" --provider compile_graphs_ours
