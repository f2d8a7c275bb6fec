#!/bin/bash
# Needs DALI staged and data/imagenet-sample-334.tar carried. "auto" with the consumer running the hybrid pipeline
# itself while the engines' lane is paused (no pump thread in between, as the one-pipeline path), against the one
# hybrid pipeline 4 ahead, fed to the step with our kernels; the loader's GPU tests first; the loaders alone last.
#   BUDGET=340 bash scripts/gpu_jobs/direct.sh   (after `source .device/env.sh`)
source scripts/gpu_jobs/common.sh
step 60 tests.txt python -m pytest -q -m gpu -p no:cacheprovider -p no:logging -rf -k "${TESTS_K:-auto or resume}" \
  tests/test_loader_pipeline.py
fed_b loader_fed_auto_ours
fed_b loader_fed_ours_deep
fed_b loader_fed_auto_ours
step 60 loader.txt python -m tokenlabel bench loader --providers pil,dali_auto --data $D --out "$OUT/b" --no-plot
fed_b loader_fed_ours_deep
true
