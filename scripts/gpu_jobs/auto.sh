#!/bin/bash
# Needs DALI staged and data/imagenet-sample-334.tar carried. hw_decoder_load="auto" (the engines' pipeline beside
# the hybrid one, paused while it delivers under its share of the batches; the default on CUDA in this tree) against
# the one hybrid pipeline 4 ahead (the default before) beside the step with our kernels, the loaders alone (PIL with
# 16 workers, "auto", the plain lanes), the loader's GPU tests, "auto" fed again, the synthetic step on the same
# box, then train's GPU tests with the new default (in order of what a short budget should keep). All bench rows
# go to $OUT/b (few files come back).
#   BUDGET=570 bash scripts/gpu_jobs/auto.sh   (after `source .device/env.sh`)
source scripts/gpu_jobs/common.sh
fed_b loader_fed_auto_ours
fed_b loader_fed_ours_deep
step 150 loader.txt python -m tokenlabel bench loader --providers pil,dali_auto,dali_lanes --data $D --out "$OUT/b" \
  --no-plot
step 100 tests.txt python -m pytest -q -m gpu -p no:cacheprovider -p no:logging -rf tests/test_loader_pipeline.py
fed_b loader_fed_auto_ours
step 60 step.txt python -m tokenlabel bench step --providers compile_graphs_ours --out "$OUT/b" --no-plot
step 200 tests.txt python -m pytest -q -m gpu -p no:cacheprovider -p no:logging -rf tests/test_train_gpu.py
true
