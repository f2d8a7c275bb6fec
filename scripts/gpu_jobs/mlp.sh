#!/bin/bash
# No DALI needed. kernels/linear_gelu.py on the GPU: its tests, the tilings of its two GEMMs beside the cuBLAS GEMM +
# bias_gelu kernel they replace, `bench mlp` (the block's MLP each way), then the flash-attention tests whose bounds
# changed on 2026-12-05 (float64 tilings, packed fp32).   BUDGET=560 bash scripts/gpu_jobs/mlp.sh
source scripts/gpu_jobs/common.sh
step 90 tests.txt python -m pytest -q -p no:cacheprovider -p no:logging -W ignore -rf tests/test_kernels_linear_gelu.py
step 200 sweep.txt python scripts/sweep_mlp_gemm.py --out "$OUT/sweep"
step 100 bench.txt python -m tokenlabel bench mlp --shapes S224,M224 --out "$OUT/bench" --no-plot
step 120 tests.txt python -m pytest -q -p no:cacheprovider -p no:logging -W ignore -rf \
  tests/test_kernels_flash_attention.py -k "tilings_match_float64 or packed"
