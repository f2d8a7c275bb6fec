"""Checkpoints: our round trip (atomic), the reference repo's key layout, position-embedding resize."""
import argparse
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from tokenlabel.models import (create_model, load_checkpoint, load_reference_checkpoint, resize_pos_embed,
                               save_checkpoint)
from tokenlabel.models import checkpoint as ckpt_mod

SMALL = dict(num_classes=6, depth=2, embed_dim=32, num_heads=2, stem_channels=8, attn="sdpa", drop_path_rate=0.0)


def build(gen, img_size=64, **kw):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    return create_model("lvvit_t", img_size=img_size, **{**SMALL, **kw})


def randomise_buffers(model, gen):
    for name, b in model.named_buffers():
        if b.is_floating_point():
            b.copy_(torch.rand(b.shape, generator=gen) + 0.5)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_round_trip_with_extras(gen, tmp_path):
    a = build(gen)
    randomise_buffers(a, gen)
    opt = torch.optim.AdamW(a.parameters(), lr=1e-3)
    cls, aux, _ = a(torch.randn(2, 3, 64, 64, generator=gen))
    (cls.sum() + aux.sum()).backward()
    opt.step()
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(path, a, epoch=3, optimizer=opt.state_dict(), note="x")
    save_checkpoint(path, a, epoch=4, optimizer=opt.state_dict(), note="x")  # over an existing file
    assert sorted(os.listdir(path.parent)) == ["last.pt"]  # no temporary file left behind
    b = build(gen)
    out = load_checkpoint(path, b)
    assert_same_state(a, b)
    assert out["epoch"] == 4 and out["note"] == "x" and out["model"] is b
    opt2 = torch.optim.AdamW(b.parameters(), lr=1e-3)
    opt2.load_state_dict(out["optimizer"])
    # Rebuilt from the stored name and arguments.
    c = load_checkpoint(path)["model"]
    assert_same_state(a, c)
    c.eval(), a.eval()
    x = torch.randn(2, 3, 64, 64, generator=gen)
    torch.testing.assert_close(c(x), a(x))


def test_gpu_only_backend_rebuilt_as_auto_without_cuda(gen, tmp_path, monkeypatch):
    """A checkpoint saved from a model with attn='triton', rebuilt where no GPU is visible: attn 'auto' with a
    warning saying why, the same weights, and a forward that runs."""
    path = tmp_path / "tri.pt"
    a = build(gen, attn="triton")
    save_checkpoint(path, a)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.warns(UserWarning, match="attn='triton'.*rebuilding it with attn='auto'"):
        b = load_checkpoint(path)["model"]
    assert b.attn == "auto"
    assert_same_state(a, b)
    b.eval()(torch.randn(1, 3, 64, 64, generator=gen))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs it: kept as saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_checkpoint(path)["model"].attn == "triton"


def test_interrupted_save_keeps_old_file(gen, tmp_path, monkeypatch):
    a = build(gen)
    path = tmp_path / "best.pt"
    save_checkpoint(path, a, epoch=1)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kw):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, build(gen), epoch=2)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["best.pt"]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(bad, create_model("lvvit_t", img_size=64, **SMALL))


def reference_layout(model, prefix="module."):
    """A state dict as the reference repo's training saves it (DDP prefix), built from our model."""
    return {prefix + k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "state_dict_ema"])
