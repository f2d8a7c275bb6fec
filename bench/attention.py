"""Multi-head attention per backend of tokenlabel.models ("math" the baseline, "sdpa", "xformers",
"triton", "auto") at LV-ViT shapes: forward (under no_grad) and forward + backward.

Every backend runs the model's path, ``attention_qkv`` on one ``[B, N, 3 * H * Dh]`` tensor as the fused
qkv Linear makes it, and forward + backward ends with that tensor's gradient (for "sdpa" and "xformers"
that includes the stack of dq, dk, dv; "triton" writes it whole). FLOPs: forward 4·B·H·N²·Dh (two
matmuls), backward 2.5× that.
"""
from __future__ import annotations

import os

import torch

from .registry import Case, CheckFailed, Prepared, Skip, register, within

SHAPES = {
    "S224": (dict(B=128, N=197, H=6, Dh=64), ("bf16", "fp32")),    # LV-ViT-S at 224
    "M224": (dict(B=128, N=197, H=8, Dh=64), ("bf16", "fp32")),    # LV-ViT-M at 224
    "S384": (dict(B=128, N=577, H=6, Dh=64), ("bf16", "fp32")),    # LV-ViT-S at 384
    "M384": (dict(B=128, N=577, H=8, Dh=64), ("bf16", "fp32")),    # LV-ViT-M at 384
}
QUICK_SHAPES = {"tiny": (dict(B=2, N=17, H=2, Dh=16), ("fp32",))}
TOLERANCE = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
CHECK_BATCH = 2


def _attention():
    try:
        from tokenlabel.models.attention import attention_qkv, prepare_backend, xformers_status
    except Exception as e:  # noqa: BLE001
        raise Skip(f"tokenlabel.models.attention not importable: {type(e).__name__}: {e}")
    return attention_qkv, prepare_backend, xformers_status


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _prepare(case: Case, backend: str) -> Prepared:
    attention_qkv, prepare_backend, xformers_status = _attention()
    p, dtype, dev = case.params, case.dtype, case.device
    if backend == "xformers":
        ok, reason = xformers_status(dev)
        if not ok:
            raise Skip(reason)
    if backend == "triton":
        if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise Skip("attn='triton' runs on CUDA (on the CPU only under TRITON_INTERPRET=1)")
        try:
            prepare_backend("triton")
        except RuntimeError as e:
            raise Skip(str(e))
    B, N, H, Dh = p["B"], p["N"], p["H"], p["Dh"]
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, N, 3 * H * Dh, generator=g).to(dev, dtype).requires_grad_()
    gout = torch.randn(B, N, H * Dh, generator=g).to(dev, dtype)
    notes = ""
    if backend == "auto":
        from tokenlabel.models.attention import select_backend

        chosen = {grad: select_backend((B, N, H, Dh), dtype, dev, grad=grad) for grad in (False, True)}
        notes = f"auto chose {chosen[False]} (fwd), {chosen[True]} (fwd+bwd)"

    def fwd():
        with torch.no_grad():
            return attention_qkv(qkv, H, backend)

    def fwd_bwd():
        out = attention_qkv(qkv, H, backend)
        return torch.autograd.grad(out, qkv, gout)

    def check():
        # against "math" in float64 on the first samples: output and the gradient of q, k, v
        x = qkv[:CHECK_BATCH].detach().clone().requires_grad_()
        x64 = x.detach().double().requires_grad_()
        go = gout[:CHECK_BATCH]
        out = attention_qkv(x, H, backend)
        (gx,) = torch.autograd.grad(out, x, go)
        ref = attention_qkv(x64, H, "math")
        (gref,) = torch.autograd.grad(ref, x64, go.double())
        errors = {"out": _rel(out, ref), "grad_qkv": _rel(gx, gref)}
        tol = TOLERANCE[dtype]
        bad = {k: v for k, v in errors.items() if not v <= tol}
        if bad:
            raise CheckFailed(", ".join(f"{k} rel err {v:.3g} > {tol:g} vs math float64" for k, v in bad.items()))
        return errors

    flops = 4.0 * B * H * N * N * Dh
    return Prepared(modes={"fwd": fwd, "fwd+bwd": fwd_bwd}, check=check,
                    flops={"fwd": flops, "fwd+bwd": 3.5 * flops}, notes=notes + ("; " if notes else "")
                    + "fwd under no_grad; FLOPs 4BHN^2Dh fwd, x3.5 fwd+bwd")


@register("attention", "math", baseline=True)
def math_(case: Case) -> Prepared:
    """The reference's plain softmax(q k^T) v."""
    return _prepare(case, "math")


