#!/bin/bash
# No DALI needed. kernels/linear_gelu.py on the GPU: its tests, the tilings of its two GEMMs beside the cuBLAS GEMM +
# bias_gelu kernel they replace (IMPLS="tma_ws,tma" by default: the persistent TMA GEMM warp-specialised and plain,
# neither timed yet; "ptr", the pointer-load GEMM, was swept on 2026-12-05), `bench mlp` (the block's MLP each way).
#   BUDGET=560 bash scripts/gpu_jobs/mlp.sh
source scripts/gpu_jobs/common.sh
step 150 tests.txt python -m pytest -q -p no:cacheprovider -p no:logging -W ignore -rf tests/test_kernels_linear_gelu.py
# gemm first: the plain persistent TMA GEMM (warp-specialised or not) against cuBLAS, before any epilogue
step 270 sweep.txt python scripts/sweep_mlp_gemm.py --out "$OUT/sweep" --kinds gemm,fwd,bwd --impls "${IMPLS:-tma_ws,tma}" \
  --limit ${LIMIT:-8}
step 120 bench.txt python -m tokenlabel bench mlp --shapes S224,M224 --out "$OUT/bench" --no-plot
# the whole step with gelu="gemm" (pointer / TMA GEMMs) beside ours, when the MLP rows say it may win: STEP=1
[ -n "$STEP" ] && step 220 step.txt python -m tokenlabel bench step --out "$OUT/step" --no-plot \
  --providers compile_graphs_ours,compile_graphs_ours_mlp_tma_ws,compile_graphs_ours_mlp_tma
true
