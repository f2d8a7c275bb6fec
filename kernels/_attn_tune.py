"""Tile configurations of the flash attention kernels: resources on the CPU, times on the GPU.

    python -m tokenlabel.kernels._attn_tune resources [--shape S224] [--dtype bf16]   # no GPU needed
    python -m tokenlabel.kernels._attn_tune time [--shape S224] [--out DIR]           # on the GPU

``resources`` compiles every candidate (BLOCK_M, BLOCK_N, num_warps, num_stages, tail) for sm_90 ahead of time with
Triton's bundled ptxas, with the alignment hints a real launch gets (16-byte-aligned pointers, strides that are
multiples of 16), and prints registers per thread, spilled bytes (stack), shared memory and whether the key loop
was software-pipelined (cp.async copies in the TTGIR). A config that spills or is not pipelined is not worth a
GPU minute. ``time`` launches a narrower set on the GPU (forward, and backward alone; CUDA-event medians of a
CUDA graph of 20 calls), each checked first (the forward against SDPA, the backward against the default config),
registers and spills as the driver reports them, and prints them beside SDPA's forward and forward+backward on
the same qkv tensor (the model's path, the stack of dq, dk, dv into the qkv gradient included).

Kinds: ``fwd``; the backwards ``bwd`` ("split", both program kinds in one launch), ``bwd_head`` ("head"), and
``bwd_dq`` / ``bwd_dkdv``, the two launches of "split2" (its time is the sum of the two; ``time`` ends with a
``best`` row per kind and one for split2); ``bwd_tma_dq`` / ``bwd_tma_dkdv``, the two persistent TMA launches of
"tma" (configs are flash_attention.TMA_BWD dicts; the dk dv launch reads the row sums the dq launch wrote, so its
rows run the default dq launch once first; a ``best`` row for their sum too).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys

import torch

from . import flash_attention as fa
from ._common import aot_sm90 as _aot

SHAPES = {"S224": (128, 197, 6, 64), "M224": (128, 197, 8, 64), "S384": (128, 577, 6, 64),
          "M384": (128, 577, 8, 64), "T224": (128, 197, 4, 60), "tiny": (2, 20, 2, 16)}  # tiny: CPU tests
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


KINDS = ("fwd", "bwd", "bwd_head", "bwd_dq", "bwd_dkdv", "fwd_tma", "bwd_tma_dq", "bwd_tma_dkdv")
TMA_KINDS = {"fwd_tma": "fwd", "bwd_tma_dq": "dq", "bwd_tma_dkdv": "dkdv"}
# "tma" tilings as (rows of the kernel's own blocks, rows of the loop's steps, warps, stages, programs per SM, ws):
# the default first, then those whose sm_90 builds (fifteenth session, S224 bf16) have no spills; ws=True is tried
# for the forward at 64 rows only (Triton 3.6's pass fails on the dq kernel and on 128-row forward blocks, and its
# warp-specialised dk dv kernel left rows unwritten on an H100, 2026-12-05)
TMA_TILINGS = [(64, 64, 4, 2, 1, True), (128, 64, 4, 2, 1, True), (64, 64, 4, 3, 2, False), (64, 32, 4, 2, 3, False),
               (128, 64, 8, 2, 1, False), (128, 32, 4, 2, 1, True), (64, 32, 4, 3, 1, True), (64, 64, 4, 3, 1, True),
               (64, 64, 4, 2, 1, False), (64, 64, 4, 2, 3, False)]


def _tma_default(kind):
    return dict(fa.TMA_FWD) if kind == "fwd_tma" else dict(fa.TMA_BWD[TMA_KINDS[kind]])


def tma_candidates(kind):
    """TMA_FWD's / TMA_BWD's config for the kind, then TMA_TILINGS (as their dicts)."""
    own_kind = TMA_KINDS[kind]
    out = [_tma_default(kind)]
    for own, step, warps, stages, per_sm, ws in TMA_TILINGS:
        bm, bn = (step, own) if own_kind == "dkdv" else (own, step)
        cfg = dict(bm=bm, bn=bn, warps=warps, stages=stages, per_sm=per_sm, ws=ws)
        try:
            fa._check_ws(cfg, "forward" if own_kind == "fwd" else f"backward {own_kind}")
        except ValueError:
            continue  # Triton 3.6's pass does not build it, or builds it wrong
        if cfg not in out:
            out.append(cfg)
    return out


def candidates(dtype):
    for bm, bn, warps, stages, tail in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3),
                                                         fa.TAILS):
        if bm * bn > 128 * 64 or (dtype == torch.float32 and bm * bn > 64 * 32):
            continue
        yield bm, bn, warps, stages, tail


def _tensors(B, N, H, D, dtype, device):
    qkv = torch.empty(B, N, 3, H, D, device=device, dtype=dtype)
    q, k, v = qkv.unbind(2)
    o = torch.empty(B, N, H, D, device=device, dtype=dtype)
    lse = torch.empty(B, H, N, device=device, dtype=torch.float32)
    dqkv = torch.empty_like(qkv)
    return qkv, (q, k, v), o, lse, dqkv


def _launch(kind, q, k, v, o, lse, do, dqkv, D, cfg, sms=None):
    if kind == "fwd_tma":
        return fa.tma_fwd_launch(q, k, v, o, lse, D ** -0.5, cfg, sms)
    if kind in TMA_KINDS:  # the dq launch, or the dk dv launch (whose row sums the dq launch of the pair writes)
        launches = fa.tma_bwd_launches(do, q, k, v, o, lse, *dqkv.unbind(2), D ** -0.5, {TMA_KINDS[kind]: cfg}, sms)
        return launches[0] if kind == "bwd_tma_dq" else launches
    if kind == "fwd":
        return fa.fwd_launch(q, k, v, o, lse, D ** -0.5, cfg)
    if kind == "bwd_head":
        return fa.bwd_launch(do, q, k, v, o, lse, *dqkv.unbind(2), D ** -0.5, cfg, "head", fa.bwd_scratch(q))
    split_kind = {"bwd": "split", "bwd_dq": "dq", "bwd_dkdv": "dkdv"}[kind]
    return fa.bwd_launch(do, q, k, v, o, lse, *dqkv.unbind(2), D ** -0.5, cfg, "split", kind=split_kind)


def resources(shape, dtype, defaults_only=False):
    B, N, H, D = SHAPES[shape]
    _, (q, k, v), o, lse, dqkv = _tensors(B, N, H, D, dtype, "meta")
    rows = []
    for kind in KINDS:
        tma = kind in TMA_KINDS
        if tma and dtype == torch.float32:
            continue  # "tma" is for half precision ("split" runs for fp32)
        default = _tma_default(kind) if tma else fa._unpack(fa._config(D, kind, dtype))
        configs = tma_candidates(kind) if tma else candidates(dtype)
        for cfg in [default] if defaults_only else configs:
            try:
                launch = _launch(kind, q, k, v, o, lse, o, dqkv, D, cfg, sms=132)
                if kind == "bwd_tma_dkdv":
                    launch = launch[1]
                regs, stack, smem, copies = _aot(launch)
            except Exception as e:  # noqa: BLE001 (a config the compiler refuses is a result too)
                rows.append(dict(kind=kind, config=cfg, error=f"{type(e).__name__}: {str(e)[:100]}"))
                continue
            if tma:  # TMA loads instead of cp.async copies
                from ._common import compile_sm90

                copies = compile_sm90(launch).asm["ttgir"].count("async_tma_copy_global_to_local")
            rows.append(dict(kind=kind, config=str(cfg).replace(" ", "") if tma else cfg, regs=regs, stack=stack,
                             smem=smem, async_copies=copies, default=(cfg == default) if tma else
                             fa._unpack(cfg) == default))
    return rows


def _graph_ms(fn, reps=20, iters=5):
    """Median ms per call of ``fn`` replayed from a CUDA graph of ``reps`` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    return sorted(times)[len(times) // 2]


# Tried first after the default, per kind (a run cut short has these): the sm_90 builds' picks at S/224 bf16,
# spill-free, all-wgmma where the program's own block is >= 64 rows (pad / fold tails), or the fewest registers.
FIRST = {
    "fwd": [(64, 64, 4, 2, "pad"), (64, 64, 8, 2, "pad"), (128, 64, 8, 2, "pad"), (128, 64, 8, 2, "pow2"),
            (64, 64, 4, 2, "fold"), (128, 32, 8, 2, "pad"), (64, 128, 8, 2, "pad")],
    "bwd": [(64, 64, 4, 2, "pad"), (64, 64, 8, 2, "pad"), (64, 64, 4, 2, "fold")],
    "bwd_head": [(32, 64, 4, 2, "pad"), (64, 64, 8, 1, "pad")],
    "bwd_dq": [(64, 64, 4, 2, "pad"), (64, 64, 8, 2, "pad"), (128, 64, 8, 2, "pad"), (64, 64, 4, 2, "fold"),
               (128, 32, 8, 2, "pad"), (64, 32, 4, 2, "pad"), (64, 64, 4, 3, "pad")],
    "bwd_dkdv": [(32, 64, 4, 2, "pad"), (64, 64, 8, 2, "pad"), (32, 64, 8, 2, "fold"), (64, 64, 8, 1, "pad"),
                 (32, 128, 8, 2, "pad"), (64, 32, 8, 2, "pad"), (64, 64, 4, 1, "pad"), (128, 64, 8, 1, "pad")],
}


def time_candidates(kind):
    """The configs ``time`` tries, the default first, then FIRST's, then the rest: 64- and 128-row forward tiles,
    backward tiles up to 64 rows (up to 128 in the program's own dimension for split2's two kernels, where the
    other kind's registers no longer count), each with every tail (flash_attention.TAILS)."""
    seen = set()
    default = fa._unpack(fa._config(64, kind, torch.bfloat16))
    for cfg in [default] + FIRST.get(kind, []):
        if cfg not in seen:
            seen.add(cfg)
            yield cfg
    for bm, bn, warps, stages, tail in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3),
                                                         fa.TAILS):
        cfg = (bm, bn, warps, stages, tail)
        if cfg in seen or bm * bn > 128 * 64:
            continue
        own = {"bwd_dq": bm, "bwd_dkdv": bn}.get(kind)
        if kind == "fwd":
            ok = bm >= 64 and stages >= 2
        elif own is not None:
            ok = stages <= 2 and max(bm, bn) <= 128 and (bm <= 64 or own == bm) and (bn <= 64 or own == bn)
        else:
            ok = bm <= 64 and bn <= 64 and stages <= 2
        if ok:
            seen.add(cfg)
            yield cfg


