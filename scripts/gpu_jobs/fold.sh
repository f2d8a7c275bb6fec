#!/bin/bash
# Needs DALI staged. The loader's GPU tests after one copy-out helper (_copy_async) replaced the two written for the
# one-pipeline path and the consumer's run of a lane; what the box offers for building GEMMs with fused epilogues
# (nvcc, CUTLASS, inductor's CUTLASS backend); the step with our kernels beside the same with inductor's combo
# kernels. train's GPU tests go in a call of their own (train_tests.sh).
#   BUDGET=500 bash scripts/gpu_jobs/fold.sh   (after `source .device/env.sh`)
source scripts/gpu_jobs/common.sh
{ set -x; command -v nvcc; ls -d /usr/local/cuda* 2>&1; nvcc --version 2>&1 | tail -2
  python - <<'PY'
import importlib, os, torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
root = os.path.dirname(torch.__file__)
print("cutlass headers in torch:", [p for p in ("include/cutlass", "include/cute") if os.path.isdir(os.path.join(root, p))])
for m in ("cutlass", "cutlass_library", "cuda.bindings", "nvidia.cuda_nvcc", "nvidia.cuda_nvrtc"):
    try:
        importlib.import_module(m); print("import", m, "ok")
    except Exception as e:
        print("import", m, "fails:", type(e).__name__, e)
try:
    from torch._inductor.codegen.cuda import cutlass_utils
    print("inductor try_import_cutlass:", cutlass_utils.try_import_cutlass())
except Exception as e:
    print("inductor cutlass backend:", type(e).__name__, e)
print("torch.cuda._compile_kernel (NVRTC):", hasattr(torch.cuda, "_compile_kernel"))
PY
  pip list 2>/dev/null | grep -i -E "cutlass|nvidia|cuda"; } > "$OUT/toolchain.txt" 2>&1
step 150 tests.txt python -m pytest -q -m gpu -p no:cacheprovider -p no:logging -rf tests/test_loader_pipeline.py
step 280 bench.txt python -m tokenlabel bench step --out "$OUT/bench" --no-plot \
  --providers compile_graphs_ours,compile_graphs_ours_combo
true
