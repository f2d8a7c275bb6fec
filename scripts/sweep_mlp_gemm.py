"""Time the tilings of kernels/linear_gelu.py's two GEMMs on the GPU at LV-ViT's MLP shape beside what they replace
(cuBLAS's GEMM followed by kernels/bias_gelu.py's kernel), each candidate checked first against the float32 torch
computation of the same op, each timed by triton.testing.do_bench_cudagraph (median; replayed in a CUDA graph as the
compiled step runs them).

    python scripts/sweep_mlp_gemm.py --out DIR [--model s|m] [--limit N]

``--kinds gemm`` times the same loop with a plain epilogue against cuBLAS's GEMM alone. Writes DIR/sweep.csv (every
candidate, us) and DIR/best.json (the fastest tiling per kernel, to copy into linear_gelu.FWD / BWD), and prints the
replaced pair's time beside the best of each.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing

from tokenlabel.kernels import bias_gelu as bg
from tokenlabel.kernels import linear_gelu as lg

SHAPES = {"s": (128 * 197, 384, 1152), "m": (128 * 197, 512, 1536)}  # (rows M, width C, hidden N) at 224, B 128


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the usual Hopper GEMM tilings for a short K (384 / 64 = 6 steps),
# most plausible first so that --limit keeps those
TILINGS = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 3),
           (64, 128, 64, 4, 3), (128, 128, 32, 8, 4), (128, 256, 32, 8, 4), (64, 256, 64, 8, 3),
           (128, 128, 64, 8, 2), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
           (64, 64, 64, 4, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 256, 64, 8, 2),
           (256, 128, 64, 8, 3), (64, 256, 32, 8, 4), (128, 128, 32, 4, 4), (64, 64, 32, 4, 4)]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, programs per SM) for impl="tma" (persistent programs): tilings whose
# sm_90 builds fit per_sm programs per SM in registers and shared memory (the 128 x 128 x 64 build: 178 registers
# at 8 warps, 96 KB shared: one per SM; 64 x 128 x 64 at 4 warps: 164 registers, 72 KB: two or three)
TILINGS_TMA = [(64, 128, 64, 4, 3, 2), (128, 128, 64, 8, 3, 1), (128, 64, 64, 4, 3, 2), (64, 128, 64, 4, 4, 2),
               (128, 128, 64, 8, 4, 1), (64, 128, 64, 4, 3, 3), (128, 256, 64, 8, 3, 1), (64, 256, 64, 8, 3, 1),
               (128, 128, 32, 8, 4, 1), (64, 64, 64, 4, 3, 3), (128, 64, 64, 4, 4, 2), (64, 128, 32, 4, 4, 3)]


# ... and for "tma_ws" (the TMA kernel warp-specialised: 4 warps per warp group, one program per SM; tilings that
# linear_gelu.check_tiling accepts and that build for sm_90 with Triton 3.6, checked on the CPU box; the backward
# refuses those with 128-row tiles, which the sweep reports as not building)
TILINGS_WS = [(64, 128, 64, 4, 3, 1), (64, 128, 64, 4, 4, 1), (128, 128, 64, 4, 3, 1), (64, 64, 64, 4, 3, 1),
              (128, 128, 64, 4, 4, 1), (64, 128, 32, 4, 4, 1), (128, 64, 64, 4, 3, 1), (64, 128, 128, 4, 2, 1),
              (64, 128, 64, 4, 2, 1), (64, 128, 64, 4, 3, 2)]


def candidates(limit: int, impl: str = "ptr"):
    """The default tiling first ("ptr"), then TILINGS (or TILINGS_TMA, TILINGS_WS) in order."""
    out = [dict(lg.FWD, impl=impl, flatten=False, ws=False)] if impl == "ptr" else []
    if impl == "ptr":  # per_sm and flatten: TMA only
        tilings = [(*t, lg.FWD["per_sm"], False) for t in TILINGS]
    elif impl == "tma_ws":
        tilings = [(*t, False) for t in TILINGS_WS]
    else:  # each TMA tiling plain, and the first six also with the tile loop flattened into the K loop
        tilings = [(*t, f) for i, t in enumerate(TILINGS_TMA) for f in ((False, True) if i < 6 else (False,))]
    for bm, bn, bk, warps, stages, per_sm, flatten in tilings:
        c = dict(bm=bm, bn=bn, bk=bk, warps=warps, stages=stages, group=8, cdf=lg.FWD["cdf"],
                 impl="tma" if impl == "tma_ws" else impl, per_sm=per_sm, flatten=flatten, ws=impl == "tma_ws")
        if c not in out:
            out.append(c)
    return out[:limit]


@triton.jit
def _mm_plain(A, B, C, M, N, stride_bk, stride_bn, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, GROUP: tl.constexpr, STAGES: tl.constexpr):
    """linear_gelu._mm_gelu's loop and launch order with a plain epilogue (the accumulator stored in C's dtype): how
    far the GEMM itself is from cuBLAS's, apart from what the GELU epilogues cost (the "gemm" rows)."""
    pid_m, pid_n = lg.tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptr = A + rows.to(tl.int64)[:, None] * K + rk[None, :]
    b_ptr = B + rk[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        acc = tl.dot(tl.load(a_ptr, mask=(rows < M)[:, None], other=0.0),
                     tl.load(b_ptr, mask=(cols < N)[None, :], other=0.0), acc)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K * stride_bk
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(C + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _mm_plain_tma(A, B, C, M, N, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP: tl.constexpr, STAGES: tl.constexpr, PROGS: tl.constexpr,
                  PER: tl.constexpr, WS: tl.constexpr):
    """linear_gelu._mm_gelu_tma's schedule (persistent programs, TMA loads, WS: warp-specialised) with the plain
    epilogue: whether Triton's Hopper GEMM reaches cuBLAS's rate at this shape, before any epilogue (the "gemm"
    rows of impls tma / tma_ws)."""
    a_desc = tl.make_tensor_descriptor(A, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(B, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    n_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for i in tl.range(0, PER, warp_specialize=WS):
        pid_m, pid_n = lg.tile_ids(tl.minimum(tl.program_id(0) + i * PROGS, n_tiles - 1), M, N, BLOCK_M, BLOCK_N,
                                   GROUP)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            acc = tl.dot(a_desc.load([pid_m * BLOCK_M, k0]), b_desc.load([pid_n * BLOCK_N, k0]).T, acc)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(C + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(C.dtype.element_ty),
                 mask=(rows < M)[:, None] & (cols < N)[None, :])


def plain_gemm(x, w, cfg):
    """x [M, K] @ w [N, K]^T by _mm_plain (or, impl "tma", _mm_plain_tma) with the tiling ``cfg``."""
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if cfg.get("impl", "ptr") == "tma":
        lg._ensure_allocator()
        lg.check_tiling(cfg, backward=False)
        progs, per = lg._persistent_grid(triton.cdiv(M, cfg["bm"]) * triton.cdiv(N, cfg["bn"]),
                                         cfg["per_sm"] * lg.sm_count(x.device))
        _mm_plain_tma[(progs,)](x, w, out, M, N, K=K, BLOCK_M=cfg["bm"], BLOCK_N=cfg["bn"], BLOCK_K=cfg["bk"],
                                GROUP=cfg["group"], STAGES=cfg["stages"], PROGS=progs, PER=per, WS=cfg["ws"],
                                num_warps=cfg["warps"])
        return out
    grid = (triton.cdiv(M, cfg["bm"]) * triton.cdiv(N, cfg["bn"]),)
    _mm_plain[grid](x, w, out, M, N, w.stride(1), w.stride(0), K=K, BLOCK_M=cfg["bm"], BLOCK_N=cfg["bn"],
                    BLOCK_K=cfg["bk"], GROUP=cfg["group"], STAGES=cfg["stages"], num_warps=cfg["warps"])
    return out


def time_us(fn):
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", choices=sorted(SHAPES), default="s")
    ap.add_argument("--kinds", default="fwd,bwd,gemm",
                    help="fwd, bwd (the two kernels), gemm (their loop with a plain epilogue, against cuBLAS's fc1; "
                         "for every impl)")
    ap.add_argument("--impls", default="ptr,tma,tma_ws",
                    help="linear_gelu.IMPLS to sweep, and tma_ws (the TMA kernel warp-specialised)")
    ap.add_argument("--limit", type=int, default=len(TILINGS) + 1, help="at most this many tilings per kernel")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    M, C, N = SHAPES[a.model]
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, C, generator=g).to(dev, dt)
    w1 = (torch.randn(N, C, generator=g) * 2 / C ** 0.5).to(dev, dt)
    b1 = torch.randn(N, generator=g).to(dev)
    w2 = (torch.randn(C, N, generator=g) / N ** 0.5).to(dev, dt)
    dy = torch.randn(M, C, generator=g).to(dev, dt)
    # what the fused kernels replace, and their float32 answers
    h = F.linear(x, w1)
    base = {"gemm": time_us(lambda: F.linear(x, w1)),
            "fwd": time_us(lambda: bg.bias_gelu_forward(F.linear(x, w1), b1)),
            "bwd": time_us(lambda: bg.bias_gelu_backward(dy @ w2, h, b1))}
    parts = {"fwd gemm": time_us(lambda: F.linear(x, w1)), "fwd gelu": time_us(lambda: bg.bias_gelu_forward(h, b1)),
             "bwd gemm": time_us(lambda: dy @ w2), "bwd gelu": time_us(lambda: bg.bias_gelu_backward(dy @ w2, h, b1))}
    parts["bwd gelu"] -= parts["bwd gemm"]
    z32 = x.float() @ w1.float().t() + b1
    want_g = F.gelu(z32)
    zc = z32.to(dt).float().requires_grad_()
    want_dh, = torch.autograd.grad(F.gelu(zc), zc, dy.float() @ w2.float())
    rows, best = [], {}
    print(f"M {M} C {C} N {N}: cuBLAS + bias_gelu fwd {base['fwd']:.1f} us, bwd {base['bwd']:.1f} us; "
          + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()), flush=True)
    for kind, impl in [(k, i) for k in a.kinds.split(",") for i in a.impls.split(",")]:
        for cfg in candidates(a.limit, impl):
            if kind == "gemm" and cfg["flatten"]:
                continue  # the plain GEMM has no flattened form: the same kernel as the row before
            table = lg.FWD if kind == "fwd" else lg.BWD
            saved = dict(table)
            table.clear()
            table.update(cfg)
            try:
                if kind == "gemm":
                    out = plain_gemm(x, w1, cfg)
                    err = float((out.float() - (z32 - b1)).abs().max() / (z32 - b1).abs().max())
                    fn = lambda: plain_gemm(x, w1, cfg)  # noqa: E731
                elif kind == "fwd":
                    z, gg = lg.linear_gelu_forward(x, w1, b1)
                    err = max(float((z.float() - z32).abs().max() / z32.abs().max()),
                              float((gg.float() - want_g).abs().max() / want_g.abs().max()))
                    fn = lambda: lg.linear_gelu_forward(x, w1, b1)  # noqa: E731
                else:
                    zb = z32.to(dt)
                    dh, _ = lg.linear_gelu_backward(dy, w2, zb)
                    err = float((dh.float() - want_dh).abs().max() / want_dh.abs().max())
                    fn = lambda: lg.linear_gelu_backward(dy, w2, zb)  # noqa: E731
                us = time_us(fn) if err < 2e-2 else float("nan")
                status = "ok" if err < 2e-2 else f"wrong (rel err {err:.3g})"
            except Exception as e:  # noqa: BLE001 (a tiling that does not build is reported, not fatal)
                us, err, status = float("nan"), float("nan"), f"{type(e).__name__}: {str(e)[:120]}"
            finally:
                table.clear()
                table.update(saved)
            rows.append(dict(kind=kind, **cfg, us=us, err=err, status=status))
            print(f"{kind} {cfg} {us:.1f} us ({status})", flush=True)
            key = f"{kind} {impl}"
            if us == us and (key not in best or us < best[key]["us"]):
                best[key] = dict(cfg=cfg, us=us)
    with open(os.path.join(a.out, "sweep.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = dict(gpu=torch.cuda.get_device_name(), shape=dict(M=M, C=C, N=N), replaced=base, parts=parts, best=best)
    with open(os.path.join(a.out, "best.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for key in best:
        kind = key.split()[0]
        print(f"best {key}: {best[key]['us']:.1f} us against {base[kind]:.1f} us replaced ({best[key]['cfg']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
