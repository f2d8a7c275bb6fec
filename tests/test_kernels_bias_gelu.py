"""Bias + exact GELU kernels (kernels/bias_gelu.py) against the definition in float64: g = GELU(h + b), and the
gradients of h and b (CPU: interpreted)."""
import pytest
import torch
import torch.nn.functional as F

from script_helpers import sm90_builds, within_sum_bound
from tokenlabel.kernels import bias_gelu as bg


@pytest.fixture(params=bg.CDFS)
def cdf(request, monkeypatch):
    """Each way Phi is computed (bg.CDFS: libdevice's erf, the fitted erfcx), set in both kernels' tilings."""
    monkeypatch.setattr(bg, "FWD", {**bg.FWD, "cdf": request.param})
    monkeypatch.setattr(bg, "BWD", {**bg.BWD, "cdf": request.param})
    return request.param


def make(gen, shape, dtype, device, spread=2.0):
    h = (torch.randn(shape, generator=gen) * spread).to(device, dtype).requires_grad_()
    b = torch.randn(shape[-1], generator=gen).to(device).requires_grad_()  # fp32, as a Linear's bias under autocast
    dg = torch.randn(shape, generator=gen).to(device, dtype)
    return h, b, dg


def run_ours(h, b, dg):
    g = bg.bias_gelu(h, b)
    return (g, *torch.autograd.grad(g, (h, b), dg))


def run_torch(h, b, dg, dtype):
    """F.gelu(h + b) in ``dtype`` (float64: the reference; float32 on half inputs: torch's kernels, which compute
    half-precision GELU in fp32, with the result rounded to h's dtype)."""
    hh = h.detach().to(dtype).requires_grad_()
    bb = b.detach().to(dtype).requires_grad_()
    g = F.gelu(hh + bb)
    if dtype != torch.float64 and h.dtype != dtype:
        g = g.to(h.dtype).to(dtype)
    return (g, *torch.autograd.grad(g, (hh, bb), dg.to(dtype)))


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


NAMES = ("g", "dh", "dbias")


def close64(name, g, w):
    """fp32 ``g`` against float64 ``w`` = (g, dh, dbias): within 1e-5 of the largest |w|, and dbias (a sum over every
    row, which may cancel: one column's 12 terms, 2 of 300 draws per cdf over that bound) within_sum_bound of the
    magnitudes |dh| it sums."""
    if name != "dbias":
        return rel(g, w[NAMES.index(name)]) < 1e-5
    dh = w[1].detach()
    return within_sum_bound(g, w[2], dh.abs().reshape(-1, dh.shape[-1]).sum(0))


