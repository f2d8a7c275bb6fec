"""Residual add + LayerNorm kernels (kernels/add_layernorm.py) against the definition in float64:
y = x + (branch + branch_bias) * s, n = LayerNorm(y); the stream, the normalised output and the gradients of x,
branch, the LayerNorm's weight and bias and the branch bias (CPU: interpreted)."""
import pytest
import torch
import torch.nn.functional as F

from script_helpers import sm90_builds, within_sum_bound
from tokenlabel.kernels import add_layernorm as al


def make(gen, shape, x_dtype, br_dtype, device, scale_kind="sample", offset=0.0, spread=1.0, bias=False):
    """x, branch, the LayerNorm, the scale, dy, dn and the branch bias (fp32, as a Linear's under autocast, or
    None)."""
    C = shape[-1]
    x = (torch.randn(shape, generator=gen) * spread + offset).to(device, x_dtype).requires_grad_()
    br = torch.randn(shape, generator=gen).to(device, br_dtype).requires_grad_()
    norm = torch.nn.LayerNorm(C, eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(C, generator=gen) + 0.5)
        norm.bias.copy_(torch.randn(C, generator=gen))
    if scale_kind == "sample":  # drop path: some samples dropped (0), the others scaled by 1 / keep / skip_lam
        s = (torch.rand(shape[0], generator=gen) < 0.7).float() * 0.7
        s = s.view(-1, *[1] * (len(shape) - 1)).to(device)
    else:
        s = 0.5
    dy = torch.randn(shape, generator=gen).to(device)
    dn = torch.randn(shape, generator=gen).to(device)
    bb = (torch.randn(C, generator=gen) * 0.5).to(device).requires_grad_() if bias else None
    return x, br, norm, s, dy, dn, bb


def run_ours(x, br, norm, s, dy, dn, bb=None, out_dtype=None):
    y, n = al.add_layer_norm(x, br, norm, s, out_dtype, branch_bias=bb)
    wrt = (x, br, norm.weight, norm.bias) + ((bb,) if bb is not None else ())
    grads = torch.autograd.grad((y, n), wrt, (dy.to(y.dtype), dn.to(n.dtype)))
    return (y, n, *grads)


def run_torch(x, br, norm, s, dy, dn, bb, dtype, out_dtype=None):
    """The unfused path computed in ``dtype`` (float64: the reference; float32: what torch does under autocast,
    the LayerNorm in fp32, its output cast to ``out_dtype``)."""
    xx = x.detach().to(dtype).requires_grad_()
    bbr = br.detach().to(dtype).requires_grad_()
    w = norm.weight.detach().to(dtype).requires_grad_()
    b = norm.bias.detach().to(dtype).requires_grad_()
    ss = s.to(dtype) if isinstance(s, torch.Tensor) else s
    wrt = (xx, bbr, w, b)
    if bb is not None:
        bbb = bb.detach().to(dtype).requires_grad_()
        wrt += (bbb,)
        y = xx + (bbr + bbb) * ss
    else:
        y = xx + bbr * ss
    if dtype != torch.float64 and x.dtype != torch.float32:  # the stream as torch rounds it (a half-precision x)
        y = y.to(x.dtype).to(dtype)
    n = F.layer_norm(y, (y.shape[-1],), w, b, norm.eps)
    if out_dtype is not None and dtype != torch.float64:
        n = n.to(out_dtype).to(dtype)
    grads = torch.autograd.grad((y, n), wrt, (dy.to(dtype), dn.to(dtype)))
    return (y, n, *grads)


def rel(a, b):
    """max |a - b| over max |b|; a reference of only rounding noise (dweight over one channel: xhat is exactly 0,
    float64 gives ~1e-13) counts against a scale of 1e-6."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


NAMES = ("y", "n", "dx", "dbranch", "dweight", "dbias", "dbranch_bias")
SUMS = ("dweight", "dbias", "dbranch_bias")  # sums over every row: may cancel


def sum_terms(want, dn, eps):
    """For each column-sum gradient, the float64 sum over rows of its terms' magnitudes: the scale of its fp32
    rounding. A column whose terms cancel has an exact sum far below that scale (dbias of one channel is the sum of
    12 dn values: -0.0059 from terms summing to 13.2 in absolute value, seed 1238281545 of the CI of 0f1c343), so a
    bound relative to the largest exact value alone fails on rounding that is ~1e-2 of fp32's own bound."""
    y, dbranch = want[0].detach(), want[3].detach()
    rows = tuple(range(y.dim() - 1))
    xhat = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + eps)
    dn = dn.double()
    return {"dweight": (dn * xhat).abs().sum(rows), "dbias": dn.abs().sum(rows),
            "dbranch_bias": dbranch.abs().sum(rows)}