def time_configs(shape, dtype, device="cuda", kinds=KINDS, limit=None):
    """Every time_candidates config on the GPU (spilling ones reported, not timed), beside SDPA: rows, yielded as
    they are measured (a run cut short by a time limit has printed what it measured)."""
    from tokenlabel.models.attention import attention_qkv

    B, N, H, D = SHAPES[shape]
    g = torch.Generator(device=device).manual_seed(0)
    qkv5 = torch.randn(B, N, 3, H, D, device=device, dtype=dtype, generator=g)
    q, k, v = qkv5.unbind(2)
    do = torch.randn(B, N, H, D, device=device, dtype=dtype, generator=g)
    qkv = qkv5.view(B, N, 3 * H * D).requires_grad_()
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    def sdpa_step():
        torch.autograd.grad(attention_qkv(qkv, H, "sdpa"), qkv, do.view(B, N, H * D))

    yield dict(kind="sdpa", config="fwd", ms=_graph_ms(lambda: attention_qkv(qkv.detach(), H, "sdpa")))
    yield dict(kind="sdpa", config="fwd+bwd (incl. the stack into the qkv gradient)", ms=_graph_ms(sdpa_step))
    o, lse = fa.attention_forward(q, k, v, D ** -0.5)
    want_bwd = fa.attention_backward(do, q, k, v, o, lse, D ** -0.5, impl="split")
    dqkv = torch.empty_like(want_bwd)
    # which of q, k, v a kind's launch writes
    parts = {"bwd_dq": slice(0, 1), "bwd_dkdv": slice(1, 3), "bwd_tma_dq": slice(0, 1), "bwd_tma_dkdv": slice(1, 3)}
    best = {}
    for kind in kinds:
        tma = kind in TMA_KINDS
        if tma and dtype == torch.float32:
            continue
        default = _tma_default(kind) if tma else fa._unpack(fa._config(D, kind, dtype))
        for cfg in itertools.islice(tma_candidates(kind) if tma else time_candidates(kind), limit):
            try:
                if kind in ("fwd", "fwd_tma"):
                    got = torch.full_like(o, float("nan"))
                    launch = _launch(kind, q, k, v, got, torch.empty_like(lse), do, dqkv, D, cfg)
                else:
                    dqkv.fill_(float("nan"))  # what a launch does not write fails the check
                    got = dqkv[:, :, parts.get(kind, slice(0, 3))]
                    launch = _launch(kind, q, k, v, o, lse, do, dqkv, D, cfg)
                if kind == "bwd_tma_dkdv":  # the dq launch of the pair writes the row sums it reads
                    fa._ensure_allocator()
                    fa._run(launch[0])
                    launch = launch[1]
                elif tma:
                    fa._ensure_allocator()
                kernel, grid, args, const, opts = launch
                compiled = kernel[grid](*args, **const, **opts)
                if got.is_cuda:
                    torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 (out of shared memory, ...: a result too)
                yield dict(kind=kind, config=cfg, error=f"{type(e).__name__}: {str(e)[:100]}")
                continue
            row = dict(kind=kind, config=str(cfg).replace(" ", "") if tma else cfg,
                       regs=getattr(compiled, "n_regs", None), spills=getattr(compiled, "n_spills", None),
                       default=(cfg == default) if tma else fa._unpack(cfg) == default)
            want = ref if kind in ("fwd", "fwd_tma") else want_bwd[:, :, parts.get(kind, slice(0, 3))]
            row["max_abs_err"] = float((got.float() - want.float()).abs().nan_to_num(float("inf")).max())
            if not row["spills"]:
                row["ms"] = _graph_ms(lambda: kernel[grid](*args, **const, **opts))
                tol = 1e-5 if dtype == torch.float32 else 0.05 * float(want.float().abs().max())
                if row["max_abs_err"] <= tol and row["ms"] < best.get(kind, (None, float("inf")))[1]:
                    best[kind] = (row["config"], row["ms"])
            yield row
    for kind, (cfg, ms) in best.items():
        yield dict(kind="best", config=f"{kind} {cfg}", ms=ms)
    if "bwd_dq" in best and "bwd_dkdv" in best:
        yield dict(kind="best", config=f"split2 {best['bwd_dq'][0]} + {best['bwd_dkdv'][0]}",
                   ms=best["bwd_dq"][1] + best["bwd_dkdv"][1])
    if "bwd_tma_dq" in best and "bwd_tma_dkdv" in best:  # the tma backward's two launches
        yield dict(kind="best", config=f"tma {best['bwd_tma_dq'][0]} + {best['bwd_tma_dkdv'][0]}",
                   ms=best["bwd_tma_dq"][1] + best["bwd_tma_dkdv"][1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("resources", "time"))
    ap.add_argument("--shape", default="S224", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--out", help="folder for attn_tune_<shape>_<dtype>_<what>.csv")
    ap.add_argument("--defaults-only", action="store_true", help="only the configs the launchers use")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"time: which kernels (of {', '.join(KINDS)})")
    ap.add_argument("--limit", type=int, help="time: at most this many configs per kind (the default and FIRST's "
                                                "come first)")
    a = ap.parse_args(argv)
    kinds = [k for k in a.kinds.split(",") if k]
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        ap.error(f"unknown kinds {bad}; valid: {', '.join(KINDS)}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile kernels", file=sys.stderr)
        return 2
    dtype = DTYPES[a.dtype]
    if a.what == "time":
        if not torch.cuda.is_available():
            print("time needs a CUDA GPU", file=sys.stderr)
            return 2
        measured = time_configs(a.shape, dtype, kinds=kinds, limit=a.limit)
    else:
        measured = resources(a.shape, dtype, a.defaults_only)
    rows = []
    for r in measured:
        rows.append(r)
        print(" ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, f"attn_tune_{a.shape}_{a.dtype}_{a.what}.csv")
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
