"""GELU (exact, erf) of a Linear's output plus its bias, forward and backward: Triton.

Why: in the H200 profile of the compiled LV-ViT-S step (models/NOTES.md, kernels/NOTES.md) GELU costs 2.03 ms: per
block the forward `triton_poi_fused_gelu_view` 44.6 us (fc1's output read, GELU's written: 116 MB, ~54% of the
bandwidth), the backward `triton_poi_fused_gelu_gelu_backward_view` 60.8 us (GELU recomputed for fc2's weight
gradient beside GELU': reads dY and fc1's output, writes both) and `triton_red_fused_gelu_gelu_backward_sum_view`
19.3 us (fc1's bias gradient, the same inputs read again).

What one call does, for h = x @ W1^T computed without fc1's bias (the MLP's hidden pre-activation, [M, N]):
Forward: g = GELU(h + b) = 0.5 * z * (1 + erf(z / sqrt 2)), z = h + b, written in h's dtype; h is kept for the
backward (g too, by fc2's GEMM, which saves its input: the backward does not recompute it).
Backward, given dg: dh = dg * GELU'(z), GELU'(z) = Phi(z) + z * phi(z); db = sum over rows of dh (fp32 partials
per program, summed by ``batchnorm.sum_partials``).

Bytes per call at LV-ViT-S/224, B 128 (M = 25,216, N = 1,152, bf16): forward h in, g out: 116 MB (24 us at 4.8
TB/s); backward dg and h in, dh out: 174 MB (36 us). Instructions (sm_90 builds) with libdevice's erf: 39.5 per element
forward, 52.6 per element backward: at the SMs' issue rate (132 SMs x 4 warp-instructions per cycle at 1.98 GHz)
34 us and 45 us, as long as the bytes take or longer; the H200 measured 44.6 us and 60.3 us. So these kernels are
issue-bound as much as memory-bound, and ``cdf="erfcx"`` (_phi: one fitted polynomial, the SFU's reciprocal and
exp2, one exp shared by Phi and phi) brings them to 26.5 and 32.8 instructions per element (prediction: ~30 and ~42
us on the H200, -0.5 ms per step; less on an H100, whose bytes take 1.4x longer). It is also the more accurate of
the two in Phi's tail, where 0.5 * (1 + erf) cancels (tests/test_kernels_bias_gelu.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, dispatch, overriding, sm_count
from .batchnorm import sum_partials

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERP = tl.constexpr(INTERPRET)
# Tiling. Forward: rows x columns per program, warps. Backward: rows x columns per loop step, warps, programs per SM
# over all column blocks (all resident, one wave), the row loop's pipeline stages, and whether the bias-gradient
# column sums are kept as [rows, cols] accumulators reduced once at the end (acc2d) instead of every step. The
# backward's values come from scripts/sweep_rowkernels.py on an H200 (2026-12-05, CUDA graphs, LV-ViT-S's MLP,
# B 128): 60.3 us per call (bytes floor 36 us) against 105.5 us for the first tiling (32 x 128, 8 warps, 3 per SM,
# 2 stages, the column sums reduced across warps every step).
# ``cdf``: how Phi(z) (and, backward, phi(z)) are computed: "erf" (libdevice's erff, and a separate exp backward) or
# "erfcx" (one fitted erfcx polynomial and one exp for both; _phi below). The H100 sweep (2026-12-05,
# bench/results/rowkernels-h100/): forward erf 47.6 -> erfcx 42.3 us; backward erf 66.8, erfcx 69.3 us (kept erf).
FWD = dict(rows=32, cols=128, warps=8, cdf="erfcx")
BWD = dict(rows=8, cols=128, warps=2, per_sm=8, stages=3, acc2d=True, cdf="erf")
CDFS = ("erf", "erfcx")
# erfcx(t) = erfc(t) * exp(t^2) ~ sum_k ERFCX[k-1] * u^k with u = 1 / (1 + t / 2), k = 1..9, t in [0, inf): a
# weighted least-squares fit to float64's erfcx on [0, 10] (relative error 4.4e-8; fp32 evaluation 3.6e-7). Exact for
# t -> inf in form (erfcx(t) ~ 1 / (t sqrt(pi)), u ~ 2 / t: the linear term carries it).
ERFCX = (0.2820863375, 0.2823769392, 0.243090075, 0.2027488716, -0.02679174406, 0.2783374737, -0.4874620902,
         0.284714135, -0.05910004169)


def use_cdf(cdf: str):
    """Within the block (``with use_cdf(...)``) both kernels compute Phi by ``cdf`` (one of CDFS), whatever FWD /
    BWD say."""
    return overriding((FWD, BWD), "cdf", cdf, CDFS, "erf")


@triton.jit
def _rcp(x):
    """1 / x by the SFU alone (rcp.approx.ftz: ~1 ulp; no range fix-ups, which a division adds: ~8 instructions)."""
    if _INTERP:
        return 1.0 / x
    else:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _exp2(x):
    """2^x by the SFU alone (ex2.approx.ftz: results below 2^-126 flush to 0; tl.exp2 adds ~4 instructions to keep
    them)."""
    if _INTERP:
        return tl.exp2(x)
    else:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _phi(z, CDF: tl.constexpr):
    """(Phi(z), exp(-z^2 / 2)) in fp32. CDF "erf": 0.5 * (1 + erf(z / sqrt 2)) by libdevice (its erff selects one of
    two coefficient sets per element: ~25 instructions with the selects) and exp separately. "erfcx": with t =
    |z| / sqrt 2 and e = exp(-t^2) = exp(-z^2 / 2), Phi(-|z|) = erfc(t) / 2 = erfcx(t) * e / 2 from ERFCX's polynomial
    in u (one reciprocal, 9 FMAs), Phi(z) = 1 - that for z >= 0; e serves phi too. Against float64 over z in
    [-14, 14] (fp32 evaluation): Phi's relative error <= 1.4e-5 where Phi > 1e-30 (from exp's argument t^2 in the far
    tail; <= 4e-7 for z > -6), GELU's absolute error <= 3.9e-7, GELU' <= 2.2e-7."""
    if CDF == "erf":
        return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)), tl.exp(-0.5 * z * z)
    else:
        t = tl.abs(z) * 0.7071067811865476
        u = _rcp(1.0 + 0.5 * t)
        # Horner on ERFCX / 2 (the 1/2 of Phi(-|z|) = erfc(t) / 2 folded into the coefficients)
        q = -0.029550020845 * u
        q = (q + 0.1423570675) * u
        q = (q + -0.2437310451) * u
        q = (q + 0.13916873685) * u
        q = (q + -0.01339587203) * u
        q = (q + 0.1013744358) * u
        q = (q + 0.1215450375) * u
        q = (q + 0.1411884696) * u
        q = (q + 0.14104316875) * u
        e = _exp2(t * (t * -1.4426950408889634))  # exp(-t^2)
        tail = q * e
        return tl.where(z >= 0, 1.0 - tail, tail), e


@triton.jit
def _tile(P, rows, cols, M, N):
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    return tl.load(P + offs, mask=mask, other=0.0).to(tl.float32), mask, offs


@triton.jit
def _bias_gelu_fwd(H, B, G, M, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, CDF: tl.constexpr = "erf"):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    h, mask, offs = _tile(H, rows, cols, M, N)
    z = h + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if CDF == "erf":
        g = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:
        cdf, _ = _phi(z, CDF)
        g = z * cdf
    tl.store(G + offs, g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd(DG, H, B, DH, PART, M, N, ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                   N_PAD: tl.constexpr, STAGES: tl.constexpr = 2, ACC2D: tl.constexpr = False,
                   CDF: tl.constexpr = "erf"):
    """Program (p, j): rows [p * ROWS, (p + 1) * ROWS) of column block j: dh; sum of dh per column into PART[p]."""
    p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)
    if ACC2D:
        s_db = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    else:
        s_db = tl.zeros([BLOCK_N], tl.float32)
    start = p * ROWS
    end = tl.minimum(start + ROWS, M)
    for i in tl.range(0, ROWS // BLOCK_R, num_stages=STAGES):  # whole row steps (rows past ``end`` masked)
        rows = start + i * BLOCK_R + tl.arange(0, BLOCK_R)
        h, mask, offs = _tile(H, rows, cols, end, N)
        dg, _, _ = _tile(DG, rows, cols, end, N)
        z = h + b[None, :]
        cdf, e = _phi(z, CDF)
        dh = tl.where(mask, dg * (cdf + z * (e * 0.3989422804014327)), 0.0)
        tl.store(DH + offs, dh.to(DH.dtype.element_ty), mask=mask)
        if ACC2D:
            s_db += dh
        else:
            s_db += tl.sum(dh, 0)
    if ACC2D:
        s_db = tl.sum(s_db, 0)
    tl.store(PART + p.to(tl.int64) * N_PAD + cols, s_db)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _rows(t):
    return t.reshape(-1, t.shape[-1])


def bias_gelu_forward(h, bias):
    hr = _rows(h)
    M, N = hr.shape
    g = torch.empty_like(h)
    r, c = FWD["rows"], FWD["cols"]
    _bias_gelu_fwd[(triton.cdiv(M, r), triton.cdiv(N, c))](hr, bias, _rows(g), M, N, BLOCK_R=r, BLOCK_N=c,
                                                           CDF=FWD.get("cdf", "erf"), num_warps=FWD["warps"])
    return g


def _bwd_grid(M, N, sms):
    """(row programs, rows per program): BWD["per_sm"] programs per SM over all column blocks, each a run of whole
    row steps."""
    col_blocks = triton.cdiv(N, BWD["cols"])
    step = BWD["rows"]
    progs = max(1, min(triton.cdiv(M, step), triton.cdiv(BWD["per_sm"] * sms, col_blocks)))
    rows = triton.cdiv(triton.cdiv(M, progs), step) * step
    return triton.cdiv(M, rows), rows


def bias_gelu_backward(dg, h, bias):
    """(dh like h, dbias like bias)."""
    hr = _rows(h)
    M, N = hr.shape
    progs, rows = _bwd_grid(M, N, sm_count(h.device))
    c = BWD["cols"]
    n_pad = triton.cdiv(N, c) * c
    part = torch.empty(progs, 1, n_pad, device=h.device, dtype=torch.float32)
    dh = torch.empty_like(h)
    db = torch.empty_like(bias)
    _bias_gelu_bwd[(progs, triton.cdiv(N, c))](_rows(dg.contiguous()), hr, bias, _rows(dh), part, M, N, ROWS=rows,
                                               BLOCK_R=BWD["rows"], BLOCK_N=c, N_PAD=n_pad, STAGES=BWD["stages"],
                                               ACC2D=BWD["acc2d"], CDF=BWD.get("cdf", "erf"), num_warps=BWD["warps"])
    sum_partials(part, (db,), N)
    return dh, db


def sm90_resources(M: int = 128 * 197, N: int = 1152, dtype=torch.bfloat16, cdf: str | None = None) -> dict:
    """The kernels' sm_90 builds at LV-ViT-S's MLP shape, without a GPU (run without TRITON_INTERPRET):
    {"fwd" | "bwd": (registers, spilled stack bytes, shared bytes, cp.async copies)}; ``cdf`` overrides FWD's and
    BWD's."""
    from ._common import aot_sm90

    h = torch.empty(M, N, device="meta", dtype=dtype)
    b = torch.empty(N, device="meta", dtype=torch.float32)
    c = BWD["cols"]
    n_pad = triton.cdiv(N, c) * c
    progs, rows = _bwd_grid(M, N, 132)  # an H200's SMs
    part = torch.empty(progs, n_pad, device="meta", dtype=torch.float32)
    fwd = (_bias_gelu_fwd, None, [h, b, h, M, N],
           dict(BLOCK_R=FWD["rows"], BLOCK_N=FWD["cols"], CDF=cdf or FWD.get("cdf", "erf")),
           dict(num_warps=FWD["warps"]))
    bwd = (_bias_gelu_bwd, None, [h, h, b, h, part, M, N],
           dict(ROWS=rows, BLOCK_R=BWD["rows"], BLOCK_N=c, N_PAD=n_pad, STAGES=BWD["stages"], ACC2D=BWD["acc2d"],
                CDF=cdf or BWD.get("cdf", "erf")), dict(num_warps=BWD["warps"]))
    return {"fwd": aot_sm90(fwd), "bwd": aot_sm90(bwd)}


