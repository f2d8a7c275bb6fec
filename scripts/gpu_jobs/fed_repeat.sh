#!/bin/bash
# Needs DALI staged and data/imagenet-sample-334.tar carried. The repeat of 2026-12-06's first fed call, where the one
# hybrid pipeline with 4 batches ahead (loader_fed_ours_deep) left the GPU idle 2.6% against the default lanes' 5.4%:
# that setting twice around the lanes baseline, the loaders alone (PIL with 16 workers, the hybrid pipeline, the
# lanes), then the synthetic step on the same box.   BUDGET=540 bash scripts/gpu_jobs/fed_repeat.sh
source scripts/gpu_jobs/common.sh
D=data/imagenet-sample-334.tar
i=0
for p in loader_fed_ours_deep loader_fed_lanes_ours loader_fed_ours_deep; do
  i=$((i + 1))
  step 150 fed.txt python -m tokenlabel bench step --providers "$p" --data $D --reps ${REPS:-600} --out "$OUT/fed-$i-$p" --no-plot
done
step 150 loader.txt python -m tokenlabel bench loader --providers pil,dali,dali_lanes --data $D --out "$OUT/loader" --no-plot
step 150 step.txt python -m tokenlabel bench step --providers compile_graphs_ours --out "$OUT/step" --no-plot
true
