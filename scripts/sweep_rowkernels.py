"""Time the tilings of the row kernels (kernels/add_layernorm.py, kernels/bias_gelu.py, batchnorm.sum_partials, and
the stem's BatchNorm + ReLU kernels, kernels/batchnorm.py) and of conv1's weight gradient (kernels/conv_wgrad.py) on
the GPU at LV-ViT's shapes, one coordinate at a time around the current best, and optionally run a tokenlabel command
in the same process with the best tiling applied.

    python scripts/sweep_rowkernels.py --out DIR [--model s|m] [--passes 2] [-- bench step --providers ...]

Each candidate is first checked against the float32 torch computation of the same op (a tiling that computes
something else is reported and never chosen), then timed by triton.testing.do_bench_cudagraph (median; replayed in
a CUDA graph as the compiled step runs them, so the launches' host time is not counted: plain do_bench measured
2-3x the in-step kernel times). The objective is one whole call as the model makes it: add_ln backward includes
its partial sums. Writes DIR/sweep.csv (every candidate)
and DIR/best.json (the chosen tilings, to copy into the kernels' FWD / BWD / SUM defaults).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import torch
import triton
import triton.testing

from tokenlabel.kernels import add_layernorm as aln
from tokenlabel.kernels import batchnorm as bn
from tokenlabel.kernels import bias_gelu as bg
from tokenlabel.kernels import conv_wgrad as cw

SHAPES = {"s": (128 * 197, 384, 1152), "m": (128 * 197, 512, 1536)}  # (rows M, width C, MLP hidden N) at 224, B 128
STEM = (128, 64, 112, 112)  # the stem's BatchNorm activations at 224, B 128 (the same for every LV-ViT size)
CONV1 = (128, 16, 115, 115, 4)  # conv1's s2d input at 224, B 128: [B, 16 folded channels, 115, 115], a 4 x 4 kernel

SPACES = {
    "add_ln_fwd": (aln.FWD, dict(tile=[1024, 2048, 4096, 8192], warps=[2, 4, 8, 16])),
    "add_ln_bwd": ((aln.BWD, bn.SUM), dict(tile=[512, 1024, 2048, 4096], warps=[1, 2, 4, 8],
                                           per_sm=[1, 2, 3, 4, 6, 8, 12], joint=[False, True], stages=[1, 2, 3],
                                           cb=[4, 8, 16, 32], acc2d=[False, True],
                                           block_p=[16, 32, 64, 128, 256, 512, 1024], sum_warps=[1, 2, 4, 8],
                                           sum_stages=[1, 2, 3])),
    "gelu_fwd": (bg.FWD, dict(cdf=list(bg.CDFS), rows=[4, 8, 16, 32, 64], cols=[64, 128, 256, 512, 1024],
                              warps=[2, 4, 8, 16])),
    "gelu_bwd": (bg.BWD, dict(cdf=list(bg.CDFS), rows=[4, 8, 16, 32, 64], warps=[2, 4, 8],
                              per_sm=[1, 2, 3, 4, 6, 8, 12], stages=[1, 2, 3], acc2d=[False, True],
                              cols=[64, 128, 256, 512])),
    # the stem's BatchNorm + ReLU, forward (statistics, finalise, apply) and backward (sums, sum_partials, apply):
    # each parameter is "<kernel>_<key>" of bn.STATS / APPLY / BWD_SUMS / BWD_APPLY (see FIELDS)
    "bn_fwd": (None, dict(acc2d=[False, True], peel=[False, True], stats_elems=[2048, 4096, 8192, 16384],
                          stats_warps=[2, 4, 8, 16], stats_per_sm=[1, 2, 4, 8, 16], stats_stages=[1, 2, 3, 4],
                          apply_elems=[2048, 4096, 8192, 16384], apply_warps=[2, 4, 8, 16],
                          apply_per_sm=[1, 2, 4, 8, 16], apply_stages=[1, 2, 3, 4])),
    "bn_bwd": (None, dict(acc2d=[False, True], peel=[False, True], sums_elems=[2048, 4096, 8192, 16384],
                          sums_warps=[2, 4, 8, 16], sums_per_sm=[1, 2, 4, 8, 16], sums_stages=[1, 2, 3, 4],
                          apply_elems=[2048, 4096, 8192, 16384], apply_warps=[2, 4, 8, 16],
                          apply_per_sm=[1, 2, 4, 8, 16], apply_stages=[1, 2, 3, 4])),
    # conv1's weight gradient (s2d form): output columns per step, warps, programs per SM, pipeline stages (a stage
    # of block_x 128 holds 80 KB of shared memory: 3 stages do not fit an SM and fail, recorded, never chosen)
    "conv1_wgrad": (cw.TILING, dict(block_x=[32, 64, 128, 256], warps=[4, 8], per_sm=[1, 2, 3, 4], stages=[1, 2, 3])),
}
# for the kinds whose parameters live in several dicts: parameter -> (dict, key)
FIELDS = {
    "bn_fwd": {"acc2d": (bn.STATS, "acc2d"), "peel": (bn.APPLY, "peel"),
               **{f"stats_{k}": (bn.STATS, k) for k in ("elems", "warps", "per_sm", "stages")},
               **{f"apply_{k}": (bn.APPLY, k) for k in ("elems", "warps", "per_sm", "stages")}},
    "bn_bwd": {"acc2d": (bn.BWD_SUMS, "acc2d"), "peel": (bn.BWD_APPLY, "peel"),
               **{f"sums_{k}": (bn.BWD_SUMS, k) for k in ("elems", "warps", "per_sm", "stages")},
               **{f"apply_{k}": (bn.BWD_APPLY, k) for k in ("elems", "warps", "per_sm", "stages")}},
}


# starting points measured before the coordinate search (it keeps the fastest): tiles of 4 elements per thread, where
# the fp32 and bf16 tiles share one register layout (no shared-memory layout conversions in the loop; the sm_90
# build of the 2048 / 4-warp backward has 27 barriers, the 512 / 4-warp one 8)
SEEDS = {
    "add_ln_fwd": [dict(tile=512, warps=4), dict(tile=1024, warps=8)],
    "add_ln_bwd": [dict(tile=512, warps=4, per_sm=8, stages=2, cb=8),
                   dict(tile=512, warps=4, per_sm=8, stages=2, cb=8, joint=True),
                   dict(tile=512, warps=4, per_sm=12, stages=1, cb=8),
                   dict(tile=1024, warps=8, per_sm=4, stages=2, cb=8)],
    # the fitted erfcx: 26.5 instead of 39.5 instructions per element forward, 32.8 instead of 52.6 per element and
    # loop step backward (sm_90 builds; kernels/bias_gelu.py)
    "gelu_fwd": [dict(rows=8, cols=128, warps=4), dict(rows=16, cols=256, warps=8), dict(cdf="erfcx"),
                 dict(cdf="erfcx", rows=16, cols=256, warps=8)],
    "gelu_bwd": [dict(rows=8, cols=128, warps=4, per_sm=8, acc2d=True),
                 dict(rows=8, cols=128, warps=4, per_sm=8, acc2d=True, stages=1),
                 dict(rows=16, cols=128, warps=8, per_sm=4, acc2d=True), dict(cdf="erfcx")],
    # per element slot statistics and sums, the loops peeled (the sm_90 builds: statistics 573 -> 253 instructions
    # and 17 -> 4 barriers per loop step, backward sums 629 -> 362 and 9 -> 5; kernels/NOTES.md)
    "bn_fwd": [dict(acc2d=True, peel=True), dict(acc2d=True, peel=True, stats_per_sm=8, stats_elems=4096)],
    "bn_bwd": [dict(acc2d=True, peel=True), dict(acc2d=True, peel=True, sums_per_sm=8, sums_elems=4096)],
    "conv1_wgrad": [dict(block_x=64, warps=4, per_sm=2, stages=2), dict(block_x=64, warps=8, per_sm=2, stages=3)],
}


def _set(kind, key, value):
    target, _ = SPACES[kind]
    if kind in FIELDS:
        d, k = FIELDS[kind][key]
        d[k] = value
    elif kind == "add_ln_bwd":
        bwd, sums = target
        if key in ("cb", "block_p"):
            sums[key] = value
        elif key in ("sum_warps", "sum_stages"):
            sums[key[4:]] = value
        else:
            bwd[key] = value
    else:
        target[key] = value


def _get(kind):
    target, _ = SPACES[kind]
    if kind in FIELDS:
        return {p: d[k] for p, (d, k) in FIELDS[kind].items()}
    if kind == "add_ln_bwd":
        bwd, sums = target
        return {**bwd, "cb": sums["cb"], "block_p": sums["block_p"], "sum_warps": sums["warps"],
                "sum_stages": sums.get("stages", 1)}
    return dict(target)


DEVICE = "cuda"  # the CPU test runs the sweep's logic interpreted, with a stand-in timer


def _inputs(kind, M, C, N, gen):
    dev = DEVICE
    r = lambda *s, dt=torch.bfloat16: torch.randn(*s, generator=gen, device=dev).to(dt)  # noqa: E731
    B = M // 197
    if kind == "conv1_wgrad":
        Bc, ci, hp, wp, k = CONV1
        cl = torch.channels_last
        return dict(x=r(Bc, ci, hp, wp).contiguous(memory_format=cl),
                    dy=r(Bc, 64, hp - k + 1, wp - k + 1).contiguous(memory_format=cl), k=k)
    if kind.startswith("bn_"):
        x = r(*STEM).contiguous(memory_format=torch.channels_last) * 2 + 0.5
        C = STEM[1]
        u = lambda: torch.rand(C, generator=gen, device=dev)  # noqa: E731
        return dict(x=x, w=u() + 0.5, b=u() - 0.5, rm=torch.zeros(C, device=dev), rv=torch.ones(C, device=dev),
                    dout=r(*STEM).contiguous(memory_format=torch.channels_last))
    if kind.startswith("add_ln"):
        return dict(x=r(B, 197, C, dt=torch.float32), br=r(B, 197, C), bb=r(C), s=torch.rand(B, device=dev) + 0.5,
                    w=r(C, dt=torch.float32) * 0.2 + 1, b=r(C, dt=torch.float32) * 0.2,
                    dy=r(B, 197, C, dt=torch.float32), dn=r(B, 197, C))
    return dict(h=r(B, 197, N), bias=r(N) * 0.5, dg=r(B, 197, N))


def _runner(kind, t):
    """(call, bytes moved, the outputs to check against _reference)."""
    if kind == "conv1_wgrad":
        call = lambda: cw.conv_weight_grad(t["dy"], t["x"], t["k"], t["k"])  # noqa: E731
        return call, (t["dy"].numel() + t["x"].numel()) * 2, lambda: (call(),)
    if kind == "bn_fwd":
        call = lambda: bn.bn_relu_forward(t["x"], t["w"], t["b"], t["rm"], t["rv"], 0.1, 1e-5)  # noqa: E731
        return call, t["x"].numel() * 2 * 3, call  # statistics: one read; apply: a read and a write (bf16)
    if kind == "bn_bwd":
        _, mean, invstd = bn.bn_relu_forward(t["x"], t["w"], t["b"], None, None, 0.1, 1e-5)
        call = lambda: bn.bn_relu_backward(t["dout"], t["x"], t["w"], t["b"], mean, invstd)  # noqa: E731
        return call, t["x"].numel() * 2 * 5, call  # sums: two reads; apply: two reads and a write
    if kind == "add_ln_fwd":
        call = lambda: aln.add_ln_forward(t["x"], t["br"], t["bb"], t["s"], 1.0, t["w"], t["b"], 1e-6,  # noqa: E731
                                          torch.bfloat16)
        n = t["x"].numel()
        return call, n * (4 + 2 + 4 + 2), lambda: call()[:2]
    if kind == "add_ln_bwd":
        y, _, mean, rstd = aln.add_ln_forward(t["x"], t["br"], t["bb"], t["s"], 1.0, t["w"], t["b"], 1e-6,
                                              torch.bfloat16)
        t.update(y=y, mean=mean, rstd=rstd)
        call = lambda: aln.add_ln_backward(t["dy"], t["dn"], y, t["w"], mean, rstd, t["s"], 1.0,  # noqa: E731
                                           torch.bfloat16, torch.bfloat16)
        n = y.numel()
        return call, n * (4 + 2 + 4 + 4 + 2), call
    if kind == "gelu_fwd":
        call = lambda: bg.bias_gelu_forward(t["h"], t["bias"])  # noqa: E731
        return call, t["h"].numel() * 4, lambda: (call(),)
    call = lambda: bg.bias_gelu_backward(t["dg"], t["h"], t["bias"])  # noqa: E731
    return call, t["h"].numel() * 6, call


def _reference(kind, t):
    """The same op by torch in fp32 (autograd for the backward), cast as the kernels return it."""
    f = torch.float32
    if kind == "conv1_wgrad":
        k, x, dy = t["k"], t["x"].float(), t["dy"].float()
        return (torch.nn.grad.conv2d_weight(x, (dy.shape[1], x.shape[1], k, k), dy),)
    if kind.startswith("bn_"):
        x = t["x"].float().requires_grad_()
        w, b = t["w"].clone().requires_grad_(), t["b"].clone().requires_grad_()
        mean = x.mean((0, 2, 3))
        var = x.var((0, 2, 3), unbiased=False)
        invstd = torch.rsqrt(var + 1e-5)
        out = torch.relu(torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.1, 1e-5))
        if kind == "bn_fwd":
            return out.detach(), mean.detach(), invstd.detach()
        out.backward(t["dout"].float())
        return x.grad, w.grad, b.grad
    if kind.startswith("add_ln"):
        x = t["x"].clone().requires_grad_()
        br = t["br"].float().requires_grad_()
        bb = t["bb"].float().requires_grad_()
        w, b = t["w"].clone().requires_grad_(), t["b"].clone().requires_grad_()
        y = x + (br + bb) * t["s"][:, None, None]
        n = torch.nn.functional.layer_norm(y, (y.shape[-1],), w, b, 1e-6)
        if kind == "add_ln_fwd":
            return y.detach(), n.detach()
        torch.autograd.backward([y, n], [t["dy"], t["dn"].to(f)])
        return x.grad, br.grad, w.grad, b.grad, bb.grad
    h = t["h"].float().requires_grad_()
    bias = t["bias"].float().requires_grad_()
    g = torch.nn.functional.gelu(h + bias)
    if kind == "gelu_fwd":
        return (g.detach(),)
    g.backward(t["dg"].float())
    return h.grad, bias.grad


def _agrees(outs, refs):
    for o, r in zip(outs, refs):
        o, r = o.float(), r.float()
        if not torch.isfinite(o).all():
            return False
        if (o - r).abs().max() > 2e-2 * r.abs().max() + 1e-3:
            return False
    return True


def sweep(kind, M, C, N, passes, writer, gen, deadline=float("inf")):
    t = _inputs(kind, M, C, N, gen)
    call, nbytes, check = _runner(kind, t)
    refs = _reference(kind, t)
    seen = {}

    def measure():
        cfg = _get(kind)
        key = json.dumps(cfg, sort_keys=True)
        if key in seen:
            return seen[key]
        if time.time() > deadline:  # out of time: the best so far stands
            return float("inf")
        try:
            ok = _agrees(check(), refs)
            # in a CUDA graph, as the compiled step runs them: the GPU time alone, not the launches' host time
            ms = triton.testing.do_bench_cudagraph(call, rep=30, return_mode="median") if ok else float("inf")
            err = "" if ok else "disagrees with torch"
        except Exception as e:  # out of resources, a shape the tiling cannot take: recorded, not chosen
            ms, err = float("inf"), f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        seen[key] = ms
        gbs = nbytes / (ms * 1e-3) / 1e9 if ms != float("inf") else 0.0
        writer.writerow([kind, M, C, N, key, f"{ms * 1e3:.2f}", f"{gbs:.0f}", err])
        print(f"{kind:11s} {key:120s} {ms * 1e3:9.2f} us {gbs:6.0f} GB/s {err}", flush=True)
        return ms

    if kind == "conv1_wgrad":  # what the kernel replaces: cuDNN's weight gradient of the same conv, timed alike
        w = (t["dy"].shape[1], t["x"].shape[1], t["k"], t["k"])
        cudnn = lambda: torch.nn.grad.conv2d_weight(t["x"], w, t["dy"])  # noqa: E731
        ms = triton.testing.do_bench_cudagraph(cudnn, rep=30, return_mode="median")
        tag = f"cuDNN (benchmark {'on' if torch.backends.cudnn.benchmark else 'off'})"
        writer.writerow([kind, M, C, N, tag, f"{ms * 1e3:.2f}", f"{nbytes / (ms * 1e-3) / 1e9:.0f}", ""])
        print(f"{kind:11s} {tag:120s} {ms * 1e3:9.2f} us", flush=True)
    _, space = SPACES[kind]
    best = measure()
    start = dict(_get(kind))
    best_cfg = dict(start)
    for seed in SEEDS.get(kind, []):
        for k, v in {**start, **seed}.items():
            _set(kind, k, v)
        ms = measure()
        if ms < best:
            best, best_cfg = ms, dict(_get(kind))
    for k, v in best_cfg.items():
        _set(kind, k, v)
    for _ in range(passes if kind.endswith("bwd") else 1):
        for param, values in space.items():
            chosen = _get(kind)[param]
            for v in values:
                _set(kind, param, v)
                ms = measure()
                if ms < best * 0.99:  # a change must beat the best by 1% (do_bench's noise) to be taken
                    best, chosen = ms, v
            _set(kind, param, chosen)
    print(f"{kind}: start {json.dumps(start)} -> best {json.dumps(_get(kind))} {best * 1e3:.2f} us", flush=True)
    return _get(kind), best


def apply_best(path, rest, cudnn_benchmark=True):
    """Set the kernels' tilings to ``path``'s (a best.json of this script: {kind: {"config": {...}, "us": ...}}),
    kinds whose sweep measured nothing (us inf) left as they are; then run ``rest`` as a tokenlabel command."""
    try:
        with open(path) as fh:
            best = json.load(fh)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--apply {path}: {e}") from None
    applied = []
    for kind, entry in best.items():
        if kind not in SPACES or not isinstance(entry, dict):
            continue  # the header fields (gpu, torch, date, ...)
        if not isinstance(entry.get("config"), dict) or not entry.get("us", float("inf")) < float("inf"):
            continue
        unknown = set(entry["config"]) - set(_get(kind))
        if unknown:
            raise SystemExit(f"--apply {path}: {kind} has keys this version does not know: {sorted(unknown)}")
        for k, v in entry["config"].items():
            _set(kind, k, v)
        applied.append(kind)
    print(f"applied the tilings of {path} ({best.get('gpu', '?')}, {best.get('date', '?')}): "
          f"{', '.join(applied) or 'none'}", flush=True)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    if rest:
        from tokenlabel.cli import main as cli

        return cli(rest)
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder for sweep.csv and best.json (required unless --apply)")
    ap.add_argument("--apply", metavar="BEST_JSON",
                    help="sweep nothing: set the tilings of an earlier run's best.json, then run the command after --")
    ap.add_argument("--model", choices=sorted(SHAPES), default="s")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--kinds", default=",".join(SPACES))
    ap.add_argument("--cudnn-benchmark", choices=("on", "off"), default="on",
                    help="torch.backends.cudnn.benchmark for the whole process (conv1_wgrad's cuDNN line and any "
                         "command after --)")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="seconds for the whole sweep, shared evenly by the kinds; what is left unmeasured is skipped")
    args = ap.parse_args(argv)
    if args.apply:
        return apply_best(args.apply, rest, args.cudnn_benchmark == "on")
    if not args.out:
        ap.error("--out is required (or --apply an earlier run's best.json)")
    if not torch.cuda.is_available():
        raise SystemExit("sweep_rowkernels: needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
    M, C, N = SHAPES[args.model]
    gen = torch.Generator(device="cuda").manual_seed(0)
    best = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "shape": dict(M=M, C=C, N=N)}
    with open(os.path.join(args.out, "sweep.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["kind", "M", "C", "N", "config", "us", "GB/s", "error"])
        kinds = args.kinds.split(",")
        t0 = time.time()
        for i, kind in enumerate(kinds):
            share = (args.budget_s - (time.time() - t0)) / (len(kinds) - i)
            cfg, ms = sweep(kind, M, C, N, args.passes, w, gen, deadline=time.time() + share)
            best[kind] = dict(config=cfg, us=round(ms * 1e3, 2))
            fh.flush()
    with open(os.path.join(args.out, "best.json"), "w") as fh:
        json.dump(best, fh, indent=1)
    if rest:
        from tokenlabel.cli import main as cli
        print("running with the best tilings:", " ".join(rest), flush=True)
        return cli(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
