"""The transformer block's memory-bound pieces, kernel by kernel, at LV-ViT shapes: the residual add + LayerNorm
(``add_ln``: y = x + (branch + bias) * s, n = LayerNorm(y) in bf16, the stream in fp32, as under autocast) and
fc1's bias + GELU (``gelu``: g = GELU(h + b)), forward and forward + backward.

Providers: "compiled" (the baseline: the same math as plain torch ops under torch.compile, i.e. inductor's
kernels, which the compiled training step uses today), "eager" (those ops without compile), "triton"
(kernels/add_layernorm.py, kernels/bias_gelu.py). GB/s from the bytes each mode must move at least (every input
read once, every output written once; the per-sample scales, biases and statistics are noise):
add_ln fwd x, branch in, y, n out; fwd+bwd also dy, dn, y in, dx, dbranch out; gelu fwd h in, g out; fwd+bwd also
dg, h in, dh out. Floors at 4.8 TB/s are in kernels/NOTES.md.
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
MODES = ("add_ln fwd", "add_ln fwd+bwd", "gelu fwd", "gelu fwd+bwd")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}
CHECK_ROWS = 2  # samples checked against float64


def _inputs(case: Case):
    p, dt, dev = case.params, case.dtype, case.device
    B, N, C, H = p["B"], p["N"], p["C"], p["H"]
    g = torch.Generator().manual_seed(0)
    stream = torch.float32  # the residual stream stays fp32 under autocast

    def rand(*shape, dtype=dt, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)

    t = dict(x=rand(B, N, C, dtype=stream).requires_grad_(), branch=rand(B, N, C).requires_grad_(),
             bb=rand(C, dtype=torch.float32, scale=0.1).requires_grad_(),
             s=((torch.rand(B, generator=g) < 0.9).float() / 0.9 / 2).to(dev),  # drop path over skip_lam 2
             dy=rand(B, N, C, dtype=stream), dn=rand(B, N, C),
             h=rand(B, N, H, scale=2.0).requires_grad_(), hb=rand(H, dtype=torch.float32).requires_grad_(),
             dg=rand(B, N, H))
    norm = torch.nn.LayerNorm(C).to(dev)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(C, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(C, generator=g) * 0.1)
    return t, norm


def _torch_add_ln(x, branch, bb, s, norm, out_dtype):
    y = torch.addcmul(x, branch + bb, s.view(-1, 1, 1))
    return y, F.layer_norm(y, y.shape[-1:], norm.weight, norm.bias, norm.eps).to(out_dtype)


def _torch_gelu(h, hb):
    return F.gelu(h + hb).to(h.dtype)


def _triton_add_ln(x, branch, bb, s, norm, out_dtype):
    from tokenlabel.kernels.add_layernorm import add_layer_norm

    return add_layer_norm(x, branch, norm, s.view(-1, 1, 1), out_dtype, branch_bias=bb)


def _triton_gelu(h, hb):
    from tokenlabel.kernels.bias_gelu import bias_gelu

    return bias_gelu(h, hb)


_COMPILED: dict = {}


def _functions(kind: str):
    if kind == "triton":
        return _triton_add_ln, _triton_gelu
    if kind == "eager":
        return _torch_add_ln, _torch_gelu
    if "fns" not in _COMPILED:
        _COMPILED["fns"] = (torch.compile(_torch_add_ln, dynamic=False), torch.compile(_torch_gelu, dynamic=False))
    return _COMPILED["fns"]


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def _prepare(case: Case, kind: str) -> Prepared:
    if kind == "triton" and case.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise Skip("the Triton kernels run on CUDA (on the CPU only under TRITON_INTERPRET=1)")
    if kind == "compiled" and case.device.type != "cuda" and not case.quick:
        raise Skip("torch.compile runs on CUDA here (on the CPU only for --quick)")
    t, norm = _inputs(case)
    add_ln, gelu = _functions(kind)
    out_dtype = case.dtype
    ln_params = [norm.weight, norm.bias]

    def ln_fwd():
        with torch.no_grad():
            return add_ln(t["x"], t["branch"], t["bb"], t["s"], norm, out_dtype)

    def ln_fwd_bwd():
        y, n = add_ln(t["x"], t["branch"], t["bb"], t["s"], norm, out_dtype)
        return torch.autograd.grad((y, n), [t["x"], t["branch"], t["bb"], *ln_params], (t["dy"], t["dn"]))

    def gelu_fwd():
        with torch.no_grad():
            return gelu(t["h"], t["hb"])

    def gelu_fwd_bwd():
        return torch.autograd.grad(gelu(t["h"], t["hb"]), [t["h"], t["hb"]], t["dg"])

    def check():
        # the first samples against the same math in float64: outputs and every gradient
        k = CHECK_ROWS
        sl = {n: (v[:k].detach().clone().requires_grad_(v.requires_grad) if v.dim() == 3 else v)
              for n, v in t.items()}
        sl["s"] = t["s"][:k]
        norm64 = torch.nn.LayerNorm(norm.normalized_shape[0]).to(case.device, torch.float64)
        norm64.load_state_dict(norm.state_dict())
        got_ln = add_ln(sl["x"], sl["branch"], t["bb"], sl["s"], norm, out_dtype)
        got_ln_g = torch.autograd.grad(got_ln, [sl["x"], sl["branch"], t["bb"], *ln_params], (sl["dy"], sl["dn"]))
        d = {n: v.detach().double().requires_grad_(v.requires_grad) for n, v in sl.items()}
        bb64 = t["bb"].detach().double().requires_grad_()
        want_ln = _torch_add_ln(d["x"], d["branch"], bb64, d["s"], norm64, torch.float64)
        want_ln_g = torch.autograd.grad(want_ln, [d["x"], d["branch"], bb64, norm64.weight, norm64.bias],
                                        (d["dy"], d["dn"]))
        got_g = gelu(sl["h"], t["hb"])
        got_g_g = torch.autograd.grad(got_g, [sl["h"], t["hb"]], sl["dg"])
        hb64 = t["hb"].detach().double().requires_grad_()
        want_g = F.gelu(d["h"] + hb64)
        want_g_g = torch.autograd.grad(want_g, [d["h"], hb64], d["dg"])
        names = ("y", "n", "dx", "dbranch", "dbias_branch", "dweight", "dbias", "g", "dh", "dbias_fc1")
        errors = {name: _rel(a, b) for name, a, b in zip(
            names, (*got_ln, *got_ln_g, got_g, *got_g_g), (*want_ln, *want_ln_g, want_g, *want_g_g))}
        tol = TOLERANCE[case.dtype]
        bad = {n: e for n, e in errors.items() if not e <= tol}
        if bad:
            raise CheckFailed(", ".join(f"{n} rel err {e:.3g} > {tol:g} vs float64" for n, e in bad.items()))
        return errors

    p = case.params
    rows, C, H = p["B"] * p["N"], p["C"], p["H"]
    half = torch.finfo(case.dtype).bits // 8
    ln_fwd_bytes = rows * C * (4 + half + 4 + half)             # x, branch in; y, n out
    ln_bwd_bytes = rows * C * (4 + half + 4 + 4 + half)         # dy, dn, y in; dx, dbranch out
    gelu_fwd_bytes = rows * H * 2 * half                        # h in, g out
    gelu_bwd_bytes = rows * H * 3 * half                        # dg, h in, dh out
    return Prepared(modes={"add_ln fwd": ln_fwd, "add_ln fwd+bwd": ln_fwd_bwd, "gelu fwd": gelu_fwd,
                           "gelu fwd+bwd": gelu_fwd_bwd}, check=check,
                    bytes={"add_ln fwd": ln_fwd_bytes, "add_ln fwd+bwd": ln_fwd_bytes + ln_bwd_bytes,
                           "gelu fwd": gelu_fwd_bytes, "gelu fwd+bwd": gelu_fwd_bytes + gelu_bwd_bytes},
                    notes="fwd under no_grad; bytes: each input read once, each output written once; the stream "
                          "fp32, branch / n / h / g in the case's dtype")


@register("blocks", "compiled", baseline=True)
def compiled(case: Case) -> Prepared:
    """The same math as plain torch ops under torch.compile (inductor's kernels, as in the compiled step)."""
    return _prepare(case, "compiled")


@register("blocks", "eager")
def eager(case: Case) -> Prepared:
    """The same math as plain torch ops, eager."""
    return _prepare(case, "eager")


@register("blocks", "triton")
def triton_(case: Case) -> Prepared:
    """kernels/add_layernorm.py and kernels/bias_gelu.py: one pass each way."""
    return _prepare(case, "triton")


@register("blocks", "triton_erfcx")
def triton_erfcx(case: Case) -> Prepared:
    """kernels/bias_gelu.py with Phi from the fitted erfcx (cdf="erfcx": 26.5 / 32.8 instructions per element
    against erf's 39.5 / 52.6 in the sm_90 builds); the GELU modes only (add_ln is the "triton" provider's)."""
    prep = _prepare(case, "triton")
    prep.modes = {m: fn for m, fn in prep.modes.items() if m.startswith("gelu")}
    from tokenlabel.kernels import bias_gelu as bg

    return within(prep, lambda: bg.use_cdf("erfcx"), "GELU's Phi: erfcx")
