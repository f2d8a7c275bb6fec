#!/bin/bash
# No DALI needed. The "tma" attention backward (kernels/flash_attention.py, fifteenth session; built and CPU-checked,
# never run on a GPU): its GPU tests first (correctness of the TMA and warp-specialised builds), then its tilings
# beside the split backward (_attn_tune time: each checked against split's gradient first), `bench attention` at
# S224 / M224 bf16 beside triton (split) and SDPA, and the whole step with it beside compile_graphs_ours.
#   BUDGET=560 bash scripts/gpu_jobs/attn_tma.sh
source scripts/gpu_jobs/common.sh
step 150 tests.txt python -m pytest -q -p no:cacheprovider -p no:logging -W ignore -rf \
  tests/test_kernels_flash_attention.py -k "tma or gpu_realistic or cuda_graph_capture"
step 150 tune.txt python -m tokenlabel.kernels._attn_tune time --shape S224 --kinds bwd,bwd_tma_dq,bwd_tma_dkdv \
  --limit ${LIMIT:-8} --out "$OUT/tune"
step 90 bench.txt python -m tokenlabel bench attention --shapes S224,M224 --dtype bf16 --out "$OUT/bench" --no-plot \
  --providers triton,triton_tma,triton_tma_ws,sdpa
step 200 step.txt python -m tokenlabel bench step --out "$OUT/step" --no-plot \
  --providers compile_graphs_ours,compile_graphs_ours_attn_tma,compile_graphs_ours_attn_tma_ws
true
