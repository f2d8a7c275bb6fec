#!/bin/bash
# Needs DALI staged and data/imagenet-sample-334.tar carried. What "auto" costs beside the step with its engines'
# pipeline paused (scripts/auto_variants.py): the one hybrid pipeline run by the consumer, "auto" with the engines
# off from the start, the dispatch with two hybrid lanes (one off), "auto" as it is; alternating, one call.
#   BUDGET=570 bash scripts/gpu_jobs/auto_diag.sh   (after `source .device/env.sh`)
source scripts/gpu_jobs/common.sh
for p in loader_fed_ours_deep x_auto_off_ours x_dispatch_hybrid_ours loader_fed_auto_ours loader_fed_ours_deep \
  x_dispatch_hybrid_ours x_auto_off_ours loader_fed_ours_deep; do
  FED_RUN="python scripts/auto_variants.py" fed_b $p
done
true
