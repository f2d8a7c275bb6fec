"""fc1 + bias + GELU with GELU in the GEMM epilogues (kernels/linear_gelu.py) against the definition in float64:
y = GELU(x W1^T + b1) W2^T and the gradients of x, W1, b1, W2 (CPU: interpreted)."""
import pytest
import torch
import torch.nn.functional as F

from script_helpers import load_script, sm90_builds
from tokenlabel.kernels import _common
from tokenlabel.kernels import bias_gelu as bg
from tokenlabel.kernels import linear_gelu as lg


@pytest.fixture(params=[(c, i) for c in bg.CDFS for i in lg.IMPLS], ids=lambda p: f"{p[0]}-{p[1]}")
def cdf(request, monkeypatch):
    """Each way Phi is computed (bias_gelu.CDFS) in both GEMMs' epilogues, with each GEMM (lg.IMPLS: pointer loads,
    TMA and persistent programs)."""
    cdf, impl = request.param
    monkeypatch.setattr(lg, "FWD", {**lg.FWD, "cdf": cdf, "impl": impl})
    monkeypatch.setattr(lg, "BWD", {**lg.BWD, "cdf": cdf, "impl": impl})
    return cdf


def make(gen, M, C, N, device, dtype=torch.float32):
    """Inputs at a trained ViT's scale: x ~ LayerNorm output, weights ~ trunc-normal(0.02)-like but larger so that
    GELU sees both tails, fp32 parameters (as under autocast)."""
    x = torch.randn(M, C, generator=gen).to(device, dtype).requires_grad_()
    w1 = (torch.randn(N, C, generator=gen) * 2 / C ** 0.5).to(device).requires_grad_()
    b1 = torch.randn(N, generator=gen).to(device).requires_grad_()
    w2 = (torch.randn(C, N, generator=gen) / N ** 0.5).to(device).requires_grad_()
    dy = torch.randn(M, C, generator=gen).to(device, dtype)
    return x, w1, b1, w2, dy


def grads(y, inputs, dy):
    return (y, *torch.autograd.grad(y, inputs, dy))


def reference(x, w1, b1, w2, dy, dtype=torch.float64):
    t = [v.detach().to(dtype).requires_grad_() for v in (x, w1, b1, w2)]
    y = F.linear(F.gelu(F.linear(t[0], t[1], t[2])), t[3])
    return grads(y, t, dy.to(dtype))


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


