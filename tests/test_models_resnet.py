"""resnet_tiny: the CNN teacher for the CIFAR runs."""
import pytest
import torch

from tokenlabel.models import create_model, load_checkpoint, save_checkpoint


def build(gen, **kw):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    return create_model("resnet_tiny", **{"num_classes": 10, **kw})


def test_shapes_and_stride(gen):
    m = build(gen, img_size=48)
    assert m.patch_grid == 6 and m.stride == 8
    x = torch.randn(2, 3, 48, 48, generator=gen)
    assert m(x).shape == (2, 10)
    assert m.forward_features(x).shape == (2, 256, 6, 6)
    assert m.dense_logits(x).shape == (2, 10, 6, 6)
    assert m.eval()(x).shape == (2, 10)  # no MixToken, a plain tensor in eval and train
    assert "head.bias" in m.no_weight_decay() and "head.weight" not in m.no_weight_decay()


@pytest.mark.parametrize("train", [False, True])
def test_dense_logits_mean_is_the_image_logits(gen, train):
    m = build(gen, widths=(8, 16, 24, 32))
    for p in m.parameters():  # away from the identity init so every block matters
        p.data.add_(0.1 * torch.randn(p.shape, generator=gen))
    m.train(train)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        logits = m(x)
    dense = m.dense_logits(x)
    assert dense.shape == (4, 10, 4, 4)
    torch.testing.assert_close(dense.mean(dim=(2, 3)), logits, rtol=1e-5, atol=1e-5)


def test_trains_and_checkpoints(gen, tmp_path):
    m = build(gen, num_classes=3, widths=(8, 8, 16, 16), img_size=16)
    m.set_grad_checkpointing(True)
    x = torch.randn(12, 3, 16, 16, generator=gen)
    y = torch.randint(0, 3, (12,), generator=gen)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-3:]) < 0.7 * losses[0], losses
    save_checkpoint(tmp_path / "t.pt", m, epoch=1)
    m2 = load_checkpoint(tmp_path / "t.pt")["model"]
    m.eval(), m2.eval()
    torch.testing.assert_close(m2(x), m(x))
    m.reset_classifier(5)
    assert m(x).shape == (12, 5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="one entry per stage"):
        create_model("resnet_tiny", widths=(8, 16), depths=(1, 1, 1))
    with pytest.raises(ValueError, match="unknown override"):
        create_model("resnet_tiny", depth=3)
    with pytest.raises(ValueError, match="multiple of the overall stride"):
        create_model("resnet_tiny", img_size=36)
