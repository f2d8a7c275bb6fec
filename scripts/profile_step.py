"""Where the benchmark's training step spends its GPU time, by kernel category.

    python scripts/profile_step.py --out DIR [--provider compile_graphs_auto] [--warmup 15] [--steps 10]
    python scripts/profile_step.py --out DIR --quick --device cpu      # the tiny shape, a smoke run

Builds the step exactly as ``tokenlabel bench step --providers NAME`` does (LV-ViT-S/224, B 128, bf16, synthetic
inputs; ``--quick``: the bench's tiny shape), runs ``--warmup`` untimed steps (compilation, CUDA-graph
recording), then records ``--steps`` steps under torch.profiler and writes into ``--out``:

* ``summary.txt``: per category (GEMM, attention, convolution, LayerNorm, BatchNorm, GELU, inductor's other
  fused reductions and pointwise kernels, the optimizer, copies, the rest) the time per step, kernels per
  step and share, then the 25 kernels with the most time per step;
* ``ops_by_shape.txt``: operator time grouped by input shape (the GEMM shapes; empty of kernels inside CUDA
  graphs, so profile ``compile_auto`` for shapes: the same kernels without graphs);
* ``launchers.txt``: per kernel category, the operators that launched its kernels (time per step, kernels per
  step); kernels replayed from a CUDA graph have no launching operator, so profile a provider without graphs
  (``compile_auto``) to see, say, which op launches the ATen sums of the "other" line;
* ``trace.json.gz``: the Chrome trace.

On a CPU there are no kernels: the categories then sort the operators' own CPU time. models/NOTES.md has the
H100 breakdown this script's categories follow.
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

# (category, pattern on the lower-cased kernel or operator name), first match wins; convolution comes before
# gemm because cuDNN names its convolution kernels *_implicit_gemm
CATEGORIES = [
    # cuDNN's SDPA runs helper kernels next to its flash kernels: cudnn::fusion::compute_dot_do_o (the backward's
    # rowsum of dO * O) and cudnn::fusion::convert_dq_to_16bits (dQ's cast)
    ("attention", r"flash|fmha|attn|attention|sdpa|cudnn_generated_fort_native_sdpa|cudnn::fusion::"),
    # inductor's fused kernels carry the ops they fuse in their names; a BatchNorm backward fused with the
    # convolution's backward epilogue (triton_*_native_batch_norm_*_convolution_backward_*) is BatchNorm work
    # ... and ours (kernels/): _add_ln_* (residual + LayerNorm), _bn_* (BatchNorm + ReLU), _bias_gelu_*; their
    # backwards' _sum_partials (dweight / dbias of any of the three) is a category of its own
    ("layernorm", r"^triton.*layer_norm|aten::native_layer_norm|^_add_ln_"),
    ("batchnorm", r"^triton.*batch_norm|aten::(native_batch_norm|cudnn_batch_norm)|^_bn_"),
    ("gelu", r"^triton.*gelu|aten::gelu|^_bias_gelu_"),
    ("partial sums (ours)", r"^_sum_partials"),
    ("convolution", r"conv(?!ert)|fprop|dgrad|wgrad|implicit_convolve|aten::(convolution|_convolution|cudnn_convolution)"),
    ("gemm", r"gemm|nvjet|cutlass|cublas|matmul|splitk|aten::(mm|addmm|bmm|linear)$"),
    ("fused reductions (inductor)", r"^triton_(per|red)_"),
    ("fused pointwise (inductor)", r"^triton_"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("copies", r"memcpy|memset|copy|transpose|cat_|aten::(copy_|to|_to_copy|contiguous|clone)$"),
]
_COMPILED = [(name, re.compile(pat)) for name, pat in CATEGORIES]


def category(name: str) -> str:
    low = name.lower()
    for cat, rx in _COMPILED:
        if rx.search(low):
            return cat
    return "other"


def is_annotation(name: str) -> bool:
    """A range the profiler records on the GPU's timeline around other kernels, not a kernel of its own:
    torch.compile's ``## Call CompiledFxGraph <hash> ##`` spans a whole graph's kernels, so counting it would
    count those kernels twice (a CUDA-graph step then summed to 2x its time). record_function ranges
    (``Optimizer.step#AdamW.step``, ``ProfilerStep#3``) appear there too; no kernel's name holds a '#'."""
    return name.startswith("## ") or "#" in name


def summarize(rows, steps: int, unit: str) -> str:
    """rows: [(name, microseconds)] of every kernel (or operator) recorded over ``steps`` steps."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    by_cat = collections.defaultdict(lambda: [0.0, 0])
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for name, us in rows:
        for table, key in ((by_cat, category(name)), (by_name, name)):
            table[key][0] += us
            table[key][1] += 1
    total = sum(t for t, _ in by_cat.values())
    lines = [f"{unit} per step: {total / steps / 1e3:.3f} ms over {steps} steps ({len(rows)} records)", "",
             f"{'category':<28} {'ms/step':>9} {'per step':>9} {'share':>7}"]
    for cat, (t, n) in sorted(by_cat.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{cat:<28} {t / steps / 1e3:9.3f} {n / steps:9.1f} {100 * t / max(total, 1e-9):6.1f}%")
    lines += ["", f"{'ms/step':>9} {'per step':>9}  name (category)"]
    for name, (t, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]:
        lines.append(f"{t / steps / 1e3:9.3f} {n / steps:9.1f}  {name[:110]} ({category(name)})")
    return "\n".join(lines) + "\n"


def launchers(events, steps: int) -> str:
    """Per kernel category, the CPU operators whose calls launched its kernels (the profiler links each kernel to
    the operator it was launched from), by time per step. ``events``: the profiler's FunctionEvents (CPU ones carry
    ``.kernels`` with name and duration in microseconds)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    table = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0, collections.Counter()]))
    for e in events:
        for k in getattr(e, "kernels", None) or ():
            slot = table[category(k.name)][e.name]
            slot[0] += k.duration
            slot[1] += 1
            slot[2][k.name] += 1
    if not table:
        return "no kernel has a launching operator (CUDA-graph replay, or a CPU run)\n"
    lines = []
    for cat, ops in sorted(table.items(), key=lambda kv: -sum(v[0] for v in kv[1].values())):
        total = sum(v[0] for v in ops.values())
        lines.append(f"{cat}: {total / steps / 1e3:.3f} ms per step")
        for op, (us, n, kernels) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:12]:
            top = kernels.most_common(1)[0][0]
            lines.append(f"  {us / steps / 1e3:9.3f} ms {n / steps:7.1f}/step  {op[:60]}  <- e.g. {top[:70]}")
        lines.append("")
    return "\n".join(lines)


