"""The transformer block's MLP (fc1 + bias + GELU + fc2, fc2's bias left to the residual add as in the step) at
LV-ViT shapes, forward and forward + backward, bf16 autocast with fp32 parameters as in training.

Providers: "ours" (the baseline: what the step runs today, cuBLAS's fc1 without its bias, kernels/bias_gelu.py's
bias + GELU kernel each way, cuBLAS's fc2), "fused" (kernels/linear_gelu.py: fc1's bias + GELU in fc1's GEMM
epilogue, GELU's backward in the epilogue of fc2's input-gradient GEMM; "fused_tma": the same with persistent
programs loading by TMA; "fused_tma_ws": those warp-specialised), "eager" (the modules as written, torch's
GELU). FLOPs: the three GEMMs of each Linear (2 M C H per GEMM), GELU's elementwise work not counted. Bytes: what the
fused path must move at least (x, z, g, y forward; dy, z, g, dh, dx and the weight gradients' inputs backward are
already in the GEMMs' operands, so no separate floor is given: the rows are time and TFLOP/s).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .registry import Case, CheckFailed, Prepared, Skip, register, within

SHAPES = {
    "S224": (dict(B=128, N=197, C=384, H=1152), ("bf16",)),   # LV-ViT-S at 224: 25,216 token rows
    "M224": (dict(B=128, N=197, C=512, H=1536), ("bf16",)),   # LV-ViT-M at 224
    "S384": (dict(B=64, N=577, C=384, H=1152), ("bf16",)),    # LV-ViT-S fine-tuned at 384
}
QUICK_SHAPES = {"tiny": (dict(B=2, N=5, C=24, H=40), ("fp32",))}
MODES = ("fwd", "fwd+bwd")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}
CHECK_ROWS = 2  # samples checked against float64


def _eager(x, w1, b1, w2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2)


def _ours(x, w1, b1, w2):
    from tokenlabel.kernels.bias_gelu import bias_gelu

    return F.linear(bias_gelu(F.linear(x, w1), b1), w2)


def _fused(x, w1, b1, w2):
    from tokenlabel.kernels.linear_gelu import mlp_gelu

    return mlp_gelu(x, w1, b1, w2)


def _prepare(case: Case, fn) -> Prepared:
    if fn is not _eager and case.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise Skip("the Triton kernels run on CUDA (on the CPU only under TRITON_INTERPRET=1)")
    p, dev, dt = case.params, case.device, case.dtype
    B, N, C, H = p["B"], p["N"], p["C"], p["H"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, C, generator=g).to(dev, dt).requires_grad_()  # the LayerNorm's output, in the dtype
    w1 = (torch.randn(H, C, generator=g) * 2 / C ** 0.5).to(dev).requires_grad_()
    b1 = torch.randn(H, generator=g).to(dev).requires_grad_()
    w2 = (torch.randn(C, H, generator=g) / H ** 0.5).to(dev).requires_grad_()
    dy = torch.randn(B, N, C, generator=g).to(dev, dt)
    params = [x, w1, b1, w2]
    amp = dict(device_type=dev.type, dtype=dt, enabled=dt != torch.float32)

    def fwd():
        with torch.no_grad(), torch.autocast(**amp):
            return fn(x, w1, b1, w2)

    def fwd_bwd():
        with torch.autocast(**amp):
            y = fn(x, w1, b1, w2)
        return torch.autograd.grad(y, params, dy)

    def check():
        k = CHECK_ROWS
        xs = x[:k].detach().clone().requires_grad_()
        with torch.autocast(**amp):
            y = fn(xs, w1, b1, w2)
        got = (y, *torch.autograd.grad(y, [xs, w1, b1, w2], dy[:k]))
        d = [t.detach().double().requires_grad_() for t in (xs, w1, b1, w2)]
        y64 = _eager(*d)
        want = (y64, *torch.autograd.grad(y64, d, dy[:k].double()))
        tol = TOLERANCE[dt]
        errors = {}
        for name, a, b in zip(("y", "dx", "dw1", "db1", "dw2"), got, want):
            a, b = a.detach().double(), b.detach().double()
            errors[name] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
        bad = {n: e for n, e in errors.items() if not e <= tol}
        if bad:
            raise CheckFailed(", ".join(f"{n} rel err {e:.3g} > {tol:g} vs float64" for n, e in bad.items()))
        return errors

    gemm = 2.0 * B * N * C * H
    return Prepared(modes={"fwd": fwd, "fwd+bwd": fwd_bwd}, check=check, flops={"fwd": 2 * gemm, "fwd+bwd": 6 * gemm},
                    notes="autocast in the case's dtype, fp32 parameters; fc2 without its bias (folded into the "
                          "residual add in the step); fwd under no_grad")


@register("mlp", "ours", baseline=True)
def ours(case: Case) -> Prepared:
    """cuBLAS's fc1 (no bias), kernels/bias_gelu.py each way, cuBLAS's fc2: the step's MLP today."""
    return _prepare(case, _ours)


@register("mlp", "fused")
def fused(case: Case) -> Prepared:
    """kernels/linear_gelu.py: bias + GELU in fc1's GEMM epilogue, GELU's backward in fc2's input-gradient GEMM."""
    return _prepare(case, _fused)


@register("mlp", "fused_tma")
def fused_tma(case: Case) -> Prepared:
    """"fused" with both GEMMs as persistent programs loading their operands by TMA (linear_gelu impl="tma")."""
    from tokenlabel.kernels import linear_gelu as lg

    return within(_prepare(case, _fused), lambda: lg.use_impl("tma"), "linear_gelu impl: tma")


@register("mlp", "fused_tma_ws")
def fused_tma_ws(case: Case) -> Prepared:
    """"fused_tma" warp-specialised (linear_gelu.use_ws: a producer warp group loading by TMA, two consumer warp
    groups computing and running the epilogue)."""
    from tokenlabel.kernels import linear_gelu as lg

    return within(_prepare(case, _fused), lg.use_ws, f"linear_gelu warp-specialised: {lg.WS_TILING}")


@register("mlp", "eager")
def eager(case: Case) -> Prepared:
    """The modules as written (F.linear with bias, F.gelu, F.linear), eager."""
    return _prepare(case, _eager)
