#!/bin/bash
# Needs DALI staged and data/imagenet-sample-334.tar carried. hw_decoder_load="auto" with its first try of the
# engines' pipeline after 1,024 batches (AUTO_PROBE; 256 before) against the one hybrid pipeline 4 ahead, fed to the
# step with our kernels, alternating in one call; the loaders alone; the loader's GPU tests. All bench rows go to
# $OUT/b (few files come back).
#   BUDGET=570 bash scripts/gpu_jobs/probe.sh   (after `source .device/env.sh`)
source scripts/gpu_jobs/common.sh
fed_b loader_fed_auto_ours
fed_b loader_fed_ours_deep
step 100 loader.txt python -m tokenlabel bench loader --providers pil,dali_auto,dali_lanes --data $D --out "$OUT/b" \
  --no-plot
step 100 tests.txt python -m pytest -q -m gpu -p no:cacheprovider -p no:logging -rf tests/test_loader_pipeline.py
fed_b loader_fed_auto_ours
fed_b loader_fed_ours_deep
fed_b loader_fed_auto_ours
fed_b loader_fed_ours_deep
true
