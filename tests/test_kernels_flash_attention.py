"""Triton flash attention (kernels/flash_attention.py) against a float64 reference written from the definition,
softmax(q k^T * scale) v: output and the gradients of q, k, v, on fresh random inputs (CPU: interpreted)."""
import math
import os
import subprocess
import sys

import pytest
import torch

from tokenlabel.kernels import flash_attention as fa


def reference(q, k, v, scale):
    """[B, N, H, D] float64 attention from the definition."""
    q, k, v = (t.double().permute(0, 2, 1, 3) for t in (q, k, v))
    weights = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) * scale, dim=-1)
    return torch.einsum("bhij,bhjd->bhid", weights, v).permute(0, 2, 1, 3)


def cancellation_bound(q, k, v, o, do, scale):
    """[B, N, 3, H, D]: the fp32 rounding an exact backward still shows in dq and dk, elementwise (0 for dv). Each
    ds_ij = p_ij (dp_ij - delta_i) subtracts two length-D dot products (dp_ij = do_i . v_j, delta_i = do_i . o_i)
    that cancel where attention is sharp; at N = 1 they cancel exactly, the float64 dq and dk are 0, and what fp32
    leaves is about u (|do_i| . |v_j| + |do_i| . |o_i|) (u = 2^-24; interpreted, 1,200 draws at N = 1 reached 0.94x
    of it, so 4x is allowed: at N = 197 that adds ~1/3 to the relative bound, where the worst case of a length-D
    dot, D u, would add 3-8x). It reaches dq_i as scale sum_j p_ij err_ij |k_j| and dk_j as scale sum_i p_ij
    err_ij |q_i|. (A flat floor of 2e-6 of the largest gradient failed ~3% of the N = 1 draws, by up to 1.65x.)"""
    q, k, v, o, do = (t.detach().double() for t in (q, k, v, o, do))
    p = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) * scale, dim=-1)
    terms = torch.einsum("bihd,bjhd->bhij", do.abs(), v.abs()) + (do.abs() * o.abs()).sum(-1).transpose(1, 2)[..., None]
    err = 4 * 2.0 ** -24 * p * terms
    dq = scale * torch.einsum("bhij,bjhd->bihd", err, k.abs())
    dk = scale * torch.einsum("bhij,bihd->bjhd", err, q.abs())
    return torch.stack([dq, dk, torch.zeros_like(dq)], dim=2)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def packed_inputs(gen, B, N, H, D, dtype, device, spread=1.0):
    qkv = (torch.randn(B, N, 3 * H * D, generator=gen) * spread).to(device, dtype).requires_grad_()
    gout = torch.randn(B, N, H * D, generator=gen).to(device, dtype)
    return qkv, gout


def run_packed(qkv, gout, H, scale=None):
    out = fa.flash_attention_qkv(qkv, H, scale)
    (g,) = torch.autograd.grad(out, qkv, gout)
    return out, g