def close64(name, g, w, terms):
    """fp32 ``g`` against float64 ``w``: within 1e-5 of the largest |w| (rel), or, for a column sum, elementwise
    within that plus 4 fp32 units of its terms' magnitudes (within_sum_bound)."""
    return rel(g, w) < 1e-5 if name not in SUMS else within_sum_bound(g, w, terms[name])


# realistic (LV-ViT-S's 197 tokens of 384; -T's 240 channels, -L's 768) and awkward (7 channels, one channel, one
# row, a 2-D input whose rows are the samples, the 4096-channel limit, more programs than rows per block)
SHAPES = [(2, 197, 384), (3, 5, 240), (2, 3, 768), (3, 7, 7), (4, 3, 1), (1, 1, 50), (37, 100), (2, 2, 4096)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale_kind", ["sample", "constant"])
@pytest.mark.parametrize("bias", [True, False], ids=["branch-bias", "no-bias"])
def test_fp32_matches_float64(gen, device, shape, scale_kind, bias):
    x, br, norm, s, dy, dn, bb = make(gen, shape, torch.float32, torch.float32, device, scale_kind, bias=bias)
    got = run_ours(x, br, norm, s, dy, dn, bb)
    want = run_torch(x, br, norm, s, dy, dn, bb, torch.float64)
    assert len(got) == len(want) == 6 + bias
    terms = sum_terms(want, dn, norm.eps)
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape and g.dtype == torch.float32, name
        assert close64(name, g, w, terms), (name, rel(g, w))


# every tiling option the backward's sweep may choose (scripts/sweep_rowkernels.py), on one awkward shape each
TILINGS = [dict(tile=512, warps=4, per_sm=8, stages=1, joint=True), dict(tile=512, warps=2, per_sm=2, stages=3),
           dict(tile=1024, warps=8, per_sm=4, acc2d=True, joint=True), dict(tile=4096, warps=1, per_sm=12, acc2d=True)]


@pytest.mark.parametrize("tiling", TILINGS, ids=lambda t: "-".join(f"{k}{v}" for k, v in t.items()))
@pytest.mark.parametrize("shape", [(3, 37, 384), (5, 11, 240)], ids=lambda s: "x".join(map(str, s)))
def test_backward_tilings_match_float64(gen, device, monkeypatch, tiling, shape):
    monkeypatch.setattr(al, "BWD", {**al.BWD, **tiling})
    x, br, norm, s, dy, dn, bb = make(gen, shape, torch.float32, torch.float32, device, bias=True)
    got = run_ours(x, br, norm, s, dy, dn, bb)
    want = run_torch(x, br, norm, s, dy, dn, bb, torch.float64)
    terms = sum_terms(want, dn, norm.eps)
    for name, g, w in zip(NAMES, got, want):
        assert close64(name, g, w, terms), (name, rel(g, w))


@pytest.mark.parametrize("case", ["autocast", "half-stream"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_within_twice_torch(gen, device, case, dtype):
    """"autocast": an fp32 stream, a half-precision branch, the output in half precision (what the blocks get under
    autocast); "half-stream": everything in half precision (a model cast to it). Against float64: at most 2x the
    error of the unfused path in fp32 rounded where torch rounds, plus the output dtype's rounding."""
    x_dtype = torch.float32 if case == "autocast" else dtype
    x, br, norm, s, dy, dn, bb = make(gen, (3, 50, 384), x_dtype, dtype, device, offset=0.5, spread=2.0, bias=True)
    got = run_ours(x, br, norm, s, dy, dn, bb, out_dtype=dtype)
    want = run_torch(x, br, norm, s, dy, dn, bb, torch.float64)
    base = run_torch(x, br, norm, s, dy, dn, bb, torch.float32, out_dtype=dtype)
    assert got[0].dtype == x_dtype and got[1].dtype == dtype and got[3].dtype == dtype
    eps = torch.finfo(dtype).eps
    for name, g, w, b in zip(NAMES, got, want, base):
        assert rel(g, w) <= 2 * rel(b, w) + eps, name


def test_large_offset_small_spread(gen, device):
    """Rows around 1000 with a spread of 0.01: the variance is taken about the row's mean (two passes over the row
    in registers), not as E[y^2] - E[y]^2, which would cancel to noise. Within 2x fp32 torch plus two fp32 ulps of
    the mean relative to the spread."""
    offset, spread = 1000.0, 0.01
    x, br, norm, _, dy, dn, _ = make(gen, (2, 9, 64), torch.float32, torch.float32, device, offset=offset,
                                     spread=spread)
    br = (br.detach() * 1e-3).requires_grad_()
    got = run_ours(x, br, norm, 1.0, dy, dn)
    want = run_torch(x, br, norm, 1.0, dy, dn, None, torch.float64)
    base = run_torch(x, br, norm, 1.0, dy, dn, None, torch.float32)
    floor = 2 * torch.finfo(torch.float32).eps * offset / spread
    for name, g, w, b in zip(NAMES, got, want, base):
        assert rel(g, w) <= 2 * rel(b, w) + floor, name


def test_one_output_unused(gen, device):
    """Only y used (the normalised output's gradient never comes), or only n (the final LayerNorm reads the last
    block's stream; also with return_stream=False, which returns n alone): the gradients of the other alone, as the
    definition gives, the branch bias's included."""
    x, br, norm, s, dy, dn, bb = make(gen, (2, 6, 32), torch.float32, torch.float32, device, bias=True)
    y, n = al.add_layer_norm(x, br, norm, s, branch_bias=bb)
    gx, gb, gbb = torch.autograd.grad(y, (x, br, bb), dy)
    torch.testing.assert_close(gx, dy)
    torch.testing.assert_close(gb, dy * s)
    torch.testing.assert_close(gbb, (dy * s).sum((0, 1)))
    want = run_torch(x, br, norm, s, torch.zeros_like(dy), dn, bb, torch.float64)
    y, n = al.add_layer_norm(x, br, norm, s, branch_bias=bb)
    n_only = al.add_layer_norm(x, br, norm, s, return_stream=False, branch_bias=bb)  # y kept for the backward only
    torch.testing.assert_close(n_only, n, rtol=0, atol=0)
    for out in (n, n_only):
        got = torch.autograd.grad(out, (x, br, norm.weight, norm.bias, bb), dn)
        for name, g, w in zip(NAMES[2:], got, want[2:]):
            assert rel(g, w) < 1e-5, name


@pytest.mark.parametrize("bias", [True, False], ids=["branch-bias", "no-bias"])
def test_custom_ops_under_compile_and_opcheck(gen, device, bias):
    """torch.compile(fullgraph=True) takes the torch.library ops: the eager results; opcheck passes for both."""
    torch._dynamo.reset()
    x, br, norm, s, dy, dn, bb = make(gen, (2, 5, 24), torch.float32, torch.float32, device, bias=bias)
    eager = run_ours(x, br, norm, s, dy, dn, bb)
    compiled = torch.compile(lambda a, b, t: al.add_layer_norm(a, b, norm, t, branch_bias=bb), fullgraph=True,
                             backend="aot_eager")
    y, n = compiled(x, br, s)
    wrt = (x, br, norm.weight, norm.bias) + ((bb,) if bias else ())
    grads = torch.autograd.grad((y, n), wrt, (dy, dn))
    for name, g, w in zip(NAMES, (y, n, *grads), eager):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    xd, bd, w, b = x.detach(), br.detach(), norm.weight.detach(), norm.bias.detach()
    bbd = bb.detach() if bias else None
    sd = s.reshape(-1)
    torch.library.opcheck(torch.ops.tokenlabel.add_ln_fwd, (xd, bd, bbd, sd, 1.0, w, b, 1e-6, torch.bfloat16))
    torch.library.opcheck(torch.ops.tokenlabel.add_ln_fwd, (xd, bd, bbd, None, 0.5, w, b, 1e-6, torch.float32))
    y, n, mean, rstd = al.add_ln_forward(xd, bd, bbd, sd, 1.0, w, b, 1e-6, torch.float32)
    bdt = torch.float32 if bias else None
    torch.library.opcheck(torch.ops.tokenlabel.add_ln_bwd, (dy, dn, y, w, mean, rstd, sd, 1.0, torch.float32, bdt))
    torch.library.opcheck(torch.ops.tokenlabel.add_ln_bwd, (None, dn, y, w, mean, rstd, None, 0.5, torch.bfloat16,
                                                             bdt))


def test_bad_inputs_name_the_problem(gen, device):
    x, br, norm, s, _, _, _ = make(gen, (2, 3, 8), torch.float32, torch.float32, device)
    with pytest.raises(ValueError, match="one shape"):
        al.add_layer_norm(x, br[:, :2], norm, s)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        al.add_layer_norm(x.double(), br, norm, s)
    with pytest.raises(ValueError, match=r"weight and bias must be \[8\]"):
        al.add_layer_norm(x, br, torch.nn.LayerNorm(5).to(device), s)
    with pytest.raises(ValueError, match=r"branch_bias must be a float \[8\]"):
        al.add_layer_norm(x, br, norm, s, branch_bias=torch.zeros(7, device=device))
    with pytest.raises(ValueError, match="one factor per sample"):
        al.add_layer_norm(x, br, norm, torch.ones(3, device=device))
    with pytest.raises(ValueError, match="with weight and bias"):
        al.add_layer_norm(x, br, torch.nn.LayerNorm(8, elementwise_affine=False).to(device), s)
    with pytest.raises(ValueError, match=r"\[B, \.\.\., C\]"):
        al.add_layer_norm(x[0, 0], br[0, 0], norm, 1.0)
    with pytest.raises(ValueError, match="empty input"):
        al.add_layer_norm(x[:0], br[:0], norm, 1.0)
    with pytest.raises(ValueError, match="4097 > 4096"):
        wide = torch.zeros(1, 1, 4097, device=device)
        al.add_layer_norm(wide, wide, torch.nn.LayerNorm(4097).to(device), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["autocast", "fp32"])
def test_gpu_lvvit_s_shape(gen, case):
    """LV-ViT-S's stream at B 32 ([32, 197, 384]) on the GPU against float64: fp32 within 1e-5; under autocast's
    dtypes (fp32 stream, bf16 branch and output) within 2x the unfused fp32 path's error plus bf16's rounding."""
    br_dtype = torch.float32 if case == "fp32" else torch.bfloat16
    x, br, norm, s, dy, dn, bb = make(gen, (32, 197, 384), torch.float32, br_dtype, "cuda", offset=0.3, spread=2.0,
                                      bias=True)
    out_dtype = None if case == "fp32" else torch.bfloat16
    got = run_ours(x, br, norm, s, dy, dn, bb, out_dtype=out_dtype)
    want = run_torch(x, br, norm, s, dy, dn, bb, torch.float64)
    base = run_torch(x, br, norm, s, dy, dn, bb, torch.float32, out_dtype=out_dtype)
    floor = 1e-5 if case == "fp32" else torch.finfo(torch.bfloat16).eps
    for name, g, w, b in zip(NAMES, got, want, base):
        assert rel(g, w) <= 2 * rel(b, w) + floor, name


def test_sm90_builds_do_not_spill():
    """The kernels compiled ahead of time for sm_90 (Triton's bundled ptxas, no GPU) at the LV-ViT widths (T 240,
    S 384, M 512, L 768) with autocast's dtypes and the module's tilings (FWD, BWD): no registers spilled, few
    enough registers for 4 forward programs and BWD["per_sm"] backward programs per SM (the backward's grid assumes
    them all resident), and the backward's row loop software-pipelined (cp.async copies) when BWD["stages"] > 1."""
    builds = sm90_builds("{C: add_layernorm.sm90_resources(C) for C in (240, 384, 512, 768)}")
    assert sorted(builds, key=int) == ["240", "384", "512", "768"], builds
    f_max = min(255, 65536 // (4 * al.FWD["warps"] * 32))
    b_max = min(255, 65536 // (al.BWD["per_sm"] * al.BWD["warps"] * 32))
    for C, r in builds.items():
        (f_regs, f_stack, _, _), (b_regs, b_stack, _, b_copies), (_, s_stack, _, _) = r["fwd"], r["bwd"], r["sum"]
        assert f_stack == 0 and b_stack == 0 and s_stack == 0, (C, r)
        if al.BWD["stages"] > 1:
            assert b_copies > 0, f"backward row loop not software-pipelined at C={C}: {r}"
        assert f_regs <= f_max and b_regs <= b_max, (C, r, f_max, b_max)


def test_sm90_backward_rounds_g_before_subtracting_its_mean():
    """In the backward's sm_90 PTX (C = 1 and 384) the product g = dn * w is rounded once (mul.rn) and g - mean(g)
    subtracts that rounded g. With the product left to LLVM, it was contracted into fma(dn, w, -c2), so the row sum
    and the difference saw different g, and at C = 1 (rstd = 1 / sqrt(eps)) dx was off by up to 4.9e-5 relative on
    the H200 (float64 tests there; the interpreter does not contract, so the CPU tests cannot see it)."""
    import re

    for C in (1, 384):
        ptx = sm90_builds(f"add_layernorm.sm90_backward_ptx({C})")
        rounded = set(re.findall(r"mul\.rn\.f32\s+(%r\d+),", ptx))
        assert rounded, f"C={C}: no mul.rn.f32 in the backward"
        subs = re.findall(r"sub\.f32\s+%r\d+,\s*(%r\d+),", ptx)
        assert any(r in rounded for r in subs), f"C={C}: no g - c2 on the rounded g"
