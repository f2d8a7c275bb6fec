"""The stride-1 conv weight-gradient kernel (kernels/conv_wgrad.py) against torch's in float64, and the conv whose
backward uses it (the stem's s2d conv1), on fresh random inputs (CPU: interpreted)."""
import pytest
import torch
import torch.nn.functional as F

from script_helpers import sm90_builds
from tokenlabel.kernels import conv_wgrad as cw


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def draw(gen, B, CI, Hp, Wp, kh, kw, CO, dtype=torch.float32, device="cpu"):
    x = cl(torch.randn(B, CI, Hp, Wp, generator=gen).to(device, dtype))
    dy = cl(torch.randn(B, CO, Hp - kh + 1, Wp - kw + 1, generator=gen).to(device, dtype))
    return dy, x


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# the stem's conv1 in s2d form (16 folded channels, 4 x 4, 64 out), several column blocks with a short last one
# (kh != kw, 3 and 5 channels), a kernel the size of the input (one output), 1 channel in and out
SHAPES = [(2, 16, 11, 11, 4, 4, 64), (3, 3, 9, 40, 2, 3, 5), (1, 2, 5, 4, 5, 4, 3), (2, 1, 6, 7, 3, 3, 1)]
TILINGS = [{}, dict(block_x=16, warps=2, per_sm=3, stages=1), dict(block_x=32, warps=4, per_sm=64, stages=3)]


@pytest.mark.parametrize("tiling", TILINGS, ids=["default", "small", "many-programs"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_float64(gen, device, monkeypatch, shape, tiling):
    monkeypatch.setattr(cw, "TILING", {**cw.TILING, **tiling})
    dy, x = draw(gen, *shape, device=device)
    B, CI, Hp, Wp, kh, kw, CO = shape
    got = cw.conv_weight_grad(dy, x, kh, kw)
    want = torch.nn.grad.conv2d_weight(x.double(), (CO, CI, kh, kw), dy.double())
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_accumulate_in_fp32(gen, device, dtype):
    """Half-precision dy and x: products and sums in fp32, so the result is float64's on the same rounded inputs
    up to the summation order."""
    dy, x = draw(gen, 2, 16, 12, 13, 4, 4, 64, dtype=dtype, device=device)
    got = cw.conv_weight_grad(dy, x, 4, 4)
    want = torch.nn.grad.conv2d_weight(x.double(), (64, 16, 4, 4), dy.double())
    assert got.dtype == torch.float32 and rel(got, want) < 1e-5


def test_conv2d_s1_forward_and_gradients(gen, device):
    """conv2d_s1: F.conv2d's output and input gradient, our weight gradient, in float64 terms; under autocast the
    operands are cast as F.conv2d's would be and the output is the autocast dtype."""
    x = torch.randn(2, 6, 10, 9, generator=gen).to(device).requires_grad_()
    w = torch.randn(5, 6, 3, 2, generator=gen).to(device).requires_grad_()
    g = torch.randn(2, 5, 8, 8, generator=gen).to(device)
    out = cw.conv2d_s1(x, w)
    grads = torch.autograd.grad(out, (x, w), g)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.conv2d(xd, wd)
    ref_grads = torch.autograd.grad(ref, (xd, wd), g.double())
    assert rel(out, ref) < 1e-5 and rel(grads[0], ref_grads[0]) < 1e-5 and rel(grads[1], ref_grads[1]) < 1e-5
    assert grads[1].dtype == torch.float32
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        out = cw.conv2d_s1(x, w)
        base = F.conv2d(x, w)
    assert out.dtype == base.dtype == torch.bfloat16
    dw, = torch.autograd.grad(out, (w,), g.to(out.dtype))
    dw_base, = torch.autograd.grad(base, (w,), g.to(base.dtype))
    assert dw.dtype == torch.float32 and rel(dw, ref_grads[1]) <= 2 * rel(dw_base, ref_grads[1]) + 1e-2


def test_custom_op_under_compile_and_opcheck(gen, device):
    torch._dynamo.reset()
    x = torch.randn(2, 4, 7, 7, generator=gen).to(device).requires_grad_()
    w = torch.randn(8, 4, 2, 2, generator=gen).to(device).requires_grad_()
    g = torch.randn(2, 8, 6, 6, generator=gen).to(device)
    eager = torch.autograd.grad(cw.conv2d_s1(x, w), (x, w), g)
    compiled = torch.compile(cw.conv2d_s1, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, w), (x, w), g)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    dy, xx = draw(gen, 2, 4, 7, 7, 2, 2, 8, device=device)
    torch.library.opcheck(torch.ops.tokenlabel.conv_weight_grad, (dy, xx, 2, 2))


def test_bad_inputs_name_the_problem(gen, device):
    dy, x = draw(gen, 2, 3, 8, 8, 3, 3, 4, device=device)
    with pytest.raises(ValueError, match="x must be a channels-last"):
        cw.conv_weight_grad(dy, x.contiguous(), 3, 3)
    with pytest.raises(ValueError, match="dy and x must share dtype"):
        cw.conv_weight_grad(dy.half(), x, 3, 3)
    with pytest.raises(ValueError, match=r"dy \(2, 4, 6, 6\) is not the output of a 2 x 3 stride-1"):
        cw.conv_weight_grad(dy, x, 2, 3)
    with pytest.raises(ValueError, match="kernel 9 x 3 does not fit the 8 x 8 input"):
        cw.conv_weight_grad(dy, x, 9, 3)
    with pytest.raises(ValueError, match="must be float16, bfloat16 or float32"):
        cw.conv_weight_grad(dy.double(), x.double(), 3, 3)
    big_dy, big_x = draw(gen, 1, 64, 6, 6, 3, 3, 128, device=device)  # 128 x 576 -> a 128 x 1024 accumulator
    with pytest.raises(ValueError, match="128 output channels x 576 taps x input channels need a 131072-value"):
        cw.conv_weight_grad(big_dy, big_x, 3, 3)
    with pytest.raises(ValueError, match=r"weight \[CO, C, kh, kw\] expected"):
        cw.conv2d_s1(x, torch.randn(4, 5, 3, 3))


def test_sm90_build_uses_wgmma_without_spills():
    """The kernel compiled ahead of time for sm_90 at the stem's conv1 (s2d form, B 128): no spills, its loads
    pipelined (cp.async), within one SM's shared memory."""
    (regs, stack, shared, copies), = sm90_builds("conv_wgrad.sm90_resources()").values()
    assert stack == 0 and regs <= 255 and copies > 0 and shared <= 227 * 1024, (regs, stack, shared, copies)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_stem_conv1_shape(gen, dtype):
    """The s2d conv1 of LV-ViT-S at B 16 ([16, 16, 115, 115] -> [16, 64, 112, 112]) on the GPU, against float64."""
    dy, x = draw(gen, 16, 16, 115, 115, 4, 4, 64, dtype=dtype, device="cuda")
    got = cw.conv_weight_grad(dy, x, 4, 4)
    want = torch.nn.grad.conv2d_weight(x.double(), (64, 16, 4, 4), dy.double())
    assert rel(got, want) < 1e-5
