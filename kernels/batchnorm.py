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
    """A [BLOCK_R, BLOCK_C] fp32 tile of rows row0.. (zeros past M and past C), and its mask."""
    rows = row0 + offs_r
    mask = (rows[:, None] < M) & (offs_c[None, :] < C)
    ptrs = X + rows.to(tl.int64)[:, None] * C + offs_c[None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), mask, ptrs


@triton.jit
def _channel(P, offs_c, C: tl.constexpr):
    """A per-channel vector as fp32 (zeros past C)."""
    return tl.load(P + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)


@triton.jit
def _relu_grad(DOUT, X, row0, offs_r, offs_c, end, mean, invstd, w, b, C: tl.constexpr):
    """For a row block: (g = dout where the forward's y = xhat * w + b > 0, xhat, mask)."""
    x, mask, _ = _rows(X, row0, offs_r, offs_c, end, C)
    dout, _, _ = _rows(DOUT, row0, offs_r, offs_c, end, C)
    xhat = (x - mean[None, :]) * invstd[None, :]
    return tl.where(mask & (xhat * w[None, :] + b[None, :] > 0), dout, 0.0), xhat, mask


@triton.jit
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s combination of two (count, mean, M2) summaries."""
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / tl.maximum(n, 1.0)
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def _bn_stats(X, PART, M, C: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program p: (mean, M2) per channel of rows [p * ROWS, (p + 1) * ROWS) into PART[p] = [2, BLOCK_C]."""
    p = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    n = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    start = p * ROWS
    end = tl.minimum(start + ROWS, M)
    for i in tl.range(0, ROWS // BLOCK_R, num_stages=2):  # whole row steps (rows past ``end`` masked), pipelined
        row0 = start + i * BLOCK_R
        x, mask, _ = _rows(X, row0, offs_r, offs_c, end, C)
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
                   BLOCK_C: tl.constexpr):
    """out = max((x - mean) * invstd * w + b, 0) over program p's rows."""
    p = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    scale = _channel(INVSTD, offs_c, C) * _channel(W, offs_c, C)
    shift = _channel(B, offs_c, C) - _channel(MEAN, offs_c, C) * scale
    start = p * ROWS
    end = tl.minimum(start + ROWS, M)
    for i in tl.range(0, ROWS // BLOCK_R, num_stages=2):  # whole row steps (rows past ``end`` masked), pipelined
        row0 = start + i * BLOCK_R
        x, mask, _ = _rows(X, row0, offs_r, offs_c, end, C)
        y = tl.maximum(x * scale[None, :] + shift[None, :], 0.0)
        rows = row0 + offs_r
        tl.store(OUT + rows.to(tl.int64)[:, None] * C + offs_c[None, :], y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bn_relu_bwd_sums(DOUT, X, MEAN, INVSTD, W, B, PART, M, C: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """Program p: sum g and sum g * xhat per channel over its rows (g = dout where y > 0) into PART[p]."""
    p = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    mean, invstd = _channel(MEAN, offs_c, C), _channel(INVSTD, offs_c, C)
    w, b = _channel(W, offs_c, C), _channel(B, offs_c, C)
    s_g = tl.zeros([BLOCK_C], tl.float32)
    s_gx = tl.zeros([BLOCK_C], tl.float32)
    start = p * ROWS
    end = tl.minimum(start + ROWS, M)
    for i in tl.range(0, ROWS // BLOCK_R, num_stages=2):  # whole row steps (rows past ``end`` masked), pipelined
        g, xhat, _ = _relu_grad(DOUT, X, start + i * BLOCK_R, offs_r, offs_c, end, mean, invstd, w, b, C)
        s_g += tl.sum(g, 0)
        s_gx += tl.sum(g * xhat, 0)
    base = PART + p.to(tl.int64) * 2 * BLOCK_C
    tl.store(base + offs_c, s_g)
    tl.store(base + BLOCK_C + offs_c, s_gx)


# sum_partials' tiling: channels per program, partial rows per loop step, warps. From the H200 sweep of the
# LayerNorm backward with its sums (scripts/sweep_rowkernels.py, 2026-12-05): 4 channels per program (96 programs
# for 384 channels instead of 12), 128 partials per step, 1 warp.
SUM = dict(cb=4, block_p=128, warps=1)


@triton.jit
def _sum_partials(PART, OUT0, OUT1, OUT2, NP: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_P: tl.constexpr, CB: tl.constexpr, SLOTS: tl.constexpr):
    """Program j: channels [j * CB, (j + 1) * CB) of OUTs = sum_p PART[p, s] for the s < SLOTS (1 to 3)."""
    offs_c = tl.program_id(0) * CB + tl.arange(0, CB)
    offs_p = tl.arange(0, BLOCK_P)
    s0 = tl.zeros([CB], tl.float32)
    s1 = tl.zeros([CB], tl.float32)
    s2 = tl.zeros([CB], tl.float32)
    for p0 in range(0, NP, BLOCK_P):
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
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = w * invstd * (g - db / M - xhat * dw / M) over program p's rows."""
    p = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    mean, invstd = _channel(MEAN, offs_c, C), _channel(INVSTD, offs_c, C)
    w, b = _channel(W, offs_c, C), _channel(B, offs_c, C)
    db_m, dw_m = _channel(DB, offs_c, C) / M, _channel(DW, offs_c, C) / M
    k = w * invstd
    start = p * ROWS
    end = tl.minimum(start + ROWS, M)
    for i in tl.range(0, ROWS // BLOCK_R, num_stages=2):  # whole row steps (rows past ``end`` masked), pipelined
        row0 = start + i * BLOCK_R
        g, xhat, mask = _relu_grad(DOUT, X, row0, offs_r, offs_c, end, mean, invstd, w, b, C)
        dx = k[None, :] * (g - db_m[None, :] - xhat * dw_m[None, :])
        rows = row0 + offs_r
        tl.store(DX + rows.to(tl.int64)[:, None] * C + offs_c[None, :], dx.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _grid(M, C, device, sms=None):
    """(programs, rows per program, BLOCK_R, BLOCK_C): ~4 programs per SM (``sms``: the device's count), each a
    contiguous run of whole rows in blocks of 8K elements (16 KB in bf16), the loop over them software-pipelined
    (tl.range, 2 stages: the next block's loads in flight while one is reduced)."""
    block_c = max(16, triton.next_power_of_2(C))
    block_r = max(1, min(512, 8192 // block_c))
    progs = max(1, min(triton.cdiv(M, block_r), 4 * (sms or sm_count(device))))
    rows = triton.cdiv(triton.cdiv(M, progs), block_r) * block_r
    return triton.cdiv(M, rows), rows, block_r, block_c


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
                                         BLOCK_P=SUM["block_p"], CB=cb, SLOTS=slots, num_warps=SUM["warps"])


def sm90_resources(B: int = 128, C: int = 64, H: int = 112, W: int = 112, dtype=torch.bfloat16) -> dict:
    """The four streaming kernels' sm_90 builds at the LV-ViT stem's activations, without a GPU (run without
    TRITON_INTERPRET): {name: (registers, spilled stack bytes, shared bytes, cp.async copies)}."""
    from ._common import aot_sm90

    M = B * H * W
    x = torch.empty(M, C, device="meta", dtype=dtype)
    f = torch.empty(C, device="meta", dtype=torch.float32)
    progs, rows, block_r, block_c = _grid(M, C, "meta", sms=132)  # an H200's SMs
    part = torch.empty(progs, 2, block_c, device="meta", dtype=torch.float32)
    tiles, opts = dict(C=C, ROWS=rows, BLOCK_R=block_r, BLOCK_C=block_c), dict(num_warps=8)
    launches = {"stats": (_bn_stats, [x, part, M]), "apply": (_bn_relu_apply, [x, x, f, f, f, f, M]),
                "bwd_sums": (_bn_relu_bwd_sums, [x, x, f, f, f, f, part, M]),
                "bwd_apply": (_bn_relu_bwd_apply, [x, x, x, f, f, f, f, f, f, M])}
    return {name: aot_sm90((kernel, None, args, tiles, opts)) for name, (kernel, args) in launches.items()}


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


def bn_relu_forward(x, weight, bias, running_mean, running_var, momentum, eps):
    """(out like x, mean [C] fp32, invstd [C] fp32); updates running_mean / running_var in place when given."""
    C = x.shape[1]
    xr = _rows_view(x)
    M = xr.shape[0]
    progs, rows, block_r, block_c = _grid(M, C, x.device)
    part = torch.empty(progs, 2, block_c, device=x.device, dtype=torch.float32)
    mean = torch.empty(C, device=x.device, dtype=torch.float32)
    invstd = torch.empty(C, device=x.device, dtype=torch.float32)
    out = torch.empty_like(x)  # channels-last, as x
    tiles = dict(C=C, ROWS=rows, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8)
    _bn_stats[(progs,)](xr, part, M, **tiles)
    update = running_mean is not None
    _bn_finalize[(1,)](part, mean, invstd, running_mean if update else mean, running_var if update else invstd, M,
                       float(eps), float(momentum), NP=progs, ROWS=rows, C=C, BLOCK_P=_block_p(progs, block_c),
                       BLOCK_C=block_c, UPDATE=update, num_warps=4)
    _bn_relu_apply[(progs,)](xr, _rows_view(out), mean, invstd, weight, bias, M, **tiles)
    return out, mean, invstd


def bn_relu_backward(dout, x, weight, bias, mean, invstd):
    """(dx like x, dweight like weight, dbias like bias)."""
    C = x.shape[1]
    dout = dout.contiguous(memory_format=torch.channels_last)
    xr = _rows_view(x)
    M = xr.shape[0]
    progs, rows, block_r, block_c = _grid(M, C, x.device)
    part = torch.empty(progs, 2, block_c, device=x.device, dtype=torch.float32)
    dw = torch.empty_like(weight)
    db = torch.empty_like(bias)
    dx = torch.empty_like(x)
    dr = _rows_view(dout)
    tiles = dict(C=C, ROWS=rows, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8)
    _bn_relu_bwd_sums[(progs,)](dr, xr, mean, invstd, weight, bias, part, M, **tiles)
    sum_partials(part, (db, dw), C)
    _bn_relu_bwd_apply[(progs,)](dr, xr, _rows_view(dx), mean, invstd, weight, bias, dw, db, M, **tiles)
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# torch.library ops (torch.compile sees fakes) and the autograd glue
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("tokenlabel::bn_relu_fwd", mutates_args=("running_mean", "running_var"))
def bn_relu_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                   running_var: torch.Tensor, momentum: float, eps: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
    return bn_relu_forward(x, weight, bias, running_mean, running_var, momentum, eps)


@bn_relu_fwd_op.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps):
    C = x.shape[1]
    return (torch.empty_like(x), x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32))


@torch.library.custom_op("tokenlabel::bn_relu_bwd", mutates_args=())
def bn_relu_bwd_op(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                   invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return bn_relu_backward(dout, x, weight, bias, mean, invstd)


@bn_relu_bwd_op.register_fake
def _(dout, x, weight, bias, mean, invstd):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


class _BNReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        out, mean, invstd = dispatch(torch.ops.tokenlabel.bn_relu_fwd, bn_relu_forward, x, weight, bias, running_mean,
                                     running_var, momentum, eps, check=(x,))
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        dx, dw, db = dispatch(torch.ops.tokenlabel.bn_relu_bwd, bn_relu_backward, dout, x, weight, bias, mean, invstd,
                              check=(dout, x))
        return dx, dw, db, None, None, None, None


def bn_relu_train(x, bn: torch.nn.BatchNorm2d):
    """``F.relu(bn(x))`` for a BatchNorm2d in training mode (batch statistics, running stats updated, the batch
    counter advanced), by the Triton kernels; x channels-last [B, C, H, W]. ``bn.momentum`` must be a number
    (momentum None, a cumulative average, would need the counter on the host)."""
    if bn.momentum is None or not bn.affine or not bn.track_running_stats:
        raise ValueError("bn_relu_train: needs an affine BatchNorm2d with running stats and a numeric momentum")
    check_inputs(x, bn.weight, bn.bias)
    bn.num_batches_tracked.add_(1)
    return _BNReLU.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, float(bn.momentum), float(bn.eps))
