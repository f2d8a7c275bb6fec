"""The LV-ViT stem's exact reformulations: patchify conv as a GEMM, stride-2 conv on a space-to-depth input."""
import pytest
import torch
import torch.nn.functional as F

from tokenlabel.models import create_model
from tokenlabel.models.lvvit import STEM_IMPLS, conv_stride2_s2d, patch_linear, patches_of, patchify_linear


def grad_atol(ref):
    """The absolute tolerance of an LV-ViT stem gradient against ``ref``: 1e-5, or 4e-6 of its
    largest element where that is more. The stem's conv weight gradients reach ~20, and fp32 sums over the batch
    then land up to 2.7e-5 from float64 on elements near zero (16 draws; CI once failed conv3.weight at a flat 1e-5,
    on torch's own conv)."""
    return max(1e-5, 4e-6 * float(ref.abs().max()))


def grads_of(fn, *tensors, gen):
    out = fn(*tensors)
    gout = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    return out, torch.autograd.grad(out, [t for t in tensors if t is not None], gout)


@pytest.mark.parametrize("B,C,H,W,k,D,bias", [(2, 64, 32, 48, 8, 24, True),   # the stem's C and k
                                               (3, 5, 12, 8, 4, 7, False),    # awkward: C=5, H != W, no bias
                                               (1, 3, 6, 6, 2, 1, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_patchify_linear_is_the_conv(B, C, H, W, k, D, bias, channels_last, gen):
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(D, C, k, k, generator=gen, dtype=torch.float64)
    b = torch.randn(D, generator=gen, dtype=torch.float64) if bias else None
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    ref, ref_g = grads_of(lambda *t: F.conv2d(x, w, b, stride=k), *leaves, gen=torch.Generator().manual_seed(seed))
    got, got_g = grads_of(lambda *t: patchify_linear(x, w, b), *leaves, gen=torch.Generator().manual_seed(seed))
    assert got.shape == ref.shape == (B, D, H // k, W // k)
    assert got.is_contiguous(memory_format=torch.channels_last)  # tokens [B, N, D] are a free view
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(got_g, ref_g):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_patchify_linear_fp32_and_bad_shapes(gen):
    x = torch.randn(2, 16, 24, 24, generator=gen)
    w = torch.randn(10, 16, 8, 8, generator=gen)
    ref = F.conv2d(x.double(), w.double(), stride=8)
    err = (patchify_linear(x, w) - ref).abs().max().item()
    base = (F.conv2d(x, w, stride=8) - ref).abs().max().item()
    assert err <= 2 * base + 1e-5
    with pytest.raises(ValueError, match="patchify"):
        patchify_linear(torch.randn(1, 16, 20, 24, generator=gen), w)  # 20 is no multiple of 8
    with pytest.raises(ValueError, match="patchify"):
        patchify_linear(x, torch.randn(10, 15, 8, 8, generator=gen))
    # the two halves the Triton BatchNorm path uses (its kernels write patches_of's layout themselves)
    torch.testing.assert_close(patch_linear(patches_of(x, 8), w, None, (2, 3, 3)), patchify_linear(x, w))
    with pytest.raises(ValueError, match=r"patches \(18, 1024\) are not the 2 x 3 x 2 patches of 8 x 8 x 16"):
        patch_linear(patches_of(x, 8), w, None, (2, 3, 2))


@pytest.mark.parametrize("C,H,W,k,pad,mult", [(3, 32, 32, 7, 3, 8),   # conv1 of the stem (12 -> 16 channels)
                                              (3, 17, 12, 7, 3, 8),   # odd height
                                              (2, 9, 10, 5, 2, 1),    # no channel padding
                                              (3, 10, 11, 4, 1, 8),   # even kernel
                                              (3, 10, 11, 4, 0, 8),   # even kernel, no padding (a crop)
                                              (1, 11, 11, 6, 0, 1),
                                              (4, 8, 8, 3, 1, 8)])
def test_s2d_conv_is_the_stride2_conv(C, H, W, k, pad, mult, gen):
    x = torch.randn(2, C, H, W, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, C, k, k, generator=gen, dtype=torch.float64, requires_grad=True)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    ref, ref_g = grads_of(lambda a, b: F.conv2d(a, b, stride=2, padding=pad), x, w,
                          gen=torch.Generator().manual_seed(seed))
    got, got_g = grads_of(lambda a, b: conv_stride2_s2d(a, b, pad, mult), x, w,
                          gen=torch.Generator().manual_seed(seed))
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(got_g, ref_g):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="padding"):
        conv_stride2_s2d(x, w, -1)
    with pytest.raises(ValueError, match="weight"):
        conv_stride2_s2d(x, w[:, :1] if C > 1 else w.repeat(1, 2, 1, 1), pad)


def test_stem_impls_same_model_same_keys(gen):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    m = create_model("lvvit_t", num_classes=5, img_size=64, depth=1, embed_dim=32, num_heads=2, stem_channels=8,
                     drop_path_rate=0.0, attn="math").double()
    x = torch.randn(3, 3, 64, 64, generator=gen, dtype=torch.float64)
    keys = {k: v.shape for k, v in m.state_dict().items()}
    assert keys["patch_embed.proj.weight"] == (32, 8, 8, 8) and keys["patch_embed.conv1.weight"] == (8, 3, 7, 7)
    results = {}
    for conv1 in STEM_IMPLS["conv1"]:
        for proj in STEM_IMPLS["proj"]:
            m.patch_embed.set_impl(conv1=conv1, proj=proj)
            assert {k: v.shape for k, v in m.state_dict().items()} == keys
            m.zero_grad()
            cls, aux, _ = m(x, mix_box=(1, 0, 3, 2))
            (cls.square().sum() + aux.square().sum()).backward()
            results[conv1, proj] = (cls, aux, {n: p.grad.clone() for n, p in m.named_parameters()})
    ref = results["conv", "conv"]
    for impl, (cls, aux, grads) in results.items():
        torch.testing.assert_close(cls, ref[0], rtol=1e-10, atol=1e-10, msg=str(impl))
        torch.testing.assert_close(aux, ref[1], rtol=1e-10, atol=1e-10, msg=str(impl))
        for n, g in grads.items():
            torch.testing.assert_close(g, ref[2][n], rtol=1e-9, atol=1e-10, msg=f"{impl} {n}")
    # a state dict saved under one implementation loads strictly under another
    other = create_model("lvvit_t", num_classes=5, img_size=64, depth=1, embed_dim=32, num_heads=2, stem_channels=8,
                         attn="math")
    other.patch_embed.set_impl(conv1="s2d", proj="conv")
    other.load_state_dict(m.state_dict(), strict=True)


def test_stem_impl_defaults_and_bad_names():
    with torch.device("meta"):
        m = create_model("lvvit_s")
    pe = m.patch_embed
    assert (pe.conv1_impl, pe.proj_impl) == ("auto", "gemm")
    # "auto": the space-to-depth conv on CUDA (faster there), the plain conv elsewhere
    assert (pe.conv1_resolved(cuda=True), pe.conv1_resolved(cuda=False)) == ("s2d", "conv")
    assert "proj_impl='gemm'" in repr(pe)
    with pytest.raises(ValueError, match="proj must be one of gemm, conv"):
        pe.set_impl(proj="linear")
    with pytest.raises(ValueError, match="conv1 must be one of auto, conv, s2d"):
        pe.set_impl(conv1="im2col")
    pe.set_impl(conv1="s2d")
    assert (pe.conv1_impl, pe.proj_impl) == ("s2d", "gemm")
    assert (pe.conv1_resolved(cuda=True), pe.conv1_resolved(cuda=False)) == ("s2d", "s2d")
    pe.set_impl(conv1="conv")
    assert (pe.conv1_resolved(cuda=True), pe.conv1_resolved(cuda=False)) == ("conv", "conv")


def test_stem_triton_batchnorm_matches_torch(gen):
    """set_impl(bn="triton"): the stem's BatchNorm + ReLUs by the Triton kernels (interpreted on the CPU) give
    torch's outputs, gradients and running statistics in training; eval mode runs the module's own path."""
    from tokenlabel.models.lvvit import PatchEmbed4_2

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    a = PatchEmbed4_2(img_size=32, patch_size=8, embed_dim=24, stem_channels=8)
    b = PatchEmbed4_2(img_size=32, patch_size=8, embed_dim=24, stem_channels=8)
    b.load_state_dict(a.state_dict())
    b.set_impl(bn="triton")
    assert "bn_impl='triton'" in repr(b)
    x = torch.randn(3, 3, 32, 32, generator=gen)
    outs = []
    for m in (a, b):
        out = m(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-3, atol=grad_atol(pa.grad),
                                   msg=lambda m, n=name: f"{n}: {m}")
    for (name, ba), bb in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(bb, ba, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    a.eval(), b.eval()
    torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="bn must be one of torch, triton"):
        b.set_impl(bn="cudnn")


def test_stem_triton_batchnorm_under_compile(gen):
    """A small LV-ViT with the stem's BatchNorm kernels and conv1's weight-gradient kernel (s2d form), compiled
    fullgraph (the custom ops; aot_eager on the CPU): the loss, stem gradients and running statistics of the eager
    torch path."""
    torch._dynamo.reset()
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    kw = dict(num_classes=5, img_size=64, depth=1, embed_dim=32, num_heads=2, stem_channels=8, attn="sdpa")
    a, b = create_model("lvvit_t", **kw).train(), create_model("lvvit_t", **kw).train()
    b.load_state_dict(a.state_dict())
    b.patch_embed.set_impl(bn="triton", conv1="s2d", conv1_wgrad="triton")
    x = torch.randn(2, 3, 64, 64, generator=gen)
    losses = []
    for m in (a, torch.compile(b, fullgraph=True, backend="aot_eager")):
        cls, aux, _ = m(x, mix_box=(0, 1, 2, 3))
        loss = cls.square().mean() + aux.square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)
    for (name, pa), pb in zip(a.patch_embed.named_parameters(), b.patch_embed.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    for (name, ba), bb in zip(a.patch_embed.named_buffers(), b.patch_embed.buffers()):
        torch.testing.assert_close(bb, ba, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_stem_triton_conv1_weight_gradient(gen):
    """set_impl(conv1_wgrad="triton"): the s2d conv1's weight gradient by kernels/conv_wgrad.py (interpreted here)
    gives the cuDNN path's gradients (the plain conv's, in float64 terms); eval and no-grad calls run the plain
    path; a bad name lists the valid ones."""
    from tokenlabel.models.lvvit import PatchEmbed4_2

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    a = PatchEmbed4_2(img_size=32, patch_size=8, embed_dim=24, stem_channels=8, conv1_impl="conv").double()
    b = PatchEmbed4_2(img_size=32, patch_size=8, embed_dim=24, stem_channels=8, conv1_impl="s2d")
    b.load_state_dict(a.state_dict())
    b.set_impl(conv1_wgrad="triton")
    assert "conv1_wgrad_impl='triton'" in repr(b)
    assert b._conv1_wgrad(torch.zeros(1)) == "triton"
    x = torch.randn(3, 3, 32, 32, generator=gen)
    outs = []
    for m, xx in ((a, x.double()), (b, x)):
        out = m(xx)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].double(), outs[0], rtol=1e-4, atol=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad.double(), pa.grad, rtol=1e-3, atol=grad_atol(pa.grad),
                                   msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad():
        assert b._conv1_wgrad(x) == "cudnn"
    b.eval()
    assert b._conv1_wgrad(x) == "cudnn"
    with pytest.raises(ValueError, match="conv1_wgrad must be one of cudnn, triton"):
        b.set_impl(conv1_wgrad="cutlass")
    with pytest.raises(ValueError, match="wgrad must be one of cudnn, triton, got 'cutlass'"):
        conv_stride2_s2d(x, b.conv1.weight, 3, wgrad="cutlass")
