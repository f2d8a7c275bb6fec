"""The weight gradient of a stride-1, unpadded convolution over few input channels (the LV-ViT stem's conv1 in its
space-to-depth form): Triton.

Why: in the H200 profile of the compiled LV-ViT-S step with our kernels (bench/results/step-profile-h200-ours,
2026-12-05) conv1's weight gradient ran on one cuDNN kernel (``cutlass__5x_cudnn ... ImplicitGemmConvolution``) for
459 us per step: 52.6 GFLOP at ~115 TFLOP/s, where the stem's other weight gradients run at ~510. In the s2d form
(models.lvvit.conv_stride2_s2d) conv1 is a 4 x 4 stride-1 conv from 16 folded channels to 64: its weight gradient
is a [64, 256] result reduced over all B * 112 * 112 = 1.6M output positions, a shape that needs the reduction split
many ways to fill the GPU, which that kernel does not do well.

The math: dW[co, ky, kx, ci] = sum over (b, oy, ox) of dy[b, oy, ox, co] * x[b, oy + ky, ox + kx, ci] for x
[B, Hp, Wp, CI] and dy [B, Ho, Wo, CO] (channels-last memory), Ho = Hp - KH + 1, Wo = Wp - KW + 1. Each program
takes a run of output rows (b, oy) and, per row, a block of BLOCK_X output columns: the dy tile [BLOCK_X, CO] and the
input's KH window rows as one [BLOCK_X, KH * KW * CI] operand (for a fixed ky the KW * CI values of a window row are
contiguous in x's memory, and neighbouring columns overlap, so most of the operand comes from L1), then one
[CO, BLOCK_X] @ [BLOCK_X, KH * KW * CI] matmul into an fp32 accumulator. The programs' partial sums are added
together in a fixed order (deterministic).

Floor at LV-ViT-S/224, B 128 (bf16): 52.6 GFLOP with the zero taps of the s2d form (~65 us at ~800 TFLOP/s), dy read
once (205 MB, ~43 us at 4.8 TB/s), x's 51 MB once from memory and ~KH times from L2: about 80-130 us.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, compute_dtype, dispatch, sm_count

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERP = tl.constexpr(INTERPRET)
# output columns per step (the matmul's reduction), warps, programs per SM, pipeline stages of the row loop. At the
# stem's conv1 a stage holds 80 KB of shared memory (the [128, 256] window operand and the [128, 64] dy tile), so two
# stages take 160 KB: one program per SM (sm_90 build: 148 registers, no spills, wgmma, 16-byte cp.async copies).
# The H100 sweep (2026-12-05, bench/results/rowkernels-h100/) chose 64 columns per step, 4 warps, 2 programs per SM,
# 2 stages: 180.8 us against 219.6 for the first tiling and 238.2 for cuDNN's kernel at LV-ViT-S/224 B 128.
TILING = dict(block_x=64, warps=4, per_sm=2, stages=2)


@triton.jit
def _conv_wgrad(DY, X, PART, R, Ho, Wo, Hp, Wp, CO: tl.constexpr, CI: tl.constexpr, KH: tl.constexpr,
                KW: tl.constexpr, ROWS: tl.constexpr, NXB: tl.constexpr, BLOCK_X: tl.constexpr,
                BLOCK_CO: tl.constexpr, KK: tl.constexpr, STAGES: tl.constexpr, PREC: tl.constexpr):
    """Program p: output rows [p * ROWS, (p + 1) * ROWS) of the R = B * Ho rows, each in NXB column blocks; its sum
    of dy^T @ window into PART[p] = [BLOCK_CO, KK] (column k = (ky * KW + kx) * CI + ci)."""
    p = tl.program_id(0)
    offs_x = tl.arange(0, BLOCK_X)
    offs_co = tl.arange(0, BLOCK_CO)
    offs_k = tl.arange(0, KK)
    ky = offs_k // (KW * CI)
    rem = offs_k % (KW * CI)  # kx * CI + ci: contiguous in x's memory for a fixed ky
    kmask = offs_k < KH * KW * CI
    acc = tl.zeros([BLOCK_CO, KK], tl.float32)
    for s in tl.range(0, ROWS * NXB, num_stages=STAGES):
        r = p * ROWS + s // NXB
        ox = (s % NXB) * BLOCK_X + offs_x
        xm = (ox < Wo) & (r < R)
        b = r // Ho
        oy = r % Ho
        dy_ptrs = DY + (r.to(tl.int64) * Wo + ox)[:, None] * CO + offs_co[None, :]
        dy = tl.load(dy_ptrs, mask=xm[:, None] & (offs_co[None, :] < CO), other=0.0)
        x_rows = (b * Hp + oy).to(tl.int64) + ky  # [KK]: the input row each column reads
        x_ptrs = X + (x_rows[None, :] * Wp + ox[:, None]) * CI + rem[None, :]
        x = tl.load(x_ptrs, mask=xm[:, None] & kmask[None, :], other=0.0)
        if _INTERP:  # Triton 3.6's interpreter returns garbage for bf16 dots; the products are exact in fp32
            acc = tl.dot(tl.trans(dy.to(tl.float32)), x.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(dy), x, acc, input_precision=PREC)
    out = PART + p.to(tl.int64) * BLOCK_CO * KK + offs_co[:, None] * KK + offs_k[None, :]
    tl.store(out, acc)


def _plan(R, Wo, CO, CI, KH, KW, device, tiling=None, sms=None):
    """(programs, the kernel's constexprs and launch options)."""
    t = tiling or TILING
    block_x = t["block_x"]
    nxb = triton.cdiv(Wo, block_x)
    progs = max(1, min(R, t["per_sm"] * (sms or sm_count(device))))
    rows = triton.cdiv(R, progs)
    progs = triton.cdiv(R, rows)
    const = dict(CO=CO, CI=CI, KH=KH, KW=KW, ROWS=rows, NXB=nxb, BLOCK_X=block_x,
                 BLOCK_CO=max(16, triton.next_power_of_2(CO)), KK=max(16, triton.next_power_of_2(KH * KW * CI)),
                 STAGES=t["stages"], num_warps=t["warps"])
    return progs, const


def check_inputs(dy, x, kh, kw):
    for name, t in (("dy", dy), ("x", x)):
        if t.dim() != 4 or not t.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"conv_weight_grad: {name} must be a channels-last [B, C, H, W] tensor, got shape "
                             f"{tuple(t.shape)} strides {t.stride()}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"conv_weight_grad: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(f"conv_weight_grad: dy and x must share dtype and device, got {dy.dtype} on {dy.device} "
                         f"and {x.dtype} on {x.device}")
    B, CI, Hp, Wp = x.shape
    if not (isinstance(kh, int) and isinstance(kw, int) and 1 <= kh <= Hp and 1 <= kw <= Wp):
        raise ValueError(f"conv_weight_grad: kernel {kh} x {kw} does not fit the {Hp} x {Wp} input")
    want = (B, dy.shape[1], Hp - kh + 1, Wp - kw + 1)
    if tuple(dy.shape) != want:
        raise ValueError(f"conv_weight_grad: dy {tuple(dy.shape)} is not the output of a {kh} x {kw} stride-1 "
                         f"unpadded conv of x {tuple(x.shape)} (expected {want})")
    if not (x.is_cuda or INTERPRET):
        raise RuntimeError(f"conv_weight_grad (Triton) needs CUDA tensors, got {x.device}")
    # one program holds the whole [CO, KH * KW * CI] fp32 accumulator (padded to powers of two) in registers: up
    # to 32K values (128 per thread at 8 warps; the stem's conv1 needs 64 x 256 = 16K)
    acc = max(16, triton.next_power_of_2(dy.shape[1])) * max(16, triton.next_power_of_2(CI * kh * kw))
    if acc > 32768:
        raise ValueError(f"conv_weight_grad: {dy.shape[1]} output channels x {CI * kh * kw} taps x input channels "
                         f"need a {acc}-value accumulator, more than the 32768 one program holds")


def conv_weight_grad(dy: torch.Tensor, x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """``torch.nn.grad.conv2d_weight(x, [CO, CI, kh, kw], dy)`` (stride 1, no padding) as fp32 [CO, CI, kh, kw];
    dy [B, CO, Ho, Wo] and x [B, CI, Hp, Wp] channels-last, same dtype (fp32 accumulation)."""
    check_inputs(dy, x, kh, kw)
    B, CI, Hp, Wp = x.shape
    CO, Ho, Wo = dy.shape[1:]
    R = B * Ho
    progs, const = _plan(R, Wo, CO, CI, kh, kw, x.device)
    part = torch.empty(progs, const["BLOCK_CO"], const["KK"], device=x.device, dtype=torch.float32)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 in, fp32 products; halves: tensor cores either way
    _conv_wgrad[(progs,)](dy, x, part, R, Ho, Wo, Hp, Wp, PREC=prec, **const)
    dw = part.sum(0)[:CO, :kh * kw * CI]
    return dw.view(CO, kh, kw, CI).permute(0, 3, 1, 2).contiguous()


def sm90_resources(B: int = 128, CI: int = 16, CO: int = 64, Hp: int = 115, Wp: int = 115, k: int = 4,
                   dtype=torch.bfloat16, tiling: dict | None = None) -> dict:
    """The kernel's sm_90 build at the LV-ViT stem's conv1 (s2d form) without a GPU (run without TRITON_INTERPRET):
    {"wgrad": (registers, spilled stack bytes, shared bytes, cp.async copies)}."""
    from ._common import aot_sm90

    Ho, Wo = Hp - k + 1, Wp - k + 1
    progs, const = _plan(B * Ho, Wo, CO, CI, k, k, "meta", tiling, sms=132)
    dy = torch.empty(1, device="meta", dtype=dtype)
    part = torch.empty(1, device="meta", dtype=torch.float32)
    opts = dict(num_warps=const.pop("num_warps"))
    const["PREC"] = "tf32"
    return {"wgrad": aot_sm90((_conv_wgrad, None, [dy, dy, part, B * Ho, Ho, Wo, Hp, Wp], const, opts))}


@torch.library.custom_op("tokenlabel::conv_weight_grad", mutates_args=())
def conv_weight_grad_op(dy: torch.Tensor, x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    return conv_weight_grad(dy, x, kh, kw)


@conv_weight_grad_op.register_fake
def _(dy, x, kh, kw):
    return dy.new_empty(dy.shape[1], x.shape[1], kh, kw, dtype=torch.float32)


class _ConvS1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.conv2d(x, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.nn.grad.conv2d_input(x.shape, weight, dy)
        dy = dy.contiguous(memory_format=torch.channels_last)
        kh, kw = weight.shape[-2:]
        dw = dispatch(torch.ops.tokenlabel.conv_weight_grad, conv_weight_grad, dy, x, kh, kw, check=(dy, x))
        return dx, dw.to(weight.dtype)


def conv2d_s1(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight)`` (stride 1, no padding; cuDNN's forward and input gradient) whose weight gradient is
    ``conv_weight_grad``. Under autocast both operands are cast to its dtype first, as F.conv2d would; x
    channels-last (a copy is made otherwise), weight [CO, CI, kh, kw]."""
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"conv2d_s1: x [B, C, H, W] and weight [CO, C, kh, kw] expected, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    dt = compute_dtype(x)
    x = x.to(dt).contiguous(memory_format=torch.channels_last)
    weight = weight.to(dt).contiguous(memory_format=torch.channels_last)
    return _ConvS1.apply(x, weight)
