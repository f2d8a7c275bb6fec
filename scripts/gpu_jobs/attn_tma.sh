#!/bin/bash
# No DALI needed. The "tma" attention kernels (kernels/flash_attention.py, fifteenth session: the forward and the
# backward's two launches as persistent programs loading by TMA; built and CPU-checked, never run on a GPU): their
# GPU tests first (correctness of the TMA and warp-specialised builds), then their tilings beside the pointer kernels
# (_attn_tune time: each checked first, the forward against SDPA, the backward against split's gradient), `bench
# attention` at S224 / M224 bf16 beside triton and SDPA, and the whole step with them beside compile_graphs_ours.
#   BUDGET=560 bash scripts/gpu_jobs/attn_tma.sh
source scripts/gpu_jobs/common.sh
step 200 tests.txt python -m pytest -q -p no:cacheprovider -p no:logging -W ignore -rf \
  tests/test_kernels_flash_attention.py -k "test_tma_ or test_use_tma or test_use_fwd_impl or realistic_shapes[tma \
  or cuda_graph_capture_matches_eager[tma or scores_with_a_partial_key_block[tma or test_sm90_builds_of_the_tma \
  or tma_warp_specialised"
step 130 tune.txt python -m tokenlabel.kernels._attn_tune time --shape S224 \
  --kinds fwd,fwd_tma,bwd,bwd_tma_dq,bwd_tma_dkdv --limit ${LIMIT:-5} --out "$OUT/tune"
step 60 bench.txt python -m tokenlabel bench attention --shapes S224,M224 --dtype bf16 --out "$OUT/bench" --no-plot \
  --providers triton,triton_tma,triton_tma_ws,sdpa
# the step: the plain tma kernels (the warp-specialised ones next, STEP_WS=1, if their rows above win)
step 160 step.txt python -m tokenlabel bench step --out "$OUT/step" --no-plot \
  --providers compile_graphs_ours,compile_graphs_ours_attn_tma${STEP_WS:+,compile_graphs_ours_attn_tma_ws}
true