def test_reference_checkpoint_loads(gen, tmp_path, layout):
    a = build(gen)
    randomise_buffers(a, gen)
    sd = reference_layout(a, prefix="" if layout == "plain" else "module.")
    # Its key names are the reference's (lvvit.py / layers.py).
    for key in ("patch_embed.conv1.weight", "patch_embed.bn3.running_var", "patch_embed.proj.bias",
                "blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "head.weight", "aux_head.bias",
                "pos_embed", "cls_token", "norm.weight"):
        assert key in {k.removeprefix("module.") for k in sd}
    assert "blocks.0.attn.qkv.bias" not in {k.removeprefix("module.") for k in sd}
    payload = sd if layout == "plain" else {layout: sd, "epoch": 299, "arch": "lvvit_t",
                                            "args": argparse.Namespace(lr=1.6e-3, model="lvvit_t")}
    path = tmp_path / "lvvit_t-8M-224-79.1.pth.tar"
    torch.save(payload, path)
    b = build(gen)
    report = load_reference_checkpoint(b, path, use_ema=layout == "state_dict_ema")
    assert report == {"missing_keys": [], "unexpected_keys": []}
    assert_same_state(a, b)
    c = build(gen)
    load_checkpoint(path, c, use_ema=layout == "state_dict_ema")  # load_checkpoint detects the format
    assert_same_state(a, c)


def test_reference_checkpoint_key_problems_are_reported(gen, tmp_path):
    a = build(gen)
    sd = reference_layout(a)
    del sd["module.blocks.1.attn.proj.weight"]
    sd["module.blocks.1.attn.qkv.bias"] = torch.randn(96, generator=gen)
    path = tmp_path / "ref.pth.tar"
    torch.save({"state_dict": sd}, path)
    b = build(gen)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing.*blocks\.1\.attn\.proj\.weight.*unexpected.*blocks\.1\.attn\.qkv\.bias"):
        load_reference_checkpoint(b, path)
    for k, v in b.state_dict().items():  # nothing loaded silently
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = load_reference_checkpoint(b, path, strict=False)
    assert report["missing_keys"] == ["blocks.1.attn.proj.weight"]
    assert report["unexpected_keys"] == ["blocks.1.attn.qkv.bias"]
    assert any("blocks.1.attn.proj.weight" in str(w.message) for w in caught)
    torch.testing.assert_close(b.state_dict()["head.weight"], a.state_dict()["head.weight"])
    sd["module.blocks.1.attn.proj.weight"] = torch.randn(5, 5, generator=gen)
    torch.save(sd, path)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_reference_checkpoint(b, path, strict=False)


def test_resize_pos_embed_direct(gen):
    D = 5
    pe = torch.randn(1, 1 + 9, D, generator=gen)
    out = resize_pos_embed(pe, 5)
    assert out.shape == (1, 26, D)
    torch.testing.assert_close(out[:, :1], pe[:, :1], rtol=0, atol=0)
    grid = pe[:, 1:].reshape(1, 3, 3, D).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(5, 5), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 25, D)
    torch.testing.assert_close(out[:, 1:], ref)
    assert resize_pos_embed(pe, 3) is pe
    # A constant grid stays constant (bicubic weights sum to one).
    const = torch.cat((pe[:, :1], pe[:, 1:2].expand(1, 9, D)), 1)
    torch.testing.assert_close(resize_pos_embed(const, 7)[:, 1:], pe[:, 1:2].expand(1, 49, D))
    with pytest.raises(ValueError, match="not a square"):
        resize_pos_embed(torch.randn(1, 1 + 8, D, generator=gen), 4)


def test_finetune_at_another_size(gen, tmp_path):
    a = build(gen, img_size=64)  # 4 x 4 tokens
    path = tmp_path / "a.pt"
    save_checkpoint(path, a)
    b = create_model("lvvit_t", img_size=96, pretrained=path, **SMALL)  # 6 x 6 tokens: resized
    torch.testing.assert_close(b.pos_embed, resize_pos_embed(a.pos_embed.detach(), 6))
    torch.testing.assert_close(b.blocks[0].attn.qkv.weight, a.blocks[0].attn.qkv.weight)
    assert b.patch_grid == 6 and b(torch.randn(2, 3, 96, 96, generator=gen))[1].shape == (2, 36, 6)
    c = build(gen, img_size=96)
    with pytest.raises(ValueError, match=r"64x64.*96x96.*resize_pos_embed=True"):
        load_checkpoint(path, c)
    load_checkpoint(path, c, resize_pos_embed=True)
    torch.testing.assert_close(c.pos_embed, b.pos_embed)
