"""BatchNorm (training, batch statistics) + ReLU for the LV-ViT stem's channels-last activations: Triton.

Why: in the H200 profile of the compiled LV-ViT-S step (models/NOTES.md) the stem's three BatchNorms take 1.96 ms,
and inductor's kernels for them run far from the memory bandwidth: its reductions over the [128 * 112 * 112, 64]
activations (205 MB in bf16) at 100-165 us where one read takes 43 us, its pointwise passes at 127-207 us where a
read and a write take 85 us. These kernels stream the channels-last memory ([M = B * H * W rows, C channels],
C contiguous) in row blocks, so every load is a run of whole 128-byte rows.

The math (per channel c, over the M = B * H * W values x of the batch)
======================================================================
Forward: mean = sum x / M, var = sum (x - mean)^2 / M (biased, for normalising), xhat = (x - mean) * invstd with
invstd = 1 / sqrt(var + eps), y = xhat * w + b, out = max(y, 0); running_mean += momentum * (mean - running_mean),
running_var += momentum * (var * M / (M - 1) - running_var) (unbiased), as nn.BatchNorm2d does.
Statistics: each program reduces its rows to (mean_p, M2_p) with a two-pass over each row block held in
registers, blocks combined with Chan's formula; the finalise step combines the programs' partials the same way,
so no sum of squares of large values is ever formed (cancellation-free, like PyTorch's Welford).
Backward, with g = dout * [y > 0] (the ReLU mask recomputed from x): db = sum g, dw = sum g * xhat,
dx = w * invstd * (g - db / M - xhat * dw / M).

Three launches each way: partial statistics, finalise (forward: one program; backward: ``sum_partials``, programs
over 32-channel slices), the pointwise pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, dispatch, sm_count
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rows(X, row0, offs_r, offs_c, M, C: tl.constexpr):
    """A [BLOCK_R, BLOCK_C] fp32 tile of rows row0.. (zeros past M and past C), and its mask (the statistics' count
    and deviations need it; the other kernels load through _tile)."""
    rows = row0 + offs_r
    mask = (rows[:, None] < M) & (offs_c[None, :] < C)
    ptrs = X + rows.to(tl.int64)[:, None] * C + offs_c[None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), mask


@triton.jit
def _channel(P, offs_c, C: tl.constexpr):
    """A per-channel vector as fp32 (zeros past C)."""
    return tl.load(P + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)


@triton.jit
def _mem_rows(rows, PK: tl.constexpr, HH: tl.constexpr, WW: tl.constexpr):
    """Where rows of the [B * HH * WW, C] activations sit in a tensor's memory: as they are (PK 0), or (PK > 0) in the
    patch layout [B * (HH / PK) * (WW / PK), PK * PK * C] of a PK x PK stride-PK conv's GEMM operand: pixel (b, y, x)
    in patch (b, y // PK, x // PK), at slot (y % PK, x % PK) of it. A row stays C contiguous values either way."""
    if PK == 0:
        return rows
    else:
        img = rows // (HH * WW)
        r = rows % (HH * WW)
        y = r // WW
        x = r % WW
        patch = (img * (HH // PK) + y // PK) * (WW // PK) + x // PK
        return patch * (PK * PK) + (y % PK) * PK + x % PK


@triton.jit
def _tile(P, row0, offs_r, offs_c, end, C: tl.constexpr, BLOCK_C: tl.constexpr, MASK: tl.constexpr,
          PK: tl.constexpr = 0, HH: tl.constexpr = 1, WW: tl.constexpr = 1):
    """The [BLOCK_R, BLOCK_C] fp32 tile of rows row0..: MASK, rows past ``end`` (and channels past C) are zeros; else
    every row is taken as inside (the peeled loops' full steps), only channels past C masked, if any. PK, HH, WW:
    where the rows sit in P's memory (_mem_rows)."""
    rows = row0 + offs_r
    ptrs = P + _mem_rows(rows, PK, HH, WW).to(tl.int64)[:, None] * C + offs_c[None, :]
    if MASK:
        return tl.load(ptrs, mask=(rows[:, None] < end) & (offs_c[None, :] < C), other=0.0).to(tl.float32)
    elif C < BLOCK_C:
        return tl.load(ptrs, mask=offs_c[None, :] < C, other=0.0).to(tl.float32)
    else:
        return tl.load(ptrs).to(tl.float32)


@triton.jit
def _put(P, row0, offs_r, offs_c, end, value, C: tl.constexpr, BLOCK_C: tl.constexpr, MASK: tl.constexpr,
         PK: tl.constexpr = 0, HH: tl.constexpr = 1, WW: tl.constexpr = 1):
    """Store a tile at rows row0.., with _tile's masking and row placement."""
    rows = row0 + offs_r
    ptrs = P + _mem_rows(rows, PK, HH, WW).to(tl.int64)[:, None] * C + offs_c[None, :]
    if MASK:
        tl.store(ptrs, value.to(P.dtype.element_ty), mask=(rows[:, None] < end) & (offs_c[None, :] < C))
    elif C < BLOCK_C:
        tl.store(ptrs, value.to(P.dtype.element_ty), mask=offs_c[None, :] < C)
    else:
        tl.store(ptrs, value.to(P.dtype.element_ty))


@triton.jit
def _welford_step(X, row0, offs_r, offs_c, end, n_r, mean2, m2_2, C: tl.constexpr, BLOCK_C: tl.constexpr,
                  MASK: tl.constexpr):
    """Fold one row block into the per-slot running (count, mean, M2); rows past ``end`` (MASK) leave them as
    they are (weight 0). Channels past C fold zeros, never read back."""
    x = _tile(X, row0, offs_r, offs_c, end, C, BLOCK_C, MASK)
    if MASK:
        valid = ((row0 + offs_r) < end).to(tl.float32)[:, None]
        n_r += valid
        wgt = valid / tl.maximum(n_r, 1.0)
        delta = x - mean2
        mean2 += delta * wgt
        m2_2 += delta * (x - mean2) * valid
    else:
        n_r += 1.0
        delta = x - mean2
        mean2 += delta * (1.0 / n_r)
        m2_2 += delta * (x - mean2)
    return n_r, mean2, m2_2


@triton.jit
def _relu_grad_step(DOUT, X, row0, offs_r, offs_c, end, mean, invstd, w, b, C: tl.constexpr, BLOCK_C: tl.constexpr,
                    MASK: tl.constexpr, PK: tl.constexpr, HH: tl.constexpr, WW: tl.constexpr):
    """(g = dout where y = xhat * w + b > 0, xhat) of one row block (zeros past ``end`` with MASK: dout loads 0);
    dout's rows placed by PK, HH, WW (_mem_rows)."""
    x = _tile(X, row0, offs_r, offs_c, end, C, BLOCK_C, MASK)
    dout = _tile(DOUT, row0, offs_r, offs_c, end, C, BLOCK_C, MASK, PK, HH, WW)
    xhat = (x - mean[None, :]) * invstd[None, :]
    return tl.where(xhat * w[None, :] + b[None, :] > 0, dout, 0.0), xhat


# The peeled loops (acc2d / peel): a program's blocks, all without masks or all masked (MASK), one helper each
@triton.jit
def _welford_blocks(X, start, end, offs_r, offs_c, n_r, mean2, m2_2, C: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr, MASK: tl.constexpr):
    for i in tl.range(0, ROWS // BLOCK_R, num_stages=STAGES):
        n_r, mean2, m2_2 = _welford_step(X, start + i * BLOCK_R, offs_r, offs_c, end, n_r, mean2, m2_2, C, BLOCK_C,
                                         MASK)
    return n_r, mean2, m2_2


@triton.jit
def _sums_blocks(DOUT, X, start, end, offs_r, offs_c, mean, invstd, w, b, a_g, a_gx, C: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr,
                 MASK: tl.constexpr, PK: tl.constexpr, HH: tl.constexpr, WW: tl.constexpr):
    for i in tl.range(0, ROWS // BLOCK_R, num_stages=STAGES):
        g, xhat = _relu_grad_step(DOUT, X, start + i * BLOCK_R, offs_r, offs_c, end, mean, invstd, w, b, C, BLOCK_C,
                                  MASK, PK, HH, WW)
        a_g += g
        a_gx += g * xhat
    return a_g, a_gx


@triton.jit
def _apply_blocks(X, OUT, start, end, offs_r, offs_c, scale, shift, C: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr, MASK: tl.constexpr,
                  PK: tl.constexpr, HH: tl.constexpr, WW: tl.constexpr):
    for i in tl.range(0, ROWS // BLOCK_R, num_stages=STAGES):
        row0 = start + i * BLOCK_R
        x = _tile(X, row0, offs_r, offs_c, end, C, BLOCK_C, MASK)
        _put(OUT, row0, offs_r, offs_c, end, tl.maximum(x * scale[None, :] + shift[None, :], 0.0), C, BLOCK_C, MASK,
             PK, HH, WW)


@triton.jit
def _bwd_apply_blocks(DOUT, X, DX, start, end, offs_r, offs_c, mean, invstd, w, b, k, db_m, dw_m, C: tl.constexpr,
                      ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr,
                      MASK: tl.constexpr, PK: tl.constexpr, HH: tl.constexpr, WW: tl.constexpr):
    for i in tl.range(0, ROWS // BLOCK_R, num_stages=STAGES):
        row0 = start + i * BLOCK_R
        g, xhat = _relu_grad_step(DOUT, X, row0, offs_r, offs_c, end, mean, invstd, w, b, C, BLOCK_C, MASK, PK, HH,
                                  WW)
        _put(DX, row0, offs_r, offs_c, end, k[None, :] * (g - db_m[None, :] - xhat * dw_m[None, :]), C, BLOCK_C, MASK)


@triton.jit
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s combination of two (count, mean, M2) summaries."""
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / tl.maximum(n, 1.0)
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def _bn_stats(X, PART, M, C: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
              STAGES: tl.constexpr = 2, ACC2D: tl.constexpr = False):
    """Program p: (mean, M2) per channel of rows [p * ROWS, (p + 1) * ROWS) into PART[p] = [2, BLOCK_C].

    ACC2D: every element slot of the [BLOCK_R, BLOCK_C] tile keeps its own running (mean, M2) over the row blocks
    (Welford's update; the count is the same along a row), combined across the BLOCK_R rows once at the end (Chan):
    no reduction across warps inside the loop. Otherwise each block is reduced to (mean, M2) as it comes (three
    cross-warp sums per block, each a shared-memory round trip with barriers) and combined with the running one."""
    p = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    start = p * ROWS
    end = tl.minimum(start + ROWS, M)
    if ACC2D:
        n_r = tl.zeros([BLOCK_R, 1], tl.float32)
        mean2 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        m2_2 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        # the programs whose rows are all inside M: every block without masks; the last one: masked
        if start + ROWS <= M:
            n_r, mean2, m2_2 = _welford_blocks(X, start, end, offs_r, offs_c, n_r, mean2, m2_2, C, ROWS, BLOCK_R,
                                               BLOCK_C, STAGES, False)
        else:
            n_r, mean2, m2_2 = _welford_blocks(X, start, end, offs_r, offs_c, n_r, mean2, m2_2, C, ROWS, BLOCK_R,
                                               BLOCK_C, STAGES, True)
        n = tl.sum(n_r, 0)  # [1]: the program's rows
        mean = tl.sum(n_r * mean2, 0) / tl.maximum(n, 1.0)
        d = mean2 - mean[None, :]
        m2 = tl.sum(m2_2 + n_r * d * d, 0)
    else:
        n = tl.zeros([BLOCK_C], tl.float32)
        mean = tl.zeros([BLOCK_C], tl.float32)
        m2 = tl.zeros([BLOCK_C], tl.float32)
        for i in tl.range(0, ROWS // BLOCK_R, num_stages=STAGES):  # whole row steps (past ``end`` masked), pipelined
            row0 = start + i * BLOCK_R
            x, mask = _rows(X, row0, offs_r, offs_c, end, C)
            n_b = tl.sum(mask.to(tl.float32), 0)
            mean_b = tl.sum(x, 0) / tl.maximum(n_b, 1.0)
            d = tl.where(mask, x - mean_b[None, :], 0.0)
            n, mean, m2 = _chan(n, mean, m2, n_b, mean_b, tl.sum(d * d, 0))
    base = PART + p.to(tl.int64) * 2 * BLOCK_C
    tl.store(base + offs_c, mean)
    tl.store(base + BLOCK_C + offs_c, m2)


@triton.jit
def _bn_finalize(PART, MEAN, INVSTD, RUN_MEAN, RUN_VAR, M, eps, momentum, NP: tl.constexpr, ROWS: tl.constexpr,
                 C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, UPDATE: tl.constexpr):
    """One program: combine every program's partials (mean, M2) per channel; mean, invstd out; running stats."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_p = tl.arange(0, BLOCK_P)
    n = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, NP, BLOCK_P):
        ps = p0 + offs_p
        valid = ps < NP
        base = PART + ps.to(tl.int64)[:, None] * 2 * BLOCK_C + offs_c[None, :]
        mean_p = tl.load(base, mask=valid[:, None], other=0.0)
        m2_p = tl.load(base + BLOCK_C, mask=valid[:, None], other=0.0)
        # rows of each program (the last may hold fewer)
        n_p = tl.where(valid, tl.minimum(M - ps * ROWS, ROWS), 0).to(tl.float32)
        n_b = tl.sum(n_p, 0)
        mean_b = tl.sum(n_p[:, None] * mean_p, 0) / tl.maximum(n_b, 1.0)
        d = mean_p - mean_b[None, :]
        m2_b = tl.sum(m2_p + n_p[:, None] * d * d, 0)
        n, mean, m2 = _chan(n, mean, m2, n_b + tl.zeros([BLOCK_C], tl.float32), mean_b, m2_b)
    var = m2 / M
    cm = offs_c < C
    tl.store(MEAN + offs_c, mean, mask=cm)
    tl.store(INVSTD + offs_c, 1.0 / tl.sqrt(var + eps), mask=cm)
    if UPDATE:
        rm = tl.load(RUN_MEAN + offs_c, mask=cm, other=0.0)
        rv = tl.load(RUN_VAR + offs_c, mask=cm, other=0.0)
        unbiased = m2 / tl.maximum(M - 1, 1)
        tl.store(RUN_MEAN + offs_c, (rm + momentum * (mean - rm)).to(RUN_MEAN.dtype.element_ty), mask=cm)
        tl.store(RUN_VAR + offs_c, (rv + momentum * (unbiased - rv)).to(RUN_VAR.dtype.element_ty), mask=cm)


@triton.jit
def _bn_relu_apply(X, OUT, MEAN, INVSTD, W, B, M, C: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr, STAGES: tl.constexpr = 2, PEEL: tl.constexpr = False,
                   PK: tl.constexpr = 0, HH: tl.constexpr = 1, WW: tl.constexpr = 1):
    """out = max((x - mean) * invstd * w + b, 0) over program p's rows. PEEL: the whole blocks without masks, then
    the program's last partial one (else every block masked). PK > 0: out in the patch layout (_mem_rows)."""
    p = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    scale = _channel(INVSTD, offs_c, C) * _channel(W, offs_c, C)
    shift = _channel(B, offs_c, C) - _channel(MEAN, offs_c, C) * scale
    start = p * ROWS
    end = tl.minimum(start + ROWS, M)
    # PEEL: the programs whose rows are all inside M run every block without masks, the last one masked
    if PEEL and (start + ROWS <= M):
        _apply_blocks(X, OUT, start, end, offs_r, offs_c, scale, shift, C, ROWS, BLOCK_R, BLOCK_C, STAGES, False,
                      PK, HH, WW)
    else:
        _apply_blocks(X, OUT, start, end, offs_r, offs_c, scale, shift, C, ROWS, BLOCK_R, BLOCK_C, STAGES, True,
                      PK, HH, WW)


@triton.jit
def _bn_relu_bwd_sums(DOUT, X, MEAN, INVSTD, W, B, PART, M, C: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr, STAGES: tl.constexpr = 2, ACC2D: tl.constexpr = False,
                      PK: tl.constexpr = 0, HH: tl.constexpr = 1, WW: tl.constexpr = 1):
    """Program p: sum g and sum g * xhat per channel over its rows (g = dout where y > 0) into PART[p]. ACC2D: the
    sums kept per element slot of the tile and reduced across the rows once, after the loop. PK > 0: dout in the
    patch layout (_mem_rows)."""
    p = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    mean, invstd = _channel(MEAN, offs_c, C), _channel(INVSTD, offs_c, C)
    w, b = _channel(W, offs_c, C), _channel(B, offs_c, C)
    start = p * ROWS
    end = tl.minimum(start + ROWS, M)
    if ACC2D:
        a_g = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        a_gx = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        # the programs whose rows are all inside M: every block without masks; the last one: masked
        if start + ROWS <= M:
            a_g, a_gx = _sums_blocks(DOUT, X, start, end, offs_r, offs_c, mean, invstd, w, b, a_g, a_gx, C, ROWS,
                                     BLOCK_R, BLOCK_C, STAGES, False, PK, HH, WW)
        else:
            a_g, a_gx = _sums_blocks(DOUT, X, start, end, offs_r, offs_c, mean, invstd, w, b, a_g, a_gx, C, ROWS,
                                     BLOCK_R, BLOCK_C, STAGES, True, PK, HH, WW)
        s_g = tl.sum(a_g, 0)
        s_gx = tl.sum(a_gx, 0)
    else:
        s_g = tl.zeros([BLOCK_C], tl.float32)
        s_gx = tl.zeros([BLOCK_C], tl.float32)
        for i in tl.range(0, ROWS // BLOCK_R, num_stages=STAGES):  # whole row steps (past ``end`` masked), pipelined
            g, xhat = _relu_grad_step(DOUT, X, start + i * BLOCK_R, offs_r, offs_c, end, mean, invstd, w, b, C,
                                      BLOCK_C, True, PK, HH, WW)
            s_g += tl.sum(g, 0)
            s_gx += tl.sum(g * xhat, 0)
    base = PART + p.to(tl.int64) * 2 * BLOCK_C
    tl.store(base + offs_c, s_g)
    tl.store(base + BLOCK_C + offs_c, s_gx)


# sum_partials' tiling: channels per program, partial rows per loop step, warps, pipeline stages of that loop. From
# the H200 sweep of the LayerNorm backward with its sums (scripts/sweep_rowkernels.py, 2026-12-05): 4 channels per
# program (96 programs for 384 channels instead of 12), 128 partials per step, 1 warp. 128 was the largest block_p
# that sweep tried, and the profile of compile_graphs_ours then had _sum_partials at 9.3 us per call (51 calls, 0.475
# ms per step) for ~1-5 MB of partials: a loop of ~9 steps, each waiting on its loads. The H100 sweep of 2026-12-05
# (bench/results/rowkernels-h100/, space up to 1024 partials per step, 8 warps, pipelined loop) chose 1024 partials
# per step, 1 warp, 1 stage: LayerNorm backward with its sums 70.1 -> 62.6 us.
SUM = dict(cb=4, block_p=1024, warps=1, stages=1)


@triton.jit
def _sum_partials(PART, OUT0, OUT1, OUT2, NP: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_P: tl.constexpr, CB: tl.constexpr, SLOTS: tl.constexpr, STAGES: tl.constexpr = 1):
    """Program j: channels [j * CB, (j + 1) * CB) of OUTs = sum_p PART[p, s] for the s < SLOTS (1 to 3). STAGES > 1:
    the loop over the partials software-pipelined (the next blocks' loads in flight while one is summed)."""
    offs_c = tl.program_id(0) * CB + tl.arange(0, CB)
    offs_p = tl.arange(0, BLOCK_P)
    s0 = tl.zeros([CB], tl.float32)
    s1 = tl.zeros([CB], tl.float32)
    s2 = tl.zeros([CB], tl.float32)
    for p0 in tl.range(0, NP, BLOCK_P, num_stages=STAGES):
        ps = p0 + offs_p
        base = PART + ps.to(tl.int64)[:, None] * SLOTS * BLOCK_C + offs_c[None, :]
        valid = (ps < NP)[:, None]
        s0 += tl.sum(tl.load(base, mask=valid, other=0.0), 0)
        if SLOTS >= 2:
            s1 += tl.sum(tl.load(base + BLOCK_C, mask=valid, other=0.0), 0)
        if SLOTS == 3:
            s2 += tl.sum(tl.load(base + 2 * BLOCK_C, mask=valid, other=0.0), 0)
    cm = offs_c < C
    tl.store(OUT0 + offs_c, s0.to(OUT0.dtype.element_ty), mask=cm)
    if SLOTS >= 2:
        tl.store(OUT1 + offs_c, s1.to(OUT1.dtype.element_ty), mask=cm)
    if SLOTS == 3:
        tl.store(OUT2 + offs_c, s2.to(OUT2.dtype.element_ty), mask=cm)


@triton.jit
def _bn_relu_bwd_apply(DOUT, X, DX, MEAN, INVSTD, W, B, DW, DB, M, C: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr = 2,
                       PEEL: tl.constexpr = False, PK: tl.constexpr = 0, HH: tl.constexpr = 1, WW: tl.constexpr = 1):
    """dx = w * invstd * (g - db / M - xhat * dw / M) over program p's rows (PEEL as _bn_relu_apply's; PK > 0: dout
    in the patch layout, _mem_rows)."""
    p = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    mean, invstd = _channel(MEAN, offs_c, C), _channel(INVSTD, offs_c, C)
    w, b = _channel(W, offs_c, C), _channel(B, offs_c, C)
    db_m, dw_m = _channel(DB, offs_c, C) / M, _channel(DW, offs_c, C) / M
    k = w * invstd
    start = p * ROWS
    end = tl.minimum(start + ROWS, M)
    if PEEL and (start + ROWS <= M):  # as _bn_relu_apply
        _bwd_apply_blocks(DOUT, X, DX, start, end, offs_r, offs_c, mean, invstd, w, b, k, db_m, dw_m, C, ROWS,
                          BLOCK_R, BLOCK_C, STAGES, False, PK, HH, WW)
    else:
        _bwd_apply_blocks(DOUT, X, DX, start, end, offs_r, offs_c, mean, invstd, w, b, k, db_m, dw_m, C, ROWS,
                          BLOCK_R, BLOCK_C, STAGES, True, PK, HH, WW)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
# The four streaming kernels' tilings: elements per row block (BLOCK_R = elems / BLOCK_C rows), warps, programs per
# SM, software-pipelining stages of the row loop; for the two reductions whether the sums stay per element slot until
# the loop ends (acc2d, with the loop peeled as below), for the two pointwise passes whether the loop is peeled (peel:
# the whole blocks without row or channel masks, then the program's one partial block). The first four are the
# seventh session's choice was 8K elements (16 KB of bf16 per block), 8 warps, ~4 programs per SM, 2 stages, with
# acc2d and peel off; the stem's profile then had the statistics at 179 us per call where one read of the activations
# takes 43 us, their backward sums at 175 where two take 86 (kernels/NOTES.md). The values below are the H100 sweep's
# (scripts/sweep_rowkernels.py --kinds bn_fwd,bn_bwd, 2026-12-05, bench/results/rowkernels-h100/): forward (the
# stem's 4 BatchNorms, statistics + apply) 333.0 -> 236.6 us, backward 391.9 -> 358.8 us per step.
STATS = dict(elems=4096, warps=8, per_sm=4, stages=2, acc2d=True)
APPLY = dict(elems=8192, warps=8, per_sm=4, stages=2, peel=True)
BWD_SUMS = dict(elems=4096, warps=2, per_sm=8, stages=2, acc2d=True)
BWD_APPLY = dict(elems=8192, warps=8, per_sm=16, stages=2, peel=True)


def _grid(M, C, device, tiling=None, sms=None):
    """(programs, rows per program, BLOCK_R, BLOCK_C) for a tiling dict (default STATS): ``per_sm`` programs per SM
    (``sms``: the device's count), each a contiguous run of whole rows in blocks of ``elems`` elements, the loop
    over them software-pipelined (tl.range, ``stages``: the next blocks' loads in flight while one is used)."""
    tiling = tiling or STATS
    block_c = max(16, triton.next_power_of_2(C))
    block_r = max(1, min(512, tiling["elems"] // block_c))
    progs = max(1, min(triton.cdiv(M, block_r), tiling["per_sm"] * (sms or sm_count(device))))
    rows = triton.cdiv(triton.cdiv(M, progs), block_r) * block_r
    return triton.cdiv(M, rows), rows, block_r, block_c


def _launch_args(M, C, device, tiling, sms=None):
    """(programs, the constexprs and launch options of a streaming kernel) for ``tiling``."""
    progs, rows, block_r, block_c = _grid(M, C, device, tiling, sms)
    const = dict(C=C, ROWS=rows, BLOCK_R=block_r, BLOCK_C=block_c, STAGES=tiling["stages"],
                 num_warps=tiling["warps"])
    if "acc2d" in tiling:
        const["ACC2D"] = tiling["acc2d"]
    if "peel" in tiling:
        const["PEEL"] = tiling["peel"]
    return progs, const


def _block_p(progs, block_c):
    """Partials combined per step of the finalise loop: a [BLOCK_P, BLOCK_C] tile of ~4K values."""
    return max(1, min(triton.next_power_of_2(progs), 4096 // block_c))


def sum_partials(part, outs, C):
    """outs[s] = part[:, s, :C].sum(0) for [programs, len(outs) (1 to 3), BLOCK_C] fp32 partials, by programs over
    SUM["cb"]-channel slices (one program alone would stream every partial through one SM)."""
    progs, slots, block_c = part.shape
    cb = min(block_c, SUM["cb"])
    out0, out1, out2 = (tuple(outs) * 3)[:3]  # the unused ones stand in for pointers never written
    _sum_partials[(triton.cdiv(C, cb),)](part, out0, out1, out2, NP=progs, C=C, BLOCK_C=block_c,
                                         BLOCK_P=SUM["block_p"], CB=cb, SLOTS=slots, STAGES=SUM.get("stages", 1),
                                         num_warps=SUM["warps"])


def sm90_resources(B: int = 128, C: int = 64, H: int = 112, W: int = 112, dtype=torch.bfloat16,
                   overrides: dict | None = None, patch: int = 0) -> dict:
    """The four streaming kernels' sm_90 builds at the LV-ViT stem's activations, without a GPU (run without
    TRITON_INTERPRET): {name: (registers, spilled stack bytes, shared bytes, cp.async copies)}. ``overrides``:
    {name: tiling entries} on top of STATS / APPLY / BWD_SUMS / BWD_APPLY (e.g. {"stats": {"acc2d": True}});
    ``patch``: the output / its gradient in the patch layout (the stem's last BatchNorm: 8)."""
    from ._common import aot_sm90

    M = B * H * W
    x = torch.empty(M, C, device="meta", dtype=dtype)
    f = torch.empty(C, device="meta", dtype=torch.float32)
    part = torch.empty(1, 2, max(16, triton.next_power_of_2(C)), device="meta", dtype=torch.float32)
    launches = {"stats": (_bn_stats, [x, part, M], STATS), "apply": (_bn_relu_apply, [x, x, f, f, f, f, M], APPLY),
                "bwd_sums": (_bn_relu_bwd_sums, [x, x, f, f, f, f, part, M], BWD_SUMS),
                "bwd_apply": (_bn_relu_bwd_apply, [x, x, x, f, f, f, f, f, f, M], BWD_APPLY)}
    out = {}
    for name, (kernel, args, tiling) in launches.items():
        tiling = {**tiling, **(overrides or {}).get(name, {})}
        const = _launch_args(M, C, "meta", tiling, sms=132)[1]  # an H200's SMs
        if name != "stats":
            const.update(_patch_layout(torch.empty(B, C, H, W, device="meta"), patch)[1])
        opts = dict(num_warps=const.pop("num_warps"))
        out[name] = aot_sm90((kernel, None, args, const, opts))
    return out


def _rows_view(x):
    """x [B, C, H, W] channels-last as its [B * H * W, C] memory."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B * H * W, C)


def check_inputs(x, weight, bias):
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"bn_relu: x must be a channels-last [B, C, H, W] tensor, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"bn_relu: x must be float16, bfloat16 or float32, got {x.dtype}")
    C = x.shape[1]
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(f"bn_relu: weight and bias must be [{C}], got {tuple(weight.shape)}, {tuple(bias.shape)}")
    if not (x.is_cuda or INTERPRET):
        raise RuntimeError(f"bn_relu (Triton) needs CUDA tensors, got {x.device}")
    if C > 1024:
        raise ValueError(f"bn_relu: {C} channels > 1024 are not supported")
    if x.numel() == 0 or x.numel() // C < 2:
        raise ValueError(f"bn_relu: batch statistics need at least 2 values per channel, got shape {tuple(x.shape)}")


def check_patch(x, patch):
    """``patch`` (0, or the k of a k x k stride-k conv that takes the output as its GEMM operand) fits x
    [B, C, H, W]."""
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 0:
        raise ValueError(f"bn_relu: patch must be an int >= 0 (0: x's own layout), got {patch!r}")
    H, W = x.shape[-2:]
    if patch and (H % patch or W % patch):
        raise ValueError(f"bn_relu: patch={patch} must divide the activations' height and width, got {H} x {W}")


def _patch_layout(x, patch):
    """(the output's shape, the kernels' row-placement constexprs, _mem_rows's) for ``patch`` (0: x's own layout)."""
    B, C, H, W = x.shape
    if not patch:
        return tuple(x.shape), dict(PK=0, HH=1, WW=1)
    return (B * (H // patch) * (W // patch), patch * patch * C), dict(PK=patch, HH=H, WW=W)


def bn_relu_forward(x, weight, bias, running_mean, running_var, momentum, eps, patch=0):
    """(out, mean [C] fp32, invstd [C] fp32); updates running_mean / running_var in place when given. out: like x
    (channels-last) for ``patch`` 0; else the [B * (H / patch) * (W / patch), patch * patch * C] operand of a patch x
    patch stride-patch conv run as a GEMM (rows = patches, each in (row, column, channel) order), written there by the
    normalising pass itself: the copy from x's layout to the patches' (a read and a write of the activations) never
    runs."""
    check_patch(x, patch)
    C = x.shape[1]
    xr = _rows_view(x)
    M = xr.shape[0]
    progs, stats = _launch_args(M, C, x.device, STATS)
    block_c = stats["BLOCK_C"]
    part = torch.empty(progs, 2, block_c, device=x.device, dtype=torch.float32)
    mean = torch.empty(C, device=x.device, dtype=torch.float32)
    invstd = torch.empty(C, device=x.device, dtype=torch.float32)
    shape, layout = _patch_layout(x, patch)
    out = x.new_empty(shape) if patch else torch.empty_like(x)  # channels-last, as x
    _bn_stats[(progs,)](xr, part, M, **stats)
    update = running_mean is not None
    _bn_finalize[(1,)](part, mean, invstd, running_mean if update else mean, running_var if update else invstd, M,
                       float(eps), float(momentum), NP=progs, ROWS=stats["ROWS"], C=C,
                       BLOCK_P=_block_p(progs, block_c), BLOCK_C=block_c, UPDATE=update, num_warps=4)
    progs, apply = _launch_args(M, C, x.device, APPLY)
    _bn_relu_apply[(progs,)](xr, out if patch else _rows_view(out), mean, invstd, weight, bias, M, **apply, **layout)
    return out, mean, invstd


def bn_relu_backward(dout, x, weight, bias, mean, invstd, patch=0):
    """(dx like x, dweight like weight, dbias like bias); dout in the forward output's layout (``patch``)."""
    check_patch(x, patch)
    C = x.shape[1]
    shape, layout = _patch_layout(x, patch)
    if tuple(dout.shape) != shape:
        raise ValueError(f"bn_relu: dout must have the forward output's shape {shape} (patch={patch}), got "
                         f"{tuple(dout.shape)}")
    dout = dout.contiguous() if patch else dout.contiguous(memory_format=torch.channels_last)
    xr = _rows_view(x)
    M = xr.shape[0]
    progs, sums = _launch_args(M, C, x.device, BWD_SUMS)
    part = torch.empty(progs, 2, sums["BLOCK_C"], device=x.device, dtype=torch.float32)
    dw = torch.empty_like(weight)
    db = torch.empty_like(bias)
    dx = torch.empty_like(x)
    dr = dout if patch else _rows_view(dout)
    _bn_relu_bwd_sums[(progs,)](dr, xr, mean, invstd, weight, bias, part, M, **sums, **layout)
    sum_partials(part, (db, dw), C)
    progs, apply = _launch_args(M, C, x.device, BWD_APPLY)
    _bn_relu_bwd_apply[(progs,)](dr, xr, _rows_view(dx), mean, invstd, weight, bias, dw, db, M, **apply, **layout)
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# torch.library ops (torch.compile sees fakes) and the autograd glue
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("tokenlabel::bn_relu_fwd", mutates_args=("running_mean", "running_var"))
def bn_relu_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                   running_var: torch.Tensor, momentum: float, eps: float,
                   patch: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return bn_relu_forward(x, weight, bias, running_mean, running_var, momentum, eps, patch)


@bn_relu_fwd_op.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps, patch=0):
    C = x.shape[1]
    out = x.new_empty(_patch_layout(x, patch)[0]) if patch else torch.empty_like(x)
    return (out, x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32))


@torch.library.custom_op("tokenlabel::bn_relu_bwd", mutates_args=())
def bn_relu_bwd_op(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                   invstd: torch.Tensor, patch: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return bn_relu_backward(dout, x, weight, bias, mean, invstd, patch)


@bn_relu_bwd_op.register_fake
def _(dout, x, weight, bias, mean, invstd, patch=0):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


class _BNReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, patch):
        out, mean, invstd = dispatch(torch.ops.tokenlabel.bn_relu_fwd, bn_relu_forward, x, weight, bias, running_mean,
                                     running_var, momentum, eps, patch, check=(x,))
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.patch = patch
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        dx, dw, db = dispatch(torch.ops.tokenlabel.bn_relu_bwd, bn_relu_backward, dout, x, weight, bias, mean, invstd,
                              ctx.patch, check=(dout, x))
        return dx, dw, db, None, None, None, None, None


def bn_relu_train(x, bn: torch.nn.BatchNorm2d, patch: int = 0):
    """``F.relu(bn(x))`` for a BatchNorm2d in training mode (batch statistics, running stats updated, the batch
    counter advanced), by the Triton kernels; x channels-last [B, C, H, W]. ``bn.momentum`` must be a number
    (momentum None, a cumulative average, would need the counter on the host). ``patch`` k > 0: the output comes as
    the [B * (H / k) * (W / k), k * k * C] patch rows of a k x k stride-k conv run as a GEMM (bn_relu_forward), the
    same values as ``patches_of(F.relu(bn(x)), k)`` without the copy."""
    if bn.momentum is None or not bn.affine or not bn.track_running_stats:
        raise ValueError("bn_relu_train: needs an affine BatchNorm2d with running stats and a numeric momentum")
    check_inputs(x, bn.weight, bn.bias)
    check_patch(x, patch)
    bn.num_batches_tracked.add_(1)
    return _BNReLU.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, float(bn.momentum), float(bn.eps),
                         patch)