@register("attention", "sdpa")
def sdpa(case: Case) -> Prepared:
    """torch scaled_dot_product_attention (PyTorch picks cuDNN / flash / memory-efficient)."""
    return _prepare(case, "sdpa")


@register("attention", "xformers")
def xformers(case: Case) -> Prepared:
    """xformers.ops.memory_efficient_attention ([B, N, H, Dh] layout, no transposes)."""
    return _prepare(case, "xformers")


@register("attention", "triton")
def triton_(case: Case) -> Prepared:
    """Our Triton flash attention (kernels/flash_attention.py): qkv read by strides, its gradient written whole;
    the split backward (query-block and key-block programs), whatever "auto" measured."""
    prep = _prepare(case, "triton")
    from tokenlabel.kernels import flash_attention as fa

    return within(prep, lambda: fa.use_bwd_impl("split"), "attention backward: split")


@register("attention", "triton_head")
def triton_head(case: Case) -> Prepared:
    """The same forward; the per-head backward (5 matmuls per block pair, dq in fp32 scratch, no atomics)."""
    prep = _prepare(case, "triton")
    from tokenlabel.kernels import flash_attention as fa

    return within(prep, lambda: fa.use_bwd_impl("head"), "attention backward: one program per head")


@register("attention", "triton_split2")
def triton_split2(case: Case) -> Prepared:
    """The same forward; split's two program kinds as two launches (dq, then dk dv), each with its own tiling."""
    prep = _prepare(case, "triton")
    from tokenlabel.kernels import flash_attention as fa

    return within(prep, lambda: fa.use_bwd_impl("split2"), "attention backward: split2")


def _tma_case(case: Case) -> None:
    """Skip where flash_attention.tma_ready refuses the case's inputs (the pointer kernels would run: their rows are
    triton's)."""
    from tokenlabel.kernels import flash_attention as fa

    B, N, H, Dh = (case.params[k] for k in ("B", "N", "H", "Dh"))
    q, k, v = torch.empty(B, N, 3, H, Dh, device="meta", dtype=case.dtype).unbind(2)  # the model's packed qkv
    o = torch.empty(B, N, H, Dh, device="meta", dtype=case.dtype)
    if not fa.tma_ready(q, k, v, o, o):
        raise Skip(f"the tma kernels take half-precision heads of 16-128 (here {case.dtype}, Dh {Dh}: the pointer "
                   "kernels run, as in triton's rows)")


@register("attention", "triton_tma")
def triton_tma(case: Case) -> Prepared:
    """Our attention's TMA kernels: the forward and the backward (two launches: dq with the row sums, then dk dv)
    as persistent programs loading by TMA (half-precision heads of 16-128 only)."""
    _tma_case(case)
    prep = _prepare(case, "triton")
    from tokenlabel.kernels import flash_attention as fa

    return within(prep, fa.use_tma, "attention forward and backward: tma")


@register("attention", "triton_tma_ws")
def triton_tma_ws(case: Case) -> Prepared:
    """triton_tma with flash_attention.TMA_WS: the forward warp-specialised (a producer warp group loading, consumer
    warp groups computing), the backward plain (Triton 3.6 builds neither backward kernel right that way)."""
    _tma_case(case)
    prep = _prepare(case, "triton")
    from tokenlabel.kernels import flash_attention as fa

    return within(prep, lambda: fa.use_tma(fa.TMA_WS), f"attention forward and backward: tma, {fa.TMA_WS}")


@register("attention", "auto")
def auto(case: Case) -> Prepared:
    """The model's "auto": fastest backend measured once per shape and cached."""
    return _prepare(case, "auto")


def yardsticks(device, quick: bool, context: dict) -> list[dict]:
    """Per (shape, dtype, mode): "auto" p50 time / the fastest concrete backend's (goal: <= 1.03)."""
    rows = [r for r in context.get("current", []) if r.get("metric") == "ms" and r.get("p50")]
    out = []
    for key in dict.fromkeys((r["shape"], r["dtype"], r["mode"]) for r in rows):
        same = [r for r in rows if (r["shape"], r["dtype"], r["mode"]) == key]
        auto = next((r for r in same if r["provider"] == "auto"), None)
        others = [r for r in same if r["provider"] != "auto"]
        if auto is None or not others:
            continue
        best = min(others, key=lambda r: r["p50"])
        out.append(dict(provider="auto", mode=key[2], shape=key[0], dtype=key[1], metric="auto_vs_fastest",
                        p50=auto["p50"] / best["p50"], unit="x",
                        notes=f"auto p50 / fastest backend p50 ({best['provider']}); 1.0 = auto picked the fastest"))
    return out
