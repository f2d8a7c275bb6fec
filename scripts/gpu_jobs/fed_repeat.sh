#!/bin/bash
# Needs DALI staged and data/imagenet-sample-334.tar carried. The repeat of 2026-12-06's first fed call, where the one
# hybrid pipeline with 4 batches ahead (loader_fed_ours_deep) left the GPU idle 2.6% against the default lanes' 5.4%:
# that setting, the lanes baseline, the loaders alone (PIL with 16 workers, the hybrid pipeline, the lanes), the
# setting again, then the synthetic step on the same box (in order of what a short budget should keep).
#   BUDGET=540 bash scripts/gpu_jobs/fed_repeat.sh   (after `source .device/env.sh`)
source scripts/gpu_jobs/common.sh
D=data/imagenet-sample-334.tar
fed() {  # fed N PROVIDER: the step fed by that loader setting, 600 timed steps, results in $OUT/fed-N-PROVIDER
  step 150 fed.txt python -m tokenlabel bench step --providers "$2" --data $D --reps ${REPS:-600} \
    --out "$OUT/fed-$1-$2" --no-plot
}
fed 1 loader_fed_ours_deep
fed 2 loader_fed_lanes_ours
# the loader's GPU tests, with build_loader's new CUDA default (one hybrid pipeline, 4 ahead) in them
step 90 tests.txt python -m pytest -q -m gpu -p no:cacheprovider -p no:logging -rf tests/test_loader_pipeline.py
step 150 loader.txt python -m tokenlabel bench loader --providers pil,dali,dali_lanes --data $D \
  --out "$OUT/loader" --no-plot
fed 3 loader_fed_ours_deep
step 150 step.txt python -m tokenlabel bench step --providers compile_graphs_ours --out "$OUT/step" --no-plot
true