NAMES = ("y", "dx", "dw1", "db1", "dw2")
# realistic (LV-ViT-S's MLP over 2 x 197 tokens; -T's 240 -> 720) and awkward (K not a multiple of the K block, a
# single row, one hidden unit, rows and columns that leave the last tile short)
SHAPES = [(394, 384, 1152), (197, 240, 720), (1, 8, 1), (130, 72, 129), (5, 24, 40)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_float64(gen, device, shape, cdf):
    """Within 2e-5 of float64, or within 2x torch's own fp32 error where that is larger: with one hidden unit and
    one row every output scales one GELU value, and in GELU's negative tail 0.5 z (1 + erf(z / sqrt 2)) cancels in
    fp32 (cdf "erf", as torch computes it: at z = -4.37 both are 1.2e-3 off, seed 2376229715 of the CI of
    98db224)."""
    x, w1, b1, w2, dy = make(gen, *shape, device)
    got = grads(lg.mlp_gelu(x, w1, b1, w2), (x, w1, b1, w2), dy)
    want = reference(x, w1, b1, w2, dy)
    base = reference(x, w1, b1, w2, dy, torch.float32)
    for name, g, w, b, t in zip(NAMES, got, want, base, (x, x, w1, b1, w2)):
        assert g.shape == w.shape and g.dtype == t.dtype, name
        assert rel(g, w) < max(2e-5, 2 * rel(b, w)), (name, rel(g, w), rel(b, w))


@pytest.mark.parametrize("impl,flatten,ws", [("ptr", False, False), ("tma", False, False), ("tma", True, False),
                                             ("tma", False, True)])
def test_small_tiles_walk_groups_and_k_steps(gen, device, monkeypatch, impl, flatten, ws):
    """Tiles much smaller than the problem: several K steps, grouped launch order with a short last group, masked
    edge tiles in both directions, and (TMA) persistent programs taking several tiles each, two of them redoing the
    last tile; the forward's z and g and the backward's dh and db1 checked directly. ws: the warp-specialised tile
    loop, with the 64-row tiles it needs in the backward (2 x 4 tiles: 4 programs x 2 tiles)."""
    small = dict(bm=64 if ws else 16, bn=32, bk=16, warps=4, stages=2, group=3, cdf="erf", impl=impl,
                 per_sm=3 if ws else 5, flatten=flatten, ws=ws)
    monkeypatch.setattr(lg, "FWD", small)
    monkeypatch.setattr(lg, "BWD", small)
    M, C, N = 100, 56, 100  # 7 x 4 tiles; TMA: 10 programs (2 "SMs" under the interpreter) x 3 tiles, 2 repeats
    if impl == "tma" and device.type != "cuda":
        slots = small["per_sm"] * lg.sm_count(device)
        assert lg._persistent_grid(8 if ws else 28, slots) == ((4, 2) if ws else (10, 3))
    x = torch.randn(M, C, generator=gen).to(device)
    w1 = torch.randn(N, C, generator=gen).to(device) / 4
    b1 = torch.randn(N, generator=gen).to(device)
    w2 = torch.randn(C, N, generator=gen).to(device) / 8
    dy = torch.randn(M, C, generator=gen).to(device)
    z, g = lg.linear_gelu_forward(x, w1, b1)
    z64 = x.double() @ w1.double().t() + b1.double()
    assert rel(z, z64) < 1e-5 and rel(g, F.gelu(z64)) < 1e-5
    dh, db1 = lg.linear_gelu_backward(dy, w2, z)
    zd = z.double().requires_grad_()
    want_dh, = torch.autograd.grad(F.gelu(zd), zd, dy.double() @ w2.double())
    assert rel(dh, want_dh) < 1e-5 and rel(db1, want_dh.sum(0)) < 1e-5
    assert db1.dtype == torch.float32 and db1.shape == (N,)


@pytest.mark.parametrize("impl", [*lg.IMPLS, "tma_ws"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_within_twice_torch_error(gen, device, dtype, impl, monkeypatch):
    """Under autocast (x in the half dtype from the LayerNorm, fp32 parameters): every output within 2x the error
    of torch's own autocast MLP against float64 (plus one ulp of the dtype); the gradients keep the parameters'
    dtypes. "tma_ws": the TMA kernels warp-specialised (on a GPU, the half-precision builds are; 64-row backward
    tiles)."""
    ws = impl == "tma_ws"
    monkeypatch.setattr(lg, "FWD", {**lg.FWD, "impl": "tma" if ws else impl, "ws": ws})
    monkeypatch.setattr(lg, "BWD", {**lg.BWD, "impl": "tma" if ws else impl, "ws": ws, **({"bm": 64} if ws else {})})
    x, w1, b1, w2, dy = make(gen, 394, 384, 1152, device, dtype)
    with torch.autocast(device.type, dtype=dtype):
        y = lg.mlp_gelu(x, w1, b1, w2)
    got = grads(y, (x, w1, b1, w2), dy)
    assert y.dtype == dtype
    with torch.autocast(device.type, dtype=dtype):
        yt = F.linear(F.gelu(F.linear(x, w1, b1)), w2)
    base = grads(yt, (x, w1, b1, w2), dy)
    want = reference(x, w1, b1, w2, dy)
    eps = torch.finfo(dtype).eps
    for name, g, b, w, t in zip(NAMES, got, base, want, (x, x, w1, b1, w2)):
        assert g.dtype == (dtype if name == "y" else t.dtype), name
        assert rel(g, w) <= 2 * rel(b, w) + eps, (name, rel(g, w), rel(b, w))


def test_leading_dims_and_bad_input(device):
    x = torch.randn(2, 3, 8, device=device)
    w1, b1, w2 = torch.randn(16, 8, device=device), torch.randn(16, device=device), torch.randn(8, 16, device=device)
    y = lg.mlp_gelu(x, w1, b1, w2)
    assert y.shape == (2, 3, 8)
    assert torch.allclose(y, F.linear(F.gelu(F.linear(x, w1, b1)), w2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"w1 must be \[N, 8\]"):
        lg.mlp_gelu(x, torch.randn(16, 7, device=device), b1, w2)
    with pytest.raises(ValueError, match=r"b1 must be \[16\]"):
        lg.mlp_gelu(x, w1, torch.randn(15, device=device), w2)
    with pytest.raises(ValueError, match=r"w2 must be \[C_out, 16\]"):
        lg.mlp_gelu(x, w1, b1, torch.randn(8, 15, device=device))
    with pytest.raises(ValueError, match="non-empty"):
        lg.mlp_gelu(x[:0], w1, b1, w2)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        lg.mlp_gelu(x.double(), w1, b1, w2)


@pytest.mark.parametrize("impl,flatten,ws", [("ptr", False, False), ("tma", False, False), ("tma", True, False),
                                             ("tma", False, True)])
def test_sm90_builds_are_pipelined_and_spill_little(impl, flatten, ws):
    """Both GEMMs compiled ahead of time for sm_90 (Triton's bundled ptxas, no GPU) at LV-ViT-S's MLP shape with the
    default tilings: the K loop software-pipelined (cp.async copies; TMA loads for "tma"), at most 64 bytes spilled
    (the swept best "ptr" tilings spill 8 and 24 bytes in the epilogue; a tiling that spills in the loop spills
    hundreds: 128 x 256 x 64 at 8 warps spills 656). ws (backward with 64-row tiles): the build is warp-specialised
    (a producer and two consumer warp groups: 12 warps from the tiling's 4), and the others are not."""
    bwd_rows = ", bm=64" if ws else ""
    r = sm90_builds(f"linear_gelu.FWD.update(impl={impl!r}, flatten={flatten}, ws={ws}) or "
                    f"linear_gelu.BWD.update(impl={impl!r}, flatten={flatten}, ws={ws}{bwd_rows}) or "
                    "linear_gelu.sm90_resources()")
    for name in ("fwd", "bwd"):
        regs, stack, _, copies, warps = r[name]
        assert stack <= 64 and regs <= 255, (name, r)
        assert copies > 0, f"{name} K loop not software-pipelined: {r}"
        assert warps == (12 if ws else 4), (name, r)


def test_ws_tilings_the_pass_cannot_build_are_refused(monkeypatch):
    """ws=True only where Triton's Hopper warp specialisation builds: a clear ValueError naming each unmet need,
    before a launch (a 128-row backward tile aborts the process inside Triton 3.6's pass)."""
    ok = dict(lg.FWD, impl="tma", ws=True, warps=4, flatten=False, bm=64)
    lg.check_tiling(ok, backward=True)
    lg.check_tiling({**ok, "bm": 128}, backward=False)
    with pytest.raises(ValueError, match=r"bm=64 in the backward \(got 128\)"):
        lg.check_tiling({**ok, "bm": 128}, backward=True)
    with pytest.raises(ValueError, match=r"impl='tma' \(got 'ptr'\), warps=4 \(got 8\), flatten=False"):
        lg.check_tiling({**ok, "impl": "ptr", "warps": 8, "flatten": True}, backward=False)
    lg.check_tiling({**ok, "ws": False, "bm": 128, "warps": 8}, backward=True)  # without ws: anything goes
    with pytest.raises(ValueError, match=r"bn <= 128 \(got 256"):
        lg.check_tiling({**ok, "bn": 256}, backward=False)
    before = dict(lg.FWD), dict(lg.BWD)
    with lg.use_ws():
        for table, backward in ((lg.FWD, False), (lg.BWD, True)):
            assert table["ws"] and table["impl"] == "tma" and table["bm"] == 64
            lg.check_tiling(table, backward)
    assert (dict(lg.FWD), dict(lg.BWD)) == before
    monkeypatch.setattr(lg, "FWD", {**ok, "warps": 8})  # the launcher checks before it launches
    with pytest.raises(ValueError, match=r"needs warps=4 \(got 8\)"):
        lg.linear_gelu_forward(torch.randn(4, 8), torch.randn(16, 8), torch.randn(16))


def test_use_impl_switches_both_and_restores():
    before = lg.FWD["impl"], lg.BWD["impl"]
    with lg.use_impl("tma"):
        assert lg.FWD["impl"] == lg.BWD["impl"] == "tma"
    assert (lg.FWD["impl"], lg.BWD["impl"]) == before
    with pytest.raises(ValueError, match="impl must be one of ptr, tma"):
        with lg.use_impl("wgmma"):
            pass
    assert (lg.FWD["impl"], lg.BWD["impl"]) == before


def test_custom_ops_under_compile_fullgraph(gen, device):
    """torch.compile(fullgraph=True) goes through the torch.library ops (their fakes give the shapes): the same
    output and gradients as eager, no graph break; torch.library.opcheck passes for both ops."""
    torch._dynamo.reset()
    x, w1, b1, w2, dy = make(gen, 37, 24, 40, device)
    eager = grads(lg.mlp_gelu(x, w1, b1, w2), (x, w1, b1, w2), dy)
    compiled = torch.compile(lambda *a: lg.mlp_gelu(*a), fullgraph=True, backend="aot_eager")
    got = grads(compiled(x, w1, b1, w2), (x, w1, b1, w2), dy)
    for name, g, e in zip(NAMES, got, eager):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6, msg=name)
    xd, w1d, b1d, w2d = (t.detach() for t in (x, w1, b1, w2))
    torch.library.opcheck(torch.ops.tokenlabel.linear_gelu_fwd, (xd, w1d, b1d))
    z, _ = lg.linear_gelu_forward(xd, w1d, b1d)
    torch.library.opcheck(torch.ops.tokenlabel.linear_gelu_bwd, (dy, w2d, z))


def test_tma_launch_keeps_an_allocator_someone_set(gen, device):
    """The TMA path sets Triton's scratch allocator only where none is set (it lives in a ContextVar: autograd's
    backward thread starts without one) and leaves a caller's own allocator in place."""
    import threading

    from triton.runtime import _allocation

    calls = []

    def mine(size, alignment, stream):
        calls.append(size)
        return torch.empty(size, dtype=torch.int8, device=device)

    x, w1, b1, w2, dy = make(gen, 40, 16, 32, device)
    with lg.use_impl("tma"):
        token = _allocation._allocator.set(mine)
        try:
            lg.linear_gelu_forward(x.detach(), w1.detach(), b1.detach())
            assert _allocation._allocator.get() is mine
        finally:
            _allocation._allocator.reset(token)
        seen = []

        def fresh_thread():  # a thread starts with Triton's null allocator, as autograd's does
            seen.append(_allocation._allocator.get() is _allocation._NULL_ALLOCATOR)
            lg.linear_gelu_forward(x.detach(), w1.detach(), b1.detach())
            seen.append(_allocation._allocator.get() is _common._scratch)

        t = threading.Thread(target=fresh_thread)
        t.start()
        t.join()
    assert seen == [True, True]
    assert calls or device.type != "cuda"  # the interpreter makes descriptors without scratch


def test_sweep_candidates_and_plain_tma_gemm(gen, device):
    """scripts/sweep_mlp_gemm.py: its candidate lists (tma_ws: warp-specialised TMA tilings, one program per SM),
    and its plain persistent TMA GEMM (the "gemm" rows of impls tma / tma_ws) against torch, masked edges in both
    directions and K not a multiple of the K block (TMA zero-fills), several tiles per program."""
    sw = load_script("sweep_mlp_gemm")
    ws = sw.candidates(100, "tma_ws")
    assert ws and all(c["ws"] and c["impl"] == "tma" and c["warps"] == 4 for c in ws)
    assert not any(c["ws"] for impl in ("ptr", "tma") for c in sw.candidates(100, impl))
    x = torch.randn(100, 56, generator=gen).to(device)
    w = torch.randn(70, 56, generator=gen).to(device)
    for cfg in (ws[0], sw.candidates(1, "tma")[0]):
        cfg = dict(cfg, bm=32, bn=32, bk=16, per_sm=1)
        out = sw.plain_gemm(x, w, cfg)
        # the diagnostic's dot takes Triton's default precision: TF32 for fp32 operands on a GPU
        assert rel(out, x.double() @ w.double().t()) < (1e-5 if device.type == "cpu" else 5e-3), cfg

