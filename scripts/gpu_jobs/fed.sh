#!/bin/bash
# Needs DALI staged (../shared/device/README.md) and data/imagenet-sample-334.tar carried. The hybrid pipeline and the
# lanes feeding the step with our kernels, 600 timed steps each (150 left the GPU-idle share 2 points apart between
# repeats), then the loader and train GPU tests.   BUDGET=560 bash scripts/gpu_jobs/fed.sh   (after `source .device/env.sh`)
source scripts/gpu_jobs/common.sh
D=data/imagenet-sample-334.tar
for p in ${FED:-loader_fed_ours loader_fed_lanes_ours}; do  # the hybrid pipeline alone, then the lanes (the default)
  step 170 fed.txt python -m tokenlabel bench step --providers "$p" --data $D --reps ${REPS:-600} --out "$OUT/fed-$p" --no-plot
done
# each file its own limit (2026-12-05, H100: the loader file ~45 s, the train file ~150 s; one shared limit of 250 s
# ran out inside the train file)
step 90 tests.txt python -m pytest -q -m gpu -p no:cacheprovider -p no:logging -rf tests/test_loader_pipeline.py
step 250 tests.txt python -m pytest -q -m gpu -p no:cacheprovider -p no:logging -rf tests/test_train_gpu.py
