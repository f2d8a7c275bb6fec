"""Residual add + LayerNorm in one pass each way, for the LV-ViT block's stream: Triton.

Why: in the H200 profile of the compiled LV-ViT-S step (models/NOTES.md) inductor's LayerNorm kernels (the residual
add, drop path and 1 / skip_lam fused in) take 2.54 ms over 69 kernels, ~37 us each, where the bytes they must move
take ~24 us (forward) and ~32 us (backward) at the H200's 4.8 TB/s. These kernels move only those bytes.

What one call computes (per row r of the [M, C] token rows, sample b = r // N_TOK of the [B, N_TOK, C] stream)
=======================================================================================================
Forward:  y = x + (branch + c) * s_b      (s_b: the per-sample drop-path factor over skip_lam, or one constant;
                                            c: the bias of the Linear that made the branch, optional)
          xhat = (y - mean(y)) * rstd,     rstd = 1 / sqrt(var(y) + eps)   (biased variance, as nn.LayerNorm)
          n = xhat * w + bias              (written in ``out_dtype``: bf16 under autocast, where the next Linear
                                            would cast nn.LayerNorm's fp32 output to bf16 anyway)
Backward, given dy (the stream's gradient from further on; may be absent) and dn:
          g = dn * w,  dy_total = dy + rstd * (g - mean(g) - xhat * mean(g * xhat))
          dx = dy_total,  dbranch = dy_total * s_b,  dw = sum_r dn * xhat,  dbias = sum_r dn,  dc = sum_r dbranch
The stream (x, y, dx) stays in its own dtype (fp32 under autocast, as the reference's AMP keeps it); the branch and
its gradient in the branch's (the Linear's output dtype).

Bytes per call at LV-ViT-S/224, B 128 (M = 25,216 rows of 384; fp32 stream, bf16 branch and n):
forward reads x 38.7 MB + branch 19.4, writes y 38.7 + n 19.4 = 116 MB (24 us at 4.8 TB/s); backward reads dy 38.7,
dn 19.4, y 38.7, writes dx 38.7 + dbranch 19.4 = 155 MB (32 us).

Launches: forward one (a program per block of rows); backward two (programs over runs of rows with per-program
dw / dbias / dc partials, then the partials summed by programs over 32-channel slices).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, dispatch, sm_count
from .batchnorm import SUM, _sum_partials, sum_partials

_INTERP = tl.constexpr(INTERPRET)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_C = 4096
# Tilings. Forward: elements of one [BLOCK_R, BLOCK_C] tile, warps (sm_90 at C = 384: 58 registers, 4 programs per
# SM). Backward: elements per loop step, warps, programs per SM (all resident, one wave, each a long run of rows),
# the row loop's pipeline stages, the column sums as [BLOCK_R, BLOCK_C] accumulators reduced once at the end (acc2d)
# or every step, and both row sums in one reduction (joint). The backward's values come from
# scripts/sweep_rowkernels.py on an H200 (2026-12-05, CUDA graphs, LV-ViT-S/224 B 128, with the partial sums): 49.0
# us per call against 130 us for the first tiling (2048 elements, 4 warps, 3 per SM, 2 stages), whose fp32 and bf16
# tiles had different layouts (27 barriers per step); 4 elements per thread gives both one layout. The H100 sweep
# (2026-12-05, bench/results/rowkernels-h100/) moved per_sm 6 -> 4 (with batchnorm.SUM's 1024 partials per step):
# 70.1 -> 62.6 us.
FWD = dict(tile=4096, warps=8)
BWD = dict(tile=512, warps=4, per_sm=4, stages=3, acc2d=False, joint=True)


@triton.jit
def _tile(P, rows, offs_c, M, C: tl.constexpr):
    """A [BLOCK_R, BLOCK_C] fp32 tile of a [M, C] row-major tensor (zeros outside), its mask and offsets."""
    mask = (rows[:, None] < M) & (offs_c[None, :] < C)
    offs = rows.to(tl.int64)[:, None] * C + offs_c[None, :]
    return tl.load(P + offs, mask=mask, other=0.0).to(tl.float32), mask, offs


@triton.jit
def _row_scale(S, rows, M, N_TOK, alpha, PER_SAMPLE: tl.constexpr):
    """The branch's factor per row: S[row // N_TOK] (per sample), or the constant alpha."""
    if PER_SAMPLE:
        return tl.load(S + rows // N_TOK, mask=rows < M, other=0.0).to(tl.float32)
    return tl.zeros_like(rows.to(tl.float32)) + alpha


@triton.jit
def _add_ln_fwd(X, BR, BB, S, W, B, Y, OUT, MEAN, RSTD, M, N_TOK, alpha, eps, C: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PER_SAMPLE: tl.constexpr, HAS_BB: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    x, mask, offs = _tile(X, rows, offs_c, M, C)
    br, _, _ = _tile(BR, rows, offs_c, M, C)
    if HAS_BB:  # the bias of the Linear that made the branch
        br += tl.load(BB + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
    y = x + br * _row_scale(S, rows, M, N_TOK, alpha, PER_SAMPLE)[:, None]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    y = y.to(Y.dtype.element_ty).to(tl.float32)  # normalise the stream as stored (as the unfused path does)
    mean = tl.sum(y, 1) / C
    d = tl.where(mask, y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / C + eps)
    cm = offs_c < C
    w = tl.load(W + offs_c, mask=cm, other=0.0).to(tl.float32)
    b = tl.load(B + offs_c, mask=cm, other=0.0).to(tl.float32)
    n = d * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(OUT + offs, n.to(OUT.dtype.element_ty), mask=mask)
    rm = rows < M
    tl.store(MEAN + rows, mean, mask=rm)
    tl.store(RSTD + rows, rstd, mask=rm)


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _mul_rn(a, b):
    """a * b rounded to fp32 once, never contracted into an FMA (PTX mul.rn). The backward's g = dn * w feeds both
    its row sum c2 and g - c2: with the product contracted into fma(dn, w, -c2) the two saw different g, and with
    rstd up to 1 / sqrt(eps) (a row of near-constant values; every row at C = 1) that rounding difference came out
    as dx errors of 2-5e-5 relative (H200, 2026-12-05; the sm_90 PTX had the fma)."""
    if _INTERP:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _add_ln_bwd(DY, DN, Y, W, MEAN, RSTD, S, DX, DBR, PART, M, N_TOK, alpha, C: tl.constexpr, ROWS: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_DY: tl.constexpr, PER_SAMPLE: tl.constexpr,
                HAS_BB: tl.constexpr, STAGES: tl.constexpr = 2, ACC2D: tl.constexpr = False,
                JOINT: tl.constexpr = False):
    """Program p: rows [p * ROWS, (p + 1) * ROWS): dx, dbranch; sum dn, sum dn * xhat (and sum dbranch, the
    branch bias's gradient) into PART[p]."""
    p = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    cm = offs_c < C
    w = tl.load(W + offs_c, mask=cm, other=0.0).to(tl.float32)
    if ACC2D:
        s_dn = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        s_dnx = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        s_dbr = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    else:
        s_dn = tl.zeros([BLOCK_C], tl.float32)
        s_dnx = tl.zeros([BLOCK_C], tl.float32)
        s_dbr = tl.zeros([BLOCK_C], tl.float32)
    start = p * ROWS
    end = tl.minimum(start + ROWS, M)
    for i in tl.range(0, ROWS // BLOCK_R, num_stages=STAGES):  # whole row steps (rows past ``end`` masked)
        rows = start + i * BLOCK_R + offs_r
        rm = rows < end
        y, mask, offs = _tile(Y, rows, offs_c, end, C)
        dn, _, _ = _tile(DN, rows, offs_c, end, C)
        mean = tl.load(MEAN + rows, mask=rm, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rm, other=0.0)
        xhat = tl.where(mask, (y - mean[:, None]) * rstd[:, None], 0.0)
        g = _mul_rn(dn, w[None, :])
        if JOINT:  # both row sums in one reduction (one exchange between warps instead of two)
            c1, c2 = tl.reduce((g * xhat, g), 1, _add2)
            c1, c2 = c1 / C, c2 / C
        else:
            c1 = tl.sum(g * xhat, 1) / C
            c2 = tl.sum(g, 1) / C
        dx = tl.where(mask, (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None], 0.0)
        if HAS_DY:
            dy, _, _ = _tile(DY, rows, offs_c, end, C)
            dx += dy
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dbr = dx * _row_scale(S, rows, end, N_TOK, alpha, PER_SAMPLE)[:, None]
        tl.store(DBR + offs, dbr.to(DBR.dtype.element_ty), mask=mask)
        if ACC2D:
            s_dn += dn
            s_dnx += dn * xhat
            if HAS_BB:
                s_dbr += dbr
        else:
            s_dn += tl.sum(dn, 0)
            s_dnx += tl.sum(dn * xhat, 0)
            if HAS_BB:
                s_dbr += tl.sum(dbr, 0)
    if ACC2D:
        s_dn = tl.sum(s_dn, 0)
        s_dnx = tl.sum(s_dnx, 0)
        s_dbr = tl.sum(s_dbr, 0)
    base = PART + p.to(tl.int64) * (3 if HAS_BB else 2) * BLOCK_C
    tl.store(base + offs_c, s_dn)  # slot 0 -> dbias, 1 -> dweight, 2 -> the branch bias's gradient
    tl.store(base + BLOCK_C + offs_c, s_dnx)
    if HAS_BB:
        tl.store(base + 2 * BLOCK_C + offs_c, s_dbr)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _blocks(C, tile):
    block_c = max(16, triton.next_power_of_2(C))
    return max(1, tile // block_c), block_c


def _rows(t, C):
    return t.reshape(-1, C)


def add_ln_forward(x, branch, branch_bias, scale, alpha, weight, bias, eps, out_dtype):
    """(y like x, n [.., C] in out_dtype, mean [M] fp32, rstd [M] fp32). ``scale``: [B] per-sample factors (x is
    [B, N, C]) or None for the constant ``alpha``; ``branch_bias``: [C], added to the branch, or None."""
    C = x.shape[-1]
    xr, brr = _rows(x, C), _rows(branch, C)
    M = xr.shape[0]
    n_tok = M // x.shape[0] if x.dim() > 1 and x.shape[0] else 1
    y = torch.empty_like(x, dtype=torch.promote_types(x.dtype, branch.dtype))
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    block_r, block_c = _blocks(C, FWD["tile"])
    _add_ln_fwd[(triton.cdiv(M, block_r),)](
        xr, brr, branch_bias if branch_bias is not None else weight, scale if scale is not None else mean, weight,
        bias, _rows(y, C), _rows(out, C), mean, rstd, M, n_tok, float(alpha), float(eps), C=C, BLOCK_R=block_r,
        BLOCK_C=block_c, PER_SAMPLE=scale is not None, HAS_BB=branch_bias is not None, num_warps=FWD["warps"])
    return y, out, mean, rstd


def add_ln_backward(dy, dn, y, weight, mean, rstd, scale, alpha, branch_dtype, branch_bias_dtype):
    """(dx like y, dbranch in branch_dtype, dweight like weight, dbias like weight, dbranch_bias [C] in
    branch_bias_dtype, or [0] for None: no branch bias). ``dy`` None: the stream is not used further on (the last
    block's, read only by the final LayerNorm)."""
    C = y.shape[-1]
    yr = _rows(y, C)
    M = yr.shape[0]
    n_tok = M // y.shape[0] if y.dim() > 1 and y.shape[0] else 1
    block_r, block_c = _blocks(C, BWD["tile"])
    progs = max(1, min(triton.cdiv(M, block_r), BWD["per_sm"] * sm_count(y.device)))
    rows = triton.cdiv(triton.cdiv(M, progs), block_r) * block_r
    progs = triton.cdiv(M, rows)
    has_bb = branch_bias_dtype is not None
    part = torch.empty(progs, 3 if has_bb else 2, block_c, device=y.device, dtype=torch.float32)
    dx = torch.empty_like(y)
    dbr = torch.empty(y.shape, device=y.device, dtype=branch_dtype)
    dw = torch.empty_like(weight)
    db = torch.empty_like(weight)
    dbb = torch.empty(C if has_bb else 0, device=y.device, dtype=branch_bias_dtype or torch.float32)
    dn = _rows(dn.contiguous(), C)
    _add_ln_bwd[(progs,)](
        _rows(dy.contiguous(), C) if dy is not None else dn, dn, yr, weight, mean, rstd,
        scale if scale is not None else mean, _rows(dx, C), _rows(dbr, C), part, M, n_tok, float(alpha), C=C,
        ROWS=rows, BLOCK_R=block_r, BLOCK_C=block_c, HAS_DY=dy is not None, PER_SAMPLE=scale is not None,
        HAS_BB=has_bb, STAGES=BWD["stages"], ACC2D=BWD["acc2d"], JOINT=BWD["joint"], num_warps=BWD["warps"])
    sum_partials(part, (db, dw, dbb) if has_bb else (db, dw), C)
    return dx, dbr, dw, db, dbb


def sm90_resources(C: int, M: int = 128 * 197, n_tok: int = 197, branch_dtype=torch.bfloat16) -> dict:
    """The kernels' sm_90 builds at rows of C (an fp32 stream, the branch in ``branch_dtype`` with its Linear's
    bias, per-sample scales, a persistent backward grid of 396 programs as on an H200's 132 SMs), without a GPU (run
    without TRITON_INTERPRET): {"fwd" | "bwd" | "sum": (registers, spilled stack bytes, shared bytes, cp.async
    copies)}."""
    from ._common import aot_sm90

    return {name: aot_sm90(launch) for name, launch in _sm90_launches(C, M, n_tok, branch_dtype).items()}


def sm90_backward_ptx(C: int, M: int = 128 * 197, n_tok: int = 197, branch_dtype=torch.bfloat16) -> str:
    """The PTX of the backward's sm_90 build at rows of C (as sm90_resources builds it; no GPU needed)."""
    from ._common import compile_sm90

    return compile_sm90(_sm90_launches(C, M, n_tok, branch_dtype)["bwd"]).asm["ptx"]


def _sm90_launches(C, M, n_tok, branch_dtype):
    meta = dict(device="meta", dtype=torch.float32)
    x, br = torch.empty(M, C, **meta), torch.empty(M, C, device="meta", dtype=branch_dtype)
    w, rowv, s = torch.empty(C, **meta), torch.empty(M, **meta), torch.empty(M // n_tok, **meta)
    block_r, block_c = _blocks(C, FWD["tile"])
    fwd = (_add_ln_fwd, None, [x, br, w, s, w, w, x, br, rowv, rowv, M, n_tok, 0.5, 1e-6],
           dict(C=C, BLOCK_R=block_r, BLOCK_C=block_c, PER_SAMPLE=True, HAS_BB=True), dict(num_warps=FWD["warps"]))
    block_r = _blocks(C, BWD["tile"])[0]
    progs = BWD["per_sm"] * 132
    rows = triton.cdiv(triton.cdiv(M, progs), block_r) * block_r
    part = torch.empty(progs, 3, block_c, **meta)
    bwd = (_add_ln_bwd, None, [x, br, x, w, rowv, rowv, s, x, br, part, M, n_tok, 0.5],
           dict(C=C, ROWS=rows, BLOCK_R=block_r, BLOCK_C=block_c, HAS_DY=True, PER_SAMPLE=True, HAS_BB=True,
                STAGES=BWD["stages"], ACC2D=BWD["acc2d"], JOINT=BWD["joint"]), dict(num_warps=BWD["warps"]))
    total = (_sum_partials, None, [part, w, w, w], dict(NP=progs, C=C, BLOCK_C=block_c, BLOCK_P=SUM["block_p"],
                                                        CB=min(block_c, SUM["cb"]), SLOTS=3,
                                                        STAGES=SUM.get("stages", 1)),
             dict(num_warps=SUM["warps"]))
    return {"fwd": fwd, "bwd": bwd, "sum": total}


# --------------------------------------------------------------------------------------------
# torch.library ops (torch.compile sees fakes) and the autograd glue
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("tokenlabel::add_ln_fwd", mutates_args=())
def add_ln_fwd_op(x: torch.Tensor, branch: torch.Tensor, branch_bias: Optional[torch.Tensor],
                  scale: Optional[torch.Tensor], alpha: float, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                  out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_ln_forward(x, branch, branch_bias, scale, alpha, weight, bias, eps, out_dtype)


@add_ln_fwd_op.register_fake
def _(x, branch, branch_bias, scale, alpha, weight, bias, eps, out_dtype):
    M = x.numel() // x.shape[-1]
    return (torch.empty_like(x, dtype=torch.promote_types(x.dtype, branch.dtype)),
            x.new_empty(x.shape, dtype=out_dtype), x.new_empty(M, dtype=torch.float32),
            x.new_empty(M, dtype=torch.float32))


@torch.library.custom_op("tokenlabel::add_ln_bwd", mutates_args=())
def add_ln_bwd_op(dy: Optional[torch.Tensor], dn: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                  mean: torch.Tensor, rstd: torch.Tensor, scale: Optional[torch.Tensor], alpha: float,
                  branch_dtype: torch.dtype, branch_bias_dtype: Optional[torch.dtype]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_ln_backward(dy, dn, y, weight, mean, rstd, scale, alpha, branch_dtype, branch_bias_dtype)


@add_ln_bwd_op.register_fake
def _(dy, dn, y, weight, mean, rstd, scale, alpha, branch_dtype, branch_bias_dtype):
    C = y.shape[-1]
    return (torch.empty_like(y), y.new_empty(y.shape, dtype=branch_dtype), torch.empty_like(weight),
            torch.empty_like(weight), y.new_empty(C if branch_bias_dtype is not None else 0,
                                                  dtype=branch_bias_dtype or torch.float32))


class _AddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, branch, branch_bias, scale, alpha, weight, bias, eps, out_dtype, return_stream):
        y, n, mean, rstd = dispatch(torch.ops.tokenlabel.add_ln_fwd, add_ln_forward, x, branch, branch_bias, scale,
                                    alpha, weight, bias, eps, out_dtype, check=(x, branch))
        ctx.save_for_backward(y, weight, mean, rstd, scale)
        ctx.alpha, ctx.branch_dtype, ctx.return_stream = alpha, branch.dtype, return_stream
        ctx.branch_bias_dtype = None if branch_bias is None else branch_bias.dtype
        ctx.set_materialize_grads(False)
        return (y, n) if return_stream else n  # else y is kept for the backward only: no gradient is made for it

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        dy, dn = grads if ctx.return_stream else (None, grads[0])
        y, weight, mean, rstd, scale = ctx.saved_tensors
        has_bb = ctx.branch_bias_dtype is not None
        if dn is None:  # the LayerNorm's output unused: only the stream's gradient flows (dy, or nothing)
            if dy is None:
                return (None,) * 10
            s = scale.view(-1, *[1] * (dy.dim() - 1)) if scale is not None else ctx.alpha
            dbr = dy * s
            dbb = dbr.reshape(-1, dbr.shape[-1]).sum(0).to(ctx.branch_bias_dtype) if has_bb else None
            return dy, dbr.to(ctx.branch_dtype), dbb, *(None,) * 7
        dx, dbr, dw, db, dbb = dispatch(torch.ops.tokenlabel.add_ln_bwd, add_ln_backward, dy, dn, y, weight, mean,
                                        rstd, scale, ctx.alpha, ctx.branch_dtype, ctx.branch_bias_dtype,
                                        check=(dn, y))
        return dx, dbr, dbb if has_bb else None, None, None, dw, db, None, None, None


def check_inputs(x, branch, scale, weight, bias, branch_bias=None):
    if x.shape != branch.shape:
        raise ValueError(f"add_layer_norm: x and branch must have one shape, got {tuple(x.shape)} and "
                         f"{tuple(branch.shape)}")
    if x.dim() < 2:
        raise ValueError(f"add_layer_norm: x must be [B, ..., C], got shape {tuple(x.shape)}")
    for name, t in (("x", x), ("branch", branch)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"add_layer_norm: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    C = x.shape[-1]
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(f"add_layer_norm: weight and bias must be [{C}], got {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)}")
    if branch_bias is not None and (branch_bias.shape != (C,) or branch_bias.dtype not in _DTYPES):
        raise ValueError(f"add_layer_norm: branch_bias must be a float [{C}], got {tuple(branch_bias.shape)} "
                         f"{branch_bias.dtype}")
    if scale is not None and scale.numel() != x.shape[0]:
        raise ValueError(f"add_layer_norm: scale must hold one factor per sample ({x.shape[0]}), got shape "
                         f"{tuple(scale.shape)}")
    if not (x.is_cuda or INTERPRET):
        raise RuntimeError(f"add_layer_norm (Triton) needs CUDA tensors, got {x.device}")
    if C > MAX_C:
        raise ValueError(f"add_layer_norm: rows of {C} > {MAX_C} are not supported")
    if x.numel() == 0:
        raise ValueError(f"add_layer_norm: empty input, shape {tuple(x.shape)}")


def add_layer_norm(x: torch.Tensor, branch: torch.Tensor, norm: torch.nn.LayerNorm, scale=1.0,
                   out_dtype: torch.dtype | None = None, return_stream: bool = True,
                   branch_bias: torch.Tensor | None = None):
    """``y = x + (branch + branch_bias) * scale`` and ``norm(y)``, in one pass (and one pass back): returns ``(y,
    norm(y))``, or ``norm(y)`` alone with ``return_stream=False`` (the last block's stream, read only by the final
    LayerNorm: then the backward has no stream gradient to read, and under torch.compile no zero tensor is made to
    stand for it).

    x and branch: [B, ..., C] (x the residual stream, branch a block's output); ``scale``: a number, or a tensor of
    one factor per sample (drop path's mask over keep over skip_lam, shaped [B] or [B, 1, ..]). ``norm``: an affine
    nn.LayerNorm over the last dimension. ``out_dtype``: the normalised output's dtype (None: y's; under autocast the
    caller passes the autocast dtype where a Linear reads it next). y has x's and branch's promoted dtype.
    ``branch_bias``: [C], the bias of the Linear whose output (computed without it) is the branch: its gradient, the
    branch gradient's sum over rows, then comes out of the same backward pass instead of another read of that
    gradient.
    """
    if not isinstance(norm, torch.nn.LayerNorm) or not norm.elementwise_affine or norm.bias is None \
            or len(norm.normalized_shape) != 1:
        raise ValueError("add_layer_norm: needs an nn.LayerNorm over the last dimension with weight and bias")
    tensor_scale = isinstance(scale, torch.Tensor)
    check_inputs(x, branch, scale if tensor_scale else None, norm.weight, norm.bias, branch_bias)
    if x.shape[-1] != norm.normalized_shape[0]:
        raise ValueError(f"add_layer_norm: rows of {x.shape[-1]} but the LayerNorm is over {norm.normalized_shape[0]}")
    y_dtype = torch.promote_types(x.dtype, branch.dtype)
    s = scale.reshape(-1).to(torch.float32) if tensor_scale else None
    return _AddLayerNorm.apply(x.contiguous(), branch.contiguous(), branch_bias, s,
                               1.0 if tensor_scale else float(scale), norm.weight, norm.bias, float(norm.eps),
                               out_dtype or y_dtype, bool(return_stream))