def _case(shape: str | None, quick: bool, device):
    import torch

    from tokenlabel.bench.registry import Case
    from tokenlabel.bench.step import QUICK_SHAPES, SHAPES

    table = QUICK_SHAPES if quick else SHAPES
    shape = shape or next(iter(table))
    if shape not in table:
        raise SystemExit(f"profile_step: unknown shape {shape!r}; valid: {', '.join(table)}")
    params, _ = table[shape]
    return Case(op="step", shape=shape, params=dict(params), dtype=torch.bfloat16, device=device, quick=quick)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for summary.txt, ops_by_shape.txt, trace.json.gz")
    ap.add_argument("--provider", default="compile_graphs_auto", help="a `bench step` provider")
    ap.add_argument("--shape", default=None, help="bench shape name (default S224; --quick: tiny)")
    ap.add_argument("--quick", action="store_true", help="the bench's tiny shape")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--warmup", type=int, default=15, help="untimed steps first (compile, graph recording)")
    ap.add_argument("--steps", type=int, default=10, help="profiled steps")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        ap.error(f"--out {a.out} exists and is not an empty folder: give a new one (an earlier profile is not "
                 "overwritten)")

    import torch
    from torch.profiler import ProfilerActivity, profile

    from tokenlabel.bench import registry
    from tokenlabel.bench.registry import Skip
    from tokenlabel.bench.timing import sync

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("profile_step: --device cuda but CUDA is not available")
    names = {p.name: p for p in registry.providers("step")}
    if a.provider not in names:
        raise SystemExit(f"profile_step: unknown provider {a.provider!r}; valid: {', '.join(names)}")
    case = _case(a.shape, a.quick, device)
    try:
        prep = names[a.provider].fn(case)
        if prep.check is not None:
            prep.check()
    except Skip as e:
        raise SystemExit(f"profile_step: {a.provider} cannot run here: {e}")
    step = prep.modes["train_step"]
    for _ in range(a.warmup):
        step()
    sync(device)

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(a.steps):
            step()
        sync(device)

    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / "trace.json.gz"))
    events = prof.events()
    if cuda:
        rows = [(e.name, e.device_time) for e in events
                if e.device_type == torch.autograd.DeviceType.CUDA and not is_annotation(e.name)
                and not getattr(e, "is_user_annotation", False)]
        unit, sort_key = "GPU kernel time", "self_cuda_time_total"
    else:  # the operators' own CPU time; aten ops only, so a parent's time is not counted twice
        rows = [(e.name, e.self_cpu_time_total) for e in events if e.name.startswith("aten::")]
        unit, sort_key = "operator self CPU time", "self_cpu_time_total"
    head = (f"provider {a.provider}, shape {case.shape} {case.describe()}, device "
            f"{torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}, "
            f"{a.warmup} warm-up + {a.steps} profiled steps\n\n")
    (out / "summary.txt").write_text(head + summarize(rows, a.steps, unit))
    (out / "launchers.txt").write_text(head + launchers(events, a.steps))
    (out / "ops_by_shape.txt").write_text(
        prof.key_averages(group_by_input_shape=True).table(sort_by=sort_key, row_limit=60))
    sys.stdout.write(head + summarize(rows, a.steps, unit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