# realistic (LV-ViT-S's hidden 1152 over 2 x 197 tokens, -T's 720) and awkward (one column past a block, a
# single row, one column, 2-D, rows that leave the last row program short)
SHAPES = [(2, 197, 1152), (3, 5, 720), (1, 1, 129), (4, 3, 1), (37, 100), (300, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_float64(gen, device, shape, cdf):
    h, b, dg = make(gen, shape, torch.float32, device)
    got = run_ours(h, b, dg)
    want = run_torch(h, b, dg, torch.float64)
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape and g.dtype == (h.dtype if name != "dbias" else b.dtype), name
        assert close64(name, g, want), (name, rel(g, w))


# tilings the sweep may choose (scripts/sweep_rowkernels.py)
TILINGS = [dict(rows=8, cols=128, warps=4, per_sm=8, stages=1, acc2d=True), dict(rows=4, cols=64, warps=2, stages=3),
           dict(rows=64, cols=256, warps=8, per_sm=1, acc2d=True)]


@pytest.mark.parametrize("tiling", TILINGS, ids=lambda t: "-".join(f"{k}{v}" for k, v in t.items()))
@pytest.mark.parametrize("shape", [(3, 41, 300), (70, 129)], ids=lambda s: "x".join(map(str, s)))
def test_backward_tilings_match_float64(gen, device, monkeypatch, tiling, shape, cdf):
    monkeypatch.setattr(bg, "BWD", {**bg.BWD, **tiling})
    h, b, dg = make(gen, shape, torch.float32, device)
    want = run_torch(h, b, dg, torch.float64)
    for name, g, w in zip(NAMES, run_ours(h, b, dg), want):
        assert close64(name, g, want), (name, rel(g, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_within_twice_torch(gen, device, dtype, cdf):
    """Half-precision h (a Linear's output under autocast) and an fp32 bias: against float64, at most 2x the error
    of torch's GELU on the same inputs, plus the dtype's rounding."""
    h, b, dg = make(gen, (3, 40, 384), dtype, device)
    got = run_ours(h, b, dg)
    want = run_torch(h, b, dg, torch.float64)
    base = run_torch(h, b, dg, torch.float32)
    eps = torch.finfo(dtype).eps
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    for name, g, w, r in zip(NAMES, got, want, base):
        assert rel(g, w) <= 2 * rel(r, w) + eps, name


def test_saturated_inputs(gen, device, cdf):
    """|h + b| up to ~40: GELU -> identity or 0, its derivative -> 1 or 0, no NaN or inf from erf / exp."""
    h, b, dg = make(gen, (4, 8, 64), torch.float32, device, spread=15.0)
    got = run_ours(h, b, dg)
    want = run_torch(h, b, dg, torch.float64)
    for name, g, w in zip(NAMES, got, want):
        assert torch.isfinite(g).all() and rel(g, w) < 1e-5, name


def test_erfcx_fit_in_float64():
    """ERFCX's polynomial in u = 1 / (1 + t / 2) against float64's erfcx on t in [0, 10] (beyond, erfc(t) < 3e-45
    and exp(-t^2) is 0 in fp32): relative error < 1e-7."""
    t = torch.linspace(0, 10, 300001, dtype=torch.float64)
    u = 1 / (1 + t / 2)
    q = sum(c * u ** (k + 1) for k, c in enumerate(bg.ERFCX))
    assert float(((q - torch.special.erfcx(t)) / torch.special.erfcx(t)).abs().max()) < 1e-7


def test_gelu_pointwise_error_over_the_range(device, cdf):
    """Every z in [-14, 14] (fp32 grid, bias 0): GELU and dGELU against float64 within 5e-7 absolute; with "erfcx",
    GELU also within 3e-6 relative where |GELU| > 1e-3 (down to z ~ -3.5: Phi's tail, where 0.5 * (1 + erf) cancels:
    libdevice's erf path is off by ~5e-5 relative there, torch's fp32 GELU by ~7e-4)."""
    z = torch.linspace(-14, 14, 70007, dtype=torch.float32).to(device).view(7, 10001).requires_grad_()
    b = torch.zeros(10001, device=device, requires_grad=True)
    dg = torch.ones_like(z)
    g, dh, _ = run_ours(z, b, dg)
    zd = z.detach().double().requires_grad_()
    want = F.gelu(zd)
    want_dh, = torch.autograd.grad(want, zd, dg.double())
    g, dh, want = g.detach(), dh.detach(), want.detach()
    assert float((g.double() - want).abs().max()) < 5e-7 and float((dh.double() - want_dh).abs().max()) < 5e-7
    if cdf == "erfcx":
        big = want.abs() > 1e-3
        assert float(((g.double() - want).abs() / want.abs())[big].max()) < 3e-6


def test_custom_ops_under_compile_and_opcheck(gen, device):
    torch._dynamo.reset()
    h, b, dg = make(gen, (2, 5, 40), torch.float32, device)
    eager = run_ours(h, b, dg)
    g = torch.compile(bg.bias_gelu, fullgraph=True, backend="aot_eager")(h, b)
    got = (g, *torch.autograd.grad(g, (h, b), dg))
    for name, x, w in zip(NAMES, got, eager):
        torch.testing.assert_close(x, w, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    torch.library.opcheck(torch.ops.tokenlabel.bias_gelu_fwd, (h.detach(), b.detach()))
    torch.library.opcheck(torch.ops.tokenlabel.bias_gelu_bwd, (dg, h.detach(), b.detach()))


def test_bad_inputs_name_the_problem(gen, device):
    h, b, _ = make(gen, (2, 3, 8), torch.float32, device)
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        bg.bias_gelu(h, b[:5])
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        bg.bias_gelu(h.double(), b)
    with pytest.raises(ValueError, match="non-empty"):
        bg.bias_gelu(h[:0], b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_lvvit_s_shape(gen, dtype, cdf):
    """LV-ViT-S's MLP hidden layer at B 32 ([32, 197, 1152]) on the GPU against float64."""
    h, b, dg = make(gen, (32, 197, 1152), dtype, "cuda")
    got = run_ours(h, b, dg)
    want = run_torch(h, b, dg, torch.float64)
    base = run_torch(h, b, dg, torch.float32)
    floor = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    for name, g, w, r in zip(NAMES, got, want, base):
        assert rel(g, w) <= 2 * rel(r, w) + floor, name


def test_sm90_builds_do_not_spill():
    """Both kernels compiled ahead of time for sm_90 (Triton's bundled ptxas, no GPU) at LV-ViT-S's MLP shape: no
    spills, the backward's row loop software-pipelined (cp.async copies)."""
    for cdf in bg.CDFS:
        r = sm90_builds(f"bias_gelu.sm90_resources(cdf={cdf!r})")
        (f_regs, f_stack, _, _), (b_regs, b_stack, _, b_copies) = r["fwd"], r["bwd"]
        b_max = min(255, 65536 // (bg.BWD["per_sm"] * bg.BWD["warps"] * 32))  # BWD["per_sm"] resident per SM
        assert f_stack == 0 and b_stack == 0 and f_regs <= 128 and b_regs <= b_max, (cdf, r, b_max)
        if bg.BWD["stages"] > 1:
            assert b_copies > 0, f"backward row loop not software-pipelined: {cdf} {r}"


def test_use_cdf_switches_both_kernels_and_restores(gen, device):
    """use_cdf(name) computes Phi that way in both kernels within the block (erf and erfcx results match within the
    fp32 tolerance, not bit for bit), restores the tilings after (the defaults mix the two: erfcx forward, erf
    backward), and refuses unknown names."""
    h, b, dg = make(gen, (3, 7, 130), torch.float32, device)
    before = dict(bg.FWD), dict(bg.BWD)
    got = {}
    for cdf in bg.CDFS:
        with bg.use_cdf(cdf):
            assert bg.FWD["cdf"] == bg.BWD["cdf"] == cdf
            got[cdf] = run_ours(h, b, dg)
        assert (dict(bg.FWD), dict(bg.BWD)) == before
    erf, erfcx = got["erf"], got["erfcx"]
    for name, x, y in zip(NAMES, erfcx, erf):
        assert rel(x, y) < 1e-5, name
    assert not torch.equal(erfcx[0], erf[0])  # a different formula really ran
    with pytest.raises(ValueError, match="cdf must be one of erf, erfcx, got 'tanh'"):
        with bg.use_cdf("tanh"):
            pass