# --------------------------------------------------------------------------------------------
# torch.library ops (torch.compile sees fakes) and the autograd glue
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("tokenlabel::bias_gelu_fwd", mutates_args=())
def bias_gelu_fwd_op(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return bias_gelu_forward(h, bias)


@bias_gelu_fwd_op.register_fake
def _(h, bias):
    return torch.empty_like(h)


@torch.library.custom_op("tokenlabel::bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd_op(dg: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return bias_gelu_backward(dg, h, bias)


@bias_gelu_bwd_op.register_fake
def _(dg, h, bias):
    return torch.empty_like(h), torch.empty_like(bias)


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, bias):
        ctx.save_for_backward(h, bias)
        return dispatch(torch.ops.tokenlabel.bias_gelu_fwd, bias_gelu_forward, h, bias, check=(h,))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dg):
        h, bias = ctx.saved_tensors
        return dispatch(torch.ops.tokenlabel.bias_gelu_bwd, bias_gelu_backward, dg, h, bias, check=(dg, h))


def bias_gelu(h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.gelu(h + bias)`` (exact GELU) in one pass each way; h: [..., N] (a Linear's output computed without its
    bias), bias: [N]. The result has h's dtype; the bias's gradient comes out of the same backward pass."""
    if h.dim() < 1 or h.numel() == 0:
        raise ValueError(f"bias_gelu: h must be a non-empty [..., N] tensor, got shape {tuple(h.shape)}")
    if h.dtype not in _DTYPES or bias.dtype not in _DTYPES:
        raise ValueError(f"bias_gelu: h and bias must be float16, bfloat16 or float32, got {h.dtype}, {bias.dtype}")
    if bias.shape != (h.shape[-1],):
        raise ValueError(f"bias_gelu: bias must be [{h.shape[-1]}], got {tuple(bias.shape)}")
    if not (h.is_cuda or INTERPRET):
        raise RuntimeError(f"bias_gelu (Triton) needs CUDA tensors, got {h.device}")
    return _BiasGelu.apply(h.contiguous(), bias)