def run_reference(qkv, gout, H, scale, dtype=torch.float64):
    B, N, C = qkv.shape
    x = qkv.detach().to(dtype).requires_grad_()
    q, k, v = x.view(B, N, 3, H, C // (3 * H)).unbind(2)
    out = reference(q, k, v, scale).to(dtype).reshape(B, N, C // 3)
    (g,) = torch.autograd.grad(out, x, gout.to(dtype))
    return out, g


def plain_torch(qkv, gout, H, scale):
    """softmax attention in qkv's own dtype with plain PyTorch ops: the error a user accepts from eager code."""
    B, N, C = qkv.shape
    x = qkv.detach().clone().requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in x.view(B, N, 3, H, C // (3 * H)).unbind(2))
    out = (torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1) @ v).transpose(1, 2).reshape(B, N, C // 3)
    (g,) = torch.autograd.grad(out, x, gout)
    return out, g


# realistic (LV-ViT-S heads of 64 at 197 tokens, LV-ViT-T heads of 60) and awkward (one token, 17 tokens,
# a head dim under the 16-wide dot minimum, one past a block, a 128-wide head, whole blocks without a tail)
FP32_SHAPES = [(2, 197, 3, 64), (3, 17, 2, 60), (1, 1, 1, 64), (2, 65, 2, 32), (1, 40, 1, 8), (1, 33, 2, 128),
               (1, 128, 2, 64)]


@pytest.fixture(params=["split", "head", "split2", "tma"])
def bwd_impl(request, monkeypatch):
    """Every backward: query- and key-block programs in one launch ("split"), one program per head ("head"), the
    two program kinds as two launches ("split2"), two persistent launches loading by TMA ("tma": half-precision
    heads of 16-128 in packed layouts; elsewhere it runs "split"; with it the forward's "tma" kernel too)."""
    monkeypatch.setattr(fa, "BWD_IMPL", request.param)
    monkeypatch.setattr(fa, "FWD_IMPL", "tma" if request.param == "tma" else "ptr")
    return request.param


@pytest.mark.parametrize("shape", FP32_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_float64_reference(gen, device, shape, bwd_impl):
    B, N, H, D = shape
    qkv, gout = packed_inputs(gen, B, N, H, D, torch.float32, device, spread=2.0)
    out, g = run_packed(qkv, gout, H)
    ref_out, ref_g = run_reference(qkv, gout, H, D ** -0.5)
    assert out.shape == (B, N, H * D) and g.shape == qkv.shape
    assert rel(out, ref_out) < 1e-5
    assert rel(g, ref_g) < 1e-5
    gq, gk, gv = g.view(B, N, 3, H, D).unbind(2)
    rq, rk, rv = ref_g.view(B, N, 3, H, D).unbind(2)
    # each part on its own scale (dq, dk can be small), plus 2e-6 of the whole, plus the fp32 cancellation in
    # ds = p (dp - do.o) (cancellation_bound: at N = 1 dq and dk are exactly 0, a softmax over one key)
    q, k, v = qkv.view(B, N, 3, H, D).unbind(2)
    bounds = cancellation_bound(q, k, v, ref_out.view(B, N, H, D), gout.view(B, N, H, D), D ** -0.5).unbind(2)
    floor = 2e-6 * float(ref_g.abs().max())
    for got, want, bound in zip((gq, gk, gv), (rq, rk, rv), bounds):
        assert ((got.double() - want).abs() < 1e-5 * float(want.abs().max()) + floor + bound).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 197, 2, 64), (1, 50, 3, 60), (1, 128, 1, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_half_precision_error_within_twice_plain_torch(gen, device, dtype, shape, bwd_impl):
    """Against float64, the kernel's error is at most 2x that of plain PyTorch attention in the same dtype."""
    B, N, H, D = shape
    qkv, gout = packed_inputs(gen, B, N, H, D, dtype, device, spread=2.0)
    out, g = run_packed(qkv, gout, H)
    ref_out, ref_g = run_reference(qkv, gout, H, D ** -0.5)
    base_out, base_g = plain_torch(qkv, gout, H, D ** -0.5)
    assert out.dtype == dtype and g.dtype == dtype
    assert rel(out, ref_out) <= 2 * rel(base_out, ref_out) + 1e-3
    assert rel(g, ref_g) <= 2 * rel(base_g, ref_g) + 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [1, 2, 17])
def test_very_negative_scores_with_a_partial_key_block(gen, device, dtype, N, bwd_impl):
    """Queries whose every score is very negative (q = -k, |q k^T| * scale ~ 80) with a partial last key block: the
    padding keys past N must contribute nothing. (Their p was 2^-lse ~ 2^115 before, which overflowed fp16 in ds and
    made a NaN row of dq on the GPU, seen with random fp16 inputs at N = 1 and 2.)"""
    B, H, D = 2, 2, 64
    u = torch.nn.functional.normalize(torch.randn(B, N, H, D, generator=gen), dim=-1) * 9.0
    qkv = torch.cat([u, -u, torch.randn(B, N, H, D, generator=gen)], dim=2).reshape(B, N, 3 * H * D)
    qkv = qkv.to(device, dtype).requires_grad_()
    gout = torch.randn(B, N, H * D, generator=gen).to(device, dtype)
    out, g = run_packed(qkv, gout, H)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    ref_out, ref_g = run_reference(qkv.detach().requires_grad_(), gout, H, D ** -0.5)
    base_out, base_g = plain_torch(qkv.detach().requires_grad_(), gout, H, D ** -0.5)
    # a floor of 8 ulps (1e-2 at least): p is rounded to the half type before the p v product, as in every flash
    # kernel, while torch's math path rounds the normalised p, exact for the dominant key here (bf16 out: 5.6e-3
    # against 3e-4); ds = p (dp - delta) then cancels (bf16 gradient: 1.07e-2 against 9e-5)
    floor = max(1e-2, 8 * torch.finfo(dtype).eps)
    assert rel(out, ref_out) <= 2 * rel(base_out, ref_out) + floor
    assert rel(g, ref_g) <= 2 * rel(base_g, ref_g) + floor


# (forward config, backward impl, backward config): the tails (pow2 partial blocks, padded full blocks peeled off
# the loop, folded into it), split2's two kernels with different tilings, 128-row program blocks
TILINGS = [
    ((64, 32, 4, 2, "fold"), "split", (32, 64, 4, 2, "fold")),
    ((32, 64, 4, 1, "pad"), "head", (32, 32, 4, 1, "fold")),
    ((64, 64, 4, 2, "pad"), "head", (32, 32, 4, 1, "pad")),
    ((128, 32, 8, 2, "fold"), "split2", ((64, 32, 4, 2, "fold"), (32, 64, 8, 1, "pow2"))),
    ((64, 64, 4, 2, "pow2"), "split2", ((128, 32, 8, 2, "pad"), (16, 128, 8, 2, "pad"))),
    ((128, 64, 8, 2, "pad"), "split", (64, 32, 4, 2, "pad")),
]


@pytest.mark.parametrize("tiling", TILINGS, ids=["split-fold", "head-pad-fold", "head-pad", "split2-fold-pow2",
                                                 "split2-pad", "split-pad-128"])
@pytest.mark.parametrize("shape", [(2, 197, 2, 64), (1, 17, 1, 32), (1, 1, 1, 64), (1, 128, 1, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_tilings_match_float64(gen, device, shape, tiling):
    """Each tiling the GPU sweep (_attn_tune time) may pick, fp32 against the float64 reference: the output, the
    row log-sum-exp, and the q, k, v gradients; nothing left unwritten (the gradient buffer starts as NaN)."""
    fwd_cfg, impl, bwd_cfg = tiling
    B, N, H, D = shape
    x = torch.randn(B, N, 3, H, D, generator=gen).to(device) * 2
    q, k, v = x.unbind(2)
    do = torch.randn(B, N, H, D, generator=gen).to(device)
    scale = D ** -0.5
    o, lse = fa.attention_forward(q, k, v, scale, config=fwd_cfg)
    x64 = x.double().requires_grad_()
    q64, k64, v64 = x64.unbind(2)
    ref = reference(q64, k64, v64, scale)
    (ref_g,) = torch.autograd.grad(ref, x64, do.double())
    scores = torch.einsum("bihd,bjhd->bhij", q64, k64).detach() * scale
    assert rel(o, ref) < 1e-5
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1) / torch.log(torch.tensor(2.0)).double(),
                               rtol=1e-5, atol=1e-5)
    g = torch.full((B, N, 3, H, D), float("nan"), device=device)
    scratch = fa.bwd_scratch(q) if impl == "head" else None
    for launch in fa.bwd_launches(do, q, k, v, o, lse, *g.unbind(2), scale, bwd_cfg, impl, scratch):
        fa._run(launch)
    assert torch.isfinite(g).all()
    floor = 2e-6 * float(ref_g.abs().max()) + cancellation_bound(q64, k64, v64, ref, do, scale)
    for got, want, bound in zip(g.unbind(2), ref_g.unbind(2), floor.unbind(2)):
        assert ((got.double() - want).abs() < 1e-5 * float(want.abs().max()) + bound).all()


# "tma" against float64 in half precision: packed samples (a block past N reads the next sample's rows, which must
# not leak into any stored gradient), partial blocks both ways, N = 1, no partial blocks, a 128-wide head; tilings
# with many items per program (and the last item redone), smaller tiles than the default; 6x197x6x64 at one program
# per SM gives each of 132 programs a loop of two items on a GPU (neither backward kernel takes ws=True: _check_ws)
TMA_CONFIGS = {
    "default": None,
    "one-per-sm": {"dq": dict(per_sm=1), "dkdv": dict(per_sm=1)},
    "small-tiles-many-items": {"dq": dict(bm=16, bn=32, per_sm=1), "dkdv": dict(bm=32, bn=16, per_sm=1)},
}


TMA_SHAPES = [(3, 197, 2, 64), (3, 17, 1, 32), (3, 1, 1, 16), (2, 128, 2, 64), (2, 65, 1, 128)]
TMA_CASES = [(shape, config) for shape in TMA_SHAPES for config in sorted(TMA_CONFIGS)]
TMA_CASES += [((6, 197, 6, 64), "default"), ((6, 197, 6, 64), "one-per-sm")]  # two items per program on a GPU


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,config", TMA_CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else c)
def test_tma_backward_within_twice_plain_torch(gen, device, shape, dtype, config, monkeypatch):
    B, N, H, D = shape
    qkv, gout = packed_inputs(gen, B, N, H, D, dtype, device, spread=2.0)
    q, k, v = qkv.detach().view(B, N, 3, H, D).unbind(2)
    o, lse = fa.attention_forward(q, k, v, D ** -0.5)
    do = gout.view(B, N, H, D)
    assert fa.tma_ready(q, k, v, o, do)
    g = torch.full((B, N, 3, H, D), float("nan"), device=device, dtype=dtype)  # unwritten rows fail
    launches = fa.bwd_launches(do, q, k, v, o, lse, *g.unbind(2), D ** -0.5, TMA_CONFIGS[config], "tma")
    assert [launch[0] for launch in launches] == [fa._bwd_dq_tma, fa._bwd_dkdv_tma]
    fa._ensure_allocator()
    for launch in launches:
        fa._run(launch)
    _, ref_g = run_reference(qkv, gout, H, D ** -0.5)
    _, base_g = plain_torch(qkv, gout, H, D ** -0.5)
    got = g.reshape(B, N, 3 * H * D)
    assert torch.isfinite(got).all()
    # each of dq, dk, dv: within 2x plain torch's largest error on it, plus 1e-3 of the whole gradient (at N = 1 the
    # exact dq and dk are 0, which plain torch's softmax backward hits and the row sums' cancellation does not)
    floor = 1e-3 * float(ref_g.abs().max())
    for part in range(3):
        pick = (slice(None), slice(None), part)
        want, base = ref_g.view(B, N, 3, H, D)[pick], base_g.view(B, N, 3, H, D)[pick]
        err, base_err = (float((t.double() - want).abs().max()) for t in (g[pick], base))
        assert err <= 2 * base_err + floor, (part, err, base_err, floor)
    if TMA_CONFIGS[config] is None:  # the autograd path takes "tma" too, through the same launches
        monkeypatch.setattr(fa, "BWD_IMPL", "tma")
        _, g_auto = run_packed(qkv, gout, H)
        torch.testing.assert_close(g_auto, got, rtol=0, atol=0)


# the forward's tilings: as the backward's, and warp-specialised (on a GPU, 6x197x6x64's 144 items at one program per
# SM give a loop of two to warp-specialise)
TMA_FWD_CONFIGS = {"default": None, "ws": dict(ws=True, per_sm=1), "small-tiles-many-items": dict(bm=16, bn=32,
                                                                                                   per_sm=1)}
TMA_FWD_CASES = [(shape, config) for shape in TMA_SHAPES for config in sorted(TMA_FWD_CONFIGS)]
TMA_FWD_CASES += [((6, 197, 6, 64), "default"), ((6, 197, 6, 64), "ws")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,config", TMA_FWD_CASES,
                         ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else c)
def test_tma_forward_within_twice_plain_torch(gen, device, shape, dtype, config):
    """The "tma" forward (persistent items, TMA loads, keys past a sample's N being the next sample's rows):
    o within 2x plain torch's error against float64, lse against float64's log-sum-exp of the same half inputs;
    every row written (buffers start as NaN), none past N (the next sample's rows would be overwritten)."""
    B, N, H, D = shape
    qkv, _ = packed_inputs(gen, B, N, H, D, dtype, device, spread=2.0)
    q, k, v = qkv.detach().view(B, N, 3, H, D).unbind(2)
    o = torch.full((B, N, H, D), float("nan"), device=device, dtype=dtype)
    lse = torch.full((B, H, N), float("nan"), device=device)
    fa._ensure_allocator()
    fa._run(fa.tma_fwd_launch(q, k, v, o, lse, D ** -0.5, TMA_FWD_CONFIGS[config]))
    ref = reference(q, k, v, D ** -0.5)
    base = plain_torch(qkv, torch.zeros(B, N, H * D, device=device, dtype=dtype), H, D ** -0.5)[0].view(B, N, H, D)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    assert rel(o, ref) <= 2 * rel(base, ref) + torch.finfo(dtype).eps, (rel(o, ref), rel(base, ref))
    q64, k64 = q.double(), k.double()
    want_lse = torch.logsumexp(torch.einsum("bihd,bjhd->bhij", q64, k64) * D ** -0.5, -1) / math.log(2)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=1e-4)
    if TMA_FWD_CONFIGS[config] is None:  # the autograd path's forward, inside use_fwd_impl
        with fa.use_fwd_impl("tma"):
            o2, lse2 = fa.attention_forward(q, k, v, D ** -0.5)
        torch.testing.assert_close(o2, o, rtol=0, atol=0)
        torch.testing.assert_close(lse2, lse, rtol=0, atol=0)


def test_use_fwd_impl_and_its_fallback(gen, device):
    """use_fwd_impl("tma") inside its block only; where tma_ready refuses (fp32 here) the "ptr" kernel runs, with
    the same result as outside the block; an unknown impl names the valid ones."""
    x = torch.randn(2, 9, 3, 1, 16, generator=gen).to(device)
    q, k, v = x.unbind(2)
    want = fa.attention_forward(q, k, v, 0.25)
    with fa.use_fwd_impl("tma"):
        assert fa._FWD_OVERRIDE[-1] == "tma"
        got = fa.attention_forward(q, k, v, 0.25)
    assert not fa._FWD_OVERRIDE
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="forward impl='pad'; valid: ptr, tma"):
        with fa.use_fwd_impl("pad"):
            pass


def test_use_tma_sets_and_restores(gen, device):
    before = {"fwd": dict(fa.TMA_FWD), **{kind: dict(cfg) for kind, cfg in fa.TMA_BWD.items()}}
    with fa.use_tma(fa.TMA_WS):
        assert fa.TMA_FWD["ws"] and not fa.TMA_BWD["dkdv"]["ws"] and not fa.TMA_BWD["dq"]["ws"]
        assert fa.bwd_impl_for(torch.empty(1, 2, 1, 16)) == "tma" and fa._FWD_OVERRIDE[-1] == "tma"
    assert {"fwd": fa.TMA_FWD, **fa.TMA_BWD} == before and not fa._FWD_OVERRIDE
    assert fa.bwd_impl_for(torch.empty(1, 2, 1, 16)) == fa.BWD_IMPL
    with pytest.raises(ValueError, match="kinds are fwd, dq, dkdv, got 'dk'"):
        with fa.use_tma({"dk": {}}):
            pass
    assert {"fwd": fa.TMA_FWD, **fa.TMA_BWD} == before


def test_tma_ready_and_the_fallback(gen, device):
    """"tma" takes half-precision [B, N, H, D] views with (sample, token) rows at one stride and packed heads;
    anything else (fp32, a head of 60, a head-major layout, an unaligned base) runs "split" instead."""
    B, N, H, D = 2, 20, 2, 32
    x = torch.randn(B, N, 3, H, D, generator=gen).to(device, torch.bfloat16)
    q, k, v = x.unbind(2)
    o = torch.randn(B, N, H, D, generator=gen).to(device, torch.bfloat16)
    assert fa.tma_ready(q, k, v, o, o)
    assert not fa.tma_ready(*(t.float() for t in (q, k, v, o, o)))
    assert not fa.tma_ready(q[..., :30], k[..., :30], v[..., :30], o[..., :30], o[..., :30])  # D = 30
    head_major = o.transpose(1, 2).contiguous().transpose(1, 2)
    assert not fa.tma_ready(q, k, v, head_major, o)
    flat = torch.randn(B * N * H * D + 8, generator=gen).to(device, torch.bfloat16)
    shifted = flat[1:1 + B * N * H * D].view(B, N, H, D)  # 2 bytes past a 16-byte boundary
    assert not fa.tma_ready(q, k, v, shifted, o)
    lse = torch.zeros(B, H, N, device=device)
    g = torch.empty(B, N, 3, H, D, device=device, dtype=torch.float32)
    qf, kf, vf = x.float().unbind(2)
    launches = fa.bwd_launches(o.float(), qf, kf, vf, o.float(), lse, *g.unbind(2), D ** -0.5, None, "tma")
    assert [launch[0] for launch in launches] == [fa._attn_bwd]
    with pytest.raises(ValueError, match=r"ws=True \(warp specialisation\) needs warps=4 \(got 8\)"):
        fa.tma_bwd_launches(o, q, k, v, o, lse, *g.to(torch.bfloat16).unbind(2), 0.1,
                            {"dkdv": dict(ws=True, warps=8)})
    with pytest.raises(ValueError, match="dk dv kernel leaves dk / dv rows unwritten on an H100"):
        fa.tma_bwd_launches(o, q, k, v, o, lse, *g.to(torch.bfloat16).unbind(2), 0.1, {"dkdv": dict(ws=True)})
    with pytest.raises(ValueError, match="does not build the dq kernel warp-specialised"):
        fa.tma_bwd_launches(o, q, k, v, o, lse, *g.to(torch.bfloat16).unbind(2), 0.1, {"dq": dict(ws=True)})
    with pytest.raises(ValueError, match=r"needs bm=64 in the forward \(got 128\)"):
        fa.tma_fwd_launch(q, k, v, o, lse.view(B, H, N), 0.1, dict(ws=True, bm=128))


def test_separate_inputs_any_strides_and_scale(gen, device):
    """q, k, v as separate tensors with different strides (one transposed in memory), a non-default scale, a
    non-contiguous output gradient: the same result as the packed path and the float64 reference."""
    B, N, H, D = 2, 31, 3, 24
    q = torch.randn(B, N, H, D, generator=gen).to(device).requires_grad_()
    k_store = torch.randn(B, H, N, D, generator=gen).to(device)
    k = k_store.transpose(1, 2).detach().requires_grad_()  # [B, N, H, D] with head-major strides
    v = torch.randn(B, N, H, D, generator=gen).to(device).requires_grad_()
    gout = torch.randn(B, H, N, D, generator=gen).to(device).transpose(1, 2)  # non-contiguous
    out = fa.flash_attention(q, k, v, scale=0.3)
    grads = torch.autograd.grad(out, (q, k, v), gout)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*x64, 0.3)
    ref_grads = torch.autograd.grad(ref, x64, gout.double())
    assert rel(out, ref) < 1e-5
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        assert rel(got, want) < 1e-5
    packed = torch.stack([q, k, v], dim=2).detach().reshape(B, N, 3 * H * D).requires_grad_()
    out2, g2 = run_packed(packed, gout.reshape(B, N, H * D), H, scale=0.3)
    torch.testing.assert_close(out2.view(B, N, H, D), out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g2.view(B, N, 3, H, D), torch.stack(grads, 2), rtol=1e-6, atol=1e-6)


def test_packed_gradient_is_one_fresh_tensor(gen, device, bwd_impl):
    """The qkv gradient comes back whole, [B, N, 3 H D] contiguous, and a large score range (near one-hot
    softmax rows, ill-conditioned gradients) stays finite and within 2x plain fp32 PyTorch's error."""
    B, N, H, D = 1, 20, 2, 16
    qkv, gout = packed_inputs(gen, B, N, H, D, torch.float32, device, spread=8.0)  # scores ~ +-60
    out, g = run_packed(qkv, gout, H)
    assert g.is_contiguous() and g.shape == (B, N, 3 * H * D)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    ref_out, ref_g = run_reference(qkv, gout, H, D ** -0.5)
    base_out, base_g = plain_torch(qkv, gout, H, D ** -0.5)
    assert rel(out, ref_out) <= 2 * rel(base_out, ref_out) + 1e-5
    assert rel(g, ref_g) <= 2 * rel(base_g, ref_g) + 1e-5


def test_which_backward_runs(gen, device, monkeypatch):
    """use_bwd_impl inside its block (nested: the innermost), else the impl "auto" measured for the shape
    (BWD_BY_SHAPE), else BWD_IMPL; the autograd path launches that one, and both give the same gradient."""
    launched = []
    real = fa.bwd_launch

    def spy(*args, **kwargs):
        launched.append(args[11])  # impl
        return real(*args, **kwargs)

    monkeypatch.setattr(fa, "bwd_launch", spy)
    monkeypatch.setattr(fa, "BWD_BY_SHAPE", {})
    B, N, H, D = 1, 20, 2, 16
    qkv, gout = packed_inputs(gen, B, N, H, D, torch.float32, device)
    _, g_split = run_packed(qkv, gout, H)
    fa.BWD_BY_SHAPE[(B, N, H, D, torch.float32)] = "head"
    _, g_head = run_packed(qkv, gout, H)
    with fa.use_bwd_impl("split"):
        with fa.use_bwd_impl("head"):
            run_packed(qkv, gout, H)
        run_packed(qkv, gout, H)
    other, gout2 = packed_inputs(gen, B, N + 1, H, D, torch.float32, device)  # another shape: the default
    run_packed(other, gout2, H)
    assert launched == [fa.BWD_IMPL, "head", "head", "split", fa.BWD_IMPL]
    torch.testing.assert_close(g_head, g_split, rtol=1e-5, atol=1e-6)


def test_custom_ops_under_compile_fullgraph(gen, device):
    """torch.compile(fullgraph=True) goes through the torch.library ops (their fakes give the shapes): the same
    output and gradient as eager, no graph break; torch.library.opcheck passes for both ops."""
    torch._dynamo.reset()
    B, N, H, D = 2, 19, 2, 32
    qkv, gout = packed_inputs(gen, B, N, H, D, torch.float32, device)
    eager_out, eager_g = run_packed(qkv, gout, H)
    compiled = torch.compile(lambda x: fa.flash_attention_qkv(x, H), fullgraph=True, backend="aot_eager")
    out = compiled(qkv)
    (g,) = torch.autograd.grad(out, qkv, gout)
    torch.testing.assert_close(out, eager_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, eager_g, rtol=1e-6, atol=1e-6)
    q, k, v = (t.detach() for t in qkv.view(B, N, 3, H, D).unbind(2))
    torch.library.opcheck(torch.ops.tokenlabel.flash_attn_fwd, (q, k, v, 0.2))
    o, lse = fa.attention_forward(q, k, v, 0.2)
    do = torch.randn(B, N, H, D, generator=gen).to(device)
    torch.library.opcheck(torch.ops.tokenlabel.flash_attn_bwd, (do, q, k, v, o, lse, 0.2))


def test_bad_inputs_name_the_problem(gen, device, monkeypatch):
    x = torch.randn(1, 4, 2, 16, device=device)
    with pytest.raises(ValueError, match="one shape"):
        fa.flash_attention(x, x, x[:, :3])
    with pytest.raises(ValueError, match="float16, bfloat16, float32"):
        fa.flash_attention(x.double(), x.double(), x.double())
    with pytest.raises(ValueError, match=r"\[B, N, H, Dh\]"):
        fa.flash_attention(x[0], x[0], x[0])
    big = torch.randn(1, 2, 1, 300, device=device)
    with pytest.raises(ValueError, match="head dim 300"):
        fa.flash_attention(big, big, big)
    with pytest.raises(ValueError, match="3 \\* num_heads"):
        fa.flash_attention_qkv(torch.randn(1, 4, 40, device=device), 3)
    with pytest.raises(ValueError, match="empty"):
        e = torch.randn(1, 0, 2, 16, device=device)
        fa.flash_attention(e, e, e)
    with pytest.raises(ValueError, match="impl='nope'; valid: split, head, split2"):
        with fa.use_bwd_impl("nope"):
            pass
    with pytest.raises(ValueError, match="impl='nope'"):
        fa.bwd_launch(x, x, x, x, x, x, x, x, x, 1.0, impl="nope")
    with pytest.raises(ValueError, match="split2.*two launches"):
        fa.bwd_launch(x, x, x, x, x, x, x, x, x, 1.0, impl="split2")
    with pytest.raises(ValueError, match=r'"split2" takes a pair of configs.*\(64, 64, 4, 2\)'):
        fa.bwd_launches(x, x, x, x, x, x, x, x, x, 1.0, (64, 64, 4, 2), "split2")
    with pytest.raises(ValueError, match="kind='dk'; valid: split, dq, dkdv"):
        fa.bwd_launch(x, x, x, x, x, x, x, x, x, 1.0, kind="dk")
    with pytest.raises(ValueError, match=r"config \(64, 64, 4\): \(BLOCK_M, BLOCK_N, num_warps"):
        fa.attention_forward(x, x, x, 1.0, config=(64, 64, 4))
    with pytest.raises(ValueError, match="tail='odd'; valid: pow2, pad, fold"):
        fa.attention_forward(x, x, x, 1.0, config=(64, 64, 4, 1, "odd"))
    with pytest.raises(ValueError, match="kind='bwd_x'; valid: fwd, bwd, bwd_head, bwd_dq, bwd_dkdv"):
        fa._config(64, "bwd_x", torch.bfloat16)
    with pytest.raises(RuntimeError, match="inside"):
        with fa.use_bwd_impl("head"):
            assert fa.bwd_impl_for(x) == "head"
            raise RuntimeError("inside")
    assert fa.bwd_impl_for(x) == fa.BWD_IMPL  # left on the exception
    monkeypatch.setattr(fa, "_INTERPRET", False)
    cpu = torch.randn(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*attn='sdpa'"):
        fa.flash_attention(cpu, cpu, cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(128, 197, 6, 64), (16, 577, 8, 64), (32, 197, 4, 60), (8, 1, 2, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_realistic_shapes(gen, dtype, shape, bwd_impl):
    """LV-ViT-S/M at 224 and 384 and -T's heads of 60 on the GPU, every dtype within 2x plain PyTorch's error in
    the same dtype against float64 (fp32: IEEE dots here, no TF32 in the plain path either; the kernels' exp2 and
    log2 are the hardware approximations, hence the 1e-5 floor); the reference on the first samples."""
    B, N, H, D = shape
    qkv, gout = packed_inputs(gen, B, N, H, D, dtype, "cuda", spread=2.0)
    out, g = run_packed(qkv, gout, H)
    n = min(B, 8)
    sub, gsub = qkv.detach()[:n].requires_grad_(), gout[:n]
    ref_out, ref_g = run_reference(sub, gsub, H, D ** -0.5)
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    base_out, base_g = plain_torch(sub, gsub, H, D ** -0.5)
    assert rel(out[:n], ref_out) <= 2 * rel(base_out, ref_out) + floor
    assert rel(g[:n], ref_g) <= 2 * rel(base_g, ref_g) + floor


def replayed_and_eager(qkv, gout, H):
    """((out, grad) of run_packed captured into a CUDA graph on other inputs, then replayed on qkv; the same run
    eagerly on qkv): what reduce-overhead does, and what it must equal."""
    static = qkv.detach().clone().requires_grad_()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            run_packed(static, gout, H)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, g = run_packed(static, gout, H)
    with torch.no_grad():
        static.copy_(qkv)
    graph.replay()
    return (out, g), run_packed(qkv, gout, H)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_matches_eager(gen, bwd_impl):
    """Captured into a CUDA graph (as reduce-overhead does) and replayed on new inputs: the eager result."""
    B, N, H, D = 32, 197, 6, 64
    qkv, gout = packed_inputs(gen, B, N, H, D, torch.bfloat16, "cuda")
    (out, g), (want_out, want_g) = replayed_and_eager(qkv, gout, H)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(g, want_g, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_tma_warp_specialised_against_the_pointer_kernels(gen):
    """The "tma" kernels with TMA_WS (the forward warp-specialised, the backward plain) at an LV-ViT-S shape with
    several items per program, captured in a CUDA graph and replayed on new inputs: the eager result exactly, and the
    pointer kernels' ("ptr" forward, "split" backward) within bf16 rounding of the float64 reference."""
    B, N, H, D = 32, 197, 6, 64
    qkv, gout = packed_inputs(gen, B, N, H, D, torch.bfloat16, "cuda")
    with fa.use_tma(fa.TMA_WS):
        (out, g), (want_out, want_g) = replayed_and_eager(qkv, gout, H)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(g, want_g, rtol=0, atol=0)
    with fa.use_bwd_impl("split"):
        base_out, base_g = run_packed(qkv, gout, H)
    ref_out, ref_g = run_reference(qkv, gout, H, D ** -0.5)
    for got, base, ref in ((out, base_out, ref_out), (g, base_g, ref_g)):
        err, base_err = (float((t.double() - ref).abs().max()) for t in (got, base))
        assert err <= 2 * base_err + 1e-3 * float(ref.abs().max()), (err, base_err)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_sm90_build_of_the_default_configs_does_not_spill(dtype):
    """The default tiles, compiled ahead of time for sm_90 with Triton's bundled ptxas (no GPU needed) at
    LV-ViT-S/224's strides: no registers spilled; in bf16 the key loop is software-pipelined (cp.async).
    In a subprocess without TRITON_INTERPRET (interpreted kernels do not compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tokenlabel.kernels._attn_tune", "resources", "--shape", "S224",
                          "--dtype", dtype, "--defaults-only"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [dict(kv.split("=", 1) for kv in line.split(" ") if "=" in kv) for line in run.stdout.splitlines()
            if line.startswith("kind=")]
    tma = ["bwd_tma_dkdv", "bwd_tma_dq"] if dtype == "bf16" else []  # "tma" is for half precision
    want = ["bwd", "bwd_dkdv", "bwd_dq", "bwd_head"] + tma + ["fwd"] + (["fwd_tma"] if tma else [])
    assert sorted(r["kind"] for r in rows) == want, run.stdout
    for r in rows:
        assert "error" not in r, r
        assert int(r["stack"]) == 0, r
        assert int(r["regs"]) <= 255 and int(r["smem"]) <= 227 * 1024, r
        if dtype == "bf16":
            assert int(r["async_copies"]) > 0, f"key loop not pipelined: {r}"


def test_sm90_builds_of_the_tma_kernels_warp_specialise_with_ws():
    """"tma" at LV-ViT-S/224 bf16 compiled for sm_90 (no GPU): with TMA_WS the forward comes out warp-specialised
    (12 warps from 4: a producer and two consumer warp groups; TMA_WS leaves the backward's two kernels plain);
    the default builds have no spills, and the dk dv kernel needs fewer registers than the split kernel's 255."""
    code = """
import json, torch
from tokenlabel.kernels import flash_attention as fa
from tokenlabel.kernels._common import aot_sm90, compile_sm90
B, N, H, D = 128, 197, 6, 64
qkv = torch.empty(B, N, 3, H, D, device="meta", dtype=torch.bfloat16)
q, k, v = qkv.unbind(2)
o = torch.empty(B, N, H, D, device="meta", dtype=torch.bfloat16)
lse = torch.empty(B, H, N, device="meta")
out = {}
launches = {"default fwd": fa.tma_fwd_launch(q, k, v, o, lse, 0.125, sms=132),
            "ws fwd": fa.tma_fwd_launch(q, k, v, o, lse, 0.125, fa.TMA_WS["fwd"], sms=132)}
assert set(fa.TMA_WS) == {"fwd"}  # the backward kernels stay plain under TMA_WS: their default builds below
launches.update(zip(("default dq", "default dkdv"),
                    fa.tma_bwd_launches(o, q, k, v, o, lse, *torch.empty_like(qkv).unbind(2), 0.125, sms=132)))
for name, launch in launches.items():
    out[name] = [*aot_sm90(launch)[:2], compile_sm90(launch).metadata.num_warps]
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    builds = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (regs, stack, warps) in builds.items():
        assert stack == 0, builds
        assert warps == (12 if name == "ws fwd" else 4), builds
    assert builds["default dkdv"][0] < 255, builds


def test_attn_tune_time_rows_check_every_config(monkeypatch):
    """_attn_tune's GPU timing loop, run on the CPU (interpreted, a tiny shape, a few configs per kernel, a stand-in
    timer): every config is launched and checked against SDPA (forward) or the default split backward, and the
    best rows name the fastest checked config per kind and split2's sum."""
    from tokenlabel.kernels import _attn_tune

    monkeypatch.setattr(_attn_tune, "_graph_ms", lambda fn, **kw: (fn(), 1.0)[1])
    monkeypatch.setattr(_attn_tune, "time_candidates",
                        lambda kind: [(16, 16, 4, 1), (32, 16, 4, 1, "pad")] if kind == "fwd" else [(16, 32, 4, 1)])
    rows = list(_attn_tune.time_configs("tiny", torch.float32, device="cpu"))
    assert [r["kind"] for r in rows] == ["sdpa", "sdpa", "fwd", "fwd", "bwd", "bwd_head", "bwd_dq", "bwd_dkdv",
                                         "best", "best", "best", "best", "best", "best"]
    for r in rows[2:8]:
        assert r["ms"] == 1.0 and r["max_abs_err"] < 1e-5, r
    assert rows[-1]["config"].startswith("split2") and rows[-1]["ms"] == 2.0
    # a launch that leaves its part of the gradient unwritten has an infinite error and is never the best
    real = _attn_tune._launch
    monkeypatch.setattr(_attn_tune, "_launch", lambda kind, *args: _NoOpKernel.wrap(real(kind, *args)))
    rows = list(_attn_tune.time_configs("tiny", torch.float32, device="cpu", kinds=("bwd_dq",)))
    assert [r["kind"] for r in rows] == ["sdpa", "sdpa", "bwd_dq"]
    assert rows[2]["max_abs_err"] == float("inf")


def test_attn_tune_times_the_tma_pair(monkeypatch):
    """The "tma" kinds in _attn_tune's timing loop (interpreted, bf16, a stand-in timer): the forward checked
    against SDPA, the dq launch on dq, the dk dv launch (after its pair's dq launch wrote the row sums) on dk and
    dv, a best row for each and for the backward pair's sum; in fp32 they are left out ("split" runs there)."""
    from tokenlabel.kernels import _attn_tune

    monkeypatch.setattr(_attn_tune, "_graph_ms", lambda fn, **kw: (fn(), 1.0)[1])
    rows = list(_attn_tune.time_configs("tiny", torch.bfloat16, device="cpu", kinds=tuple(_attn_tune.TMA_KINDS),
                                        limit=2))
    assert [r["kind"] for r in rows] == (["sdpa", "sdpa"] + ["fwd_tma"] * 2 + ["bwd_tma_dq"] * 2
                                         + ["bwd_tma_dkdv"] * 2 + ["best"] * 4)
    for r in rows[2:8]:
        assert "error" not in r and r["ms"] == 1.0 and r["max_abs_err"] < 0.05, r
    assert rows[2]["default"] and "'ws':True" in rows[3]["config"]
    assert rows[-1]["config"].startswith("tma ") and rows[-1]["ms"] == 2.0
    fp32 = list(_attn_tune.time_configs("tiny", torch.float32, device="cpu", kinds=tuple(_attn_tune.TMA_KINDS)))
    assert [r["kind"] for r in fp32] == ["sdpa", "sdpa"]


class _NoOpKernel:
    """A launch tuple whose kernel writes nothing (``kernel[grid](...)`` returns None)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None

    @classmethod
    def wrap(cls, launch):
        return (cls(),) + tuple(launch[1:])
