#!/bin/bash
# train's GPU tests alone (they take ~4-5 minutes on an H100: compiles, CUDA graphs, the PIL and DALI loaders).
#   BUDGET=585 bash scripts/gpu_jobs/train_tests.sh   (after `source .device/env.sh`; DALI staged)
source scripts/gpu_jobs/common.sh
step 580 tests.txt python -m pytest -q -m gpu -p no:cacheprovider -p no:logging -rf --durations=12 \
  tests/test_train_gpu.py
true
