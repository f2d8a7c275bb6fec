"""The annotator against a direct computation, resume after an interruption, bad images, the CLI."""
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from tokenlabel.dataloading import LabelStore, annotate, make_synthetic_imagefolder
from tokenlabel.dataloading.annotate import IMAGENET_MEAN, IMAGENET_STD, list_images, resolve_data_root


class ConvTeacher(nn.Module):
    """Two convs (stride 4 overall) + a linear classifier: forward_features / get_classifier style."""

    def __init__(self, num_classes, gen, width=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.fc = nn.Linear(width, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward_features(self, x):
        return self.conv2(F.relu(self.conv1(x)))

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.fc(self.forward_features(x).mean((2, 3)))

    def direct(self, x):  # dense logits written out as a 1x1 conv, independent of the annotator's code
        f = self.forward_features(x)
        return F.conv2d(f, self.fc.weight[:, :, None, None], self.fc.bias)


class TokenTeacher(ConvTeacher):
    """ViT-like: forward_features gives [B, 1 + N, D] with a cls token first."""

    def forward_features(self, x):
        f = super().forward_features(x).flatten(2).transpose(1, 2)
        return torch.cat([f.mean(1, keepdim=True), f], 1)

    def direct(self, x):
        return F.conv2d(ConvTeacher.forward_features(self, x), self.fc.weight[:, :, None, None], self.fc.bias)


class DenseTeacher(ConvTeacher):
    def dense_logits(self, x):
        return self.direct(x)


def _reference_maps(teacher, root, paths, img_size, size, k):
    """Top-k of the dense logits computed here from the files with plain PIL + torch."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    xs = []
    for p in paths:
        im = Image.open(root / p).convert("RGB")
        assert im.size[0] == im.size[1]  # square images: the eval transform is a plain resize
        if im.size[0] != img_size:
            im = im.resize((img_size, img_size), Image.BICUBIC)
        xs.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255)
    x = (torch.stack(xs) - mean) / std
    with torch.no_grad():
        logits = teacher.direct(x)
        if logits.shape[-1] != size:
            logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
    return logits, torch.topk(logits, k, dim=1)


def _check_against_reference(store, logits, ref):
    v, i = store.read(np.arange(len(store)))
    v = torch.from_numpy(v).float()
    i = torch.from_numpy(i).long()
    # values are the top-k logits (fp16), sorted descending
    torch.testing.assert_close(v, ref.values, atol=2e-3, rtol=1e-3)
    assert (v[:, :-1] >= v[:, 1:]).all()
    # the stored ids pick exactly those logits (robust to near ties), and agree with topk's ids
    torch.testing.assert_close(torch.gather(logits, 1, i), ref.values, atol=2e-3, rtol=1e-3)
    assert (i == ref.indices).float().mean() > 0.99


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_imagefolder(tmp_path_factory.mktemp("syn"), num_classes=3, per_class=5, size=64,
                                      seed=1, val_per_class=1)


@pytest.mark.parametrize("kind,img_size,size,k", [("conv", 64, 16, 5), ("tokens", 48, 7, 3),
                                                  ("dense", 64, 23, 1)])
def test_matches_direct_computation(tmp_path, data, gen, kind, img_size, size, k):
    c = int(torch.randint(6, 40, (1,), generator=gen))
    teacher = {"conv": ConvTeacher, "tokens": TokenTeacher, "dense": DenseTeacher}[kind](c, gen)
    summary = annotate(teacher, data, tmp_path / "st", size=size, topk=k, img_size=img_size, batch_size=4,
                       device="cpu", num_workers=0, progress=False, teacher_name=kind)
    root = resolve_data_root(data)
    assert root.name == "train"
    assert list_images(root)[0] == root
    paths = list_images(root)[1]
    assert summary["done"] == summary["images"] == len(paths) == 15 and summary["skipped"] == []
    store = LabelStore.open(tmp_path / "st")
    assert store.paths == paths and (store.num_classes, store.k, store.size) == (c, k, size)
    assert store.provenance["teacher"] == kind and store.provenance["preprocessing"]["img_size"] == img_size
    logits, ref = _reference_maps(teacher, root, paths, img_size, size, k)
    _check_against_reference(store, logits, ref)


class Stop(Exception):
    pass


def test_resume_after_interruption(tmp_path, data, gen):
    teacher = ConvTeacher(11, gen)
    kw = dict(size=9, topk=4, img_size=64, batch_size=2, device="cpu", num_workers=0, progress=False)
    full = annotate(teacher, data, tmp_path / "full", **kw)
    assert full["done"] == 15

    first_rows = []

    def stop_after_3(b, rows):
        first_rows.extend(rows.tolist())
        if b == 2:
            raise Stop

    with pytest.raises(Stop):
        annotate(teacher, data, tmp_path / "part", on_batch=stop_after_3, **kw)
    part = LabelStore.open(tmp_path / "part")
    assert part.num_done == 6 and sorted(np.flatnonzero(part.done).tolist()) == sorted(first_rows)

    # a crash inside the teacher: the batch in flight is lost, nothing else
    calls = {"n": 0}
    orig = teacher.forward_features

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return orig(x)

    teacher.forward_features = flaky
    with pytest.raises(RuntimeError, match="simulated crash"):
        annotate(teacher, data, tmp_path / "part", **kw)
    del teacher.forward_features
    done_before = set(np.flatnonzero(LabelStore.open(tmp_path / "part").done).tolist())
    assert len(done_before) == 8 and set(first_rows) <= done_before

    second_rows = []
    res = annotate(teacher, data, tmp_path / "part", on_batch=lambda b, rows: second_rows.extend(rows.tolist()),
                   **kw)
    assert res["annotated"] == 7 and res["done"] == 15
    assert sorted(second_rows) == sorted(set(range(15)) - done_before)
    a, b = LabelStore.open(tmp_path / "full"), LabelStore.open(tmp_path / "part")
    va, ia = a.read(np.arange(15))
    vb, ib = b.read(np.arange(15))
    np.testing.assert_allclose(va.astype(np.float32), vb.astype(np.float32), atol=2e-3, rtol=1e-3)
    assert (ia == ib).mean() > 0.99
    # nothing left: a re-run is a no-op
    assert annotate(teacher, data, tmp_path / "part", **kw)["annotated"] == 0


def test_resume_refuses_other_teacher_or_geometry(tmp_path, data, gen):
    kw = dict(img_size=64, batch_size=8, device="cpu", num_workers=0, progress=False)
    t = ConvTeacher(5, gen)
    with pytest.raises(Stop):
        annotate(t, data, tmp_path / "st", size=8, topk=2, on_batch=lambda b, r: (_ for _ in ()).throw(Stop()),
                 **kw)
    with pytest.raises(ValueError, match="another teacher"):
        annotate(ConvTeacher(5, gen), data, tmp_path / "st", size=8, topk=2, **kw)
    with pytest.raises(ValueError, match="size: store has 8, run expects 9"):
        annotate(t, data, tmp_path / "st", size=9, topk=2, **kw)
    # resume=False starts over
    res = annotate(ConvTeacher(5, gen), data, tmp_path / "st", size=9, topk=2, resume=False, **kw)
    assert res["annotated"] == 15 and LabelStore.open(tmp_path / "st").size == 9


def test_bad_images_are_skipped(tmp_path, gen):
    root = make_synthetic_imagefolder(tmp_path / "d", num_classes=2, per_class=3, size=32, seed=2,
                                      val_per_class=0) / "train"
    good = sorted(root.glob("class_00/*.JPEG"))[0].read_bytes()
    (root / "class_00" / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (root / "class_01" / "garbage.jpg").write_bytes(b"this is not an image" * 10)
    Image.fromarray(np.full((40, 30), 100, np.uint8), "L").save(root / "class_01" / "gray_png.jpg", "PNG")
    Image.new("CMYK", (32, 32), (10, 200, 30, 0)).save(root / "class_01" / "cmyk.jpg", "JPEG")
    with pytest.warns(RuntimeWarning) as rec:
        res = annotate(ConvTeacher(4, gen), root, tmp_path / "st", size=4, topk=2, img_size=32, batch_size=3,
                       device="cpu", num_workers=2, progress=False)
    msgs = [str(w.message) for w in rec if "skipping unreadable image" in str(w.message)]
    assert len(msgs) == 2 and any("truncated.JPEG" in m for m in msgs) and any("garbage.jpg" in m for m in msgs)
    assert sorted(res["skipped"]) == ["class_00/truncated.JPEG", "class_01/garbage.jpg"]
    st = LabelStore.open(tmp_path / "st")
    assert st.missing(st.paths) == sorted(res["skipped"])
    assert res["done"] == len(st) - 2 == 8


def test_teacher_without_dense_head_is_rejected(tmp_path, data):
    with pytest.raises(ValueError, match="dense_logits"):
        annotate(nn.Linear(3, 3), data, tmp_path / "st", size=4, topk=1, img_size=32, device="cpu",
                 num_workers=0, progress=False)
    with pytest.raises(ValueError, match="no class folders"):
        (tmp_path / "empty").mkdir()
        annotate(nn.Linear(3, 3), tmp_path / "empty", tmp_path / "st", size=4, topk=1, device="cpu")


def test_file_list(tmp_path, data, gen):
    train = data / "train"
    chosen = sorted(p.relative_to(train).as_posix() for p in train.rglob("*.JPEG"))[::3]
    (train / "subset.txt").write_text("".join(f"{p} {i % 3}\n" for i, p in enumerate(chosen)))
    try:
        res = annotate(DenseTeacher(4, gen), train / "subset.txt", tmp_path / "st", size=4, topk=2, img_size=32,
                       device="cpu", num_workers=0, progress=False)
    finally:
        (train / "subset.txt").unlink()
    st = LabelStore.open(tmp_path / "st")
    assert res["done"] == len(chosen) == 5 and st.paths == chosen


def test_cli_with_module_spec(tmp_path, data, monkeypatch, capsys):
    from tokenlabel.cli import main

    (tmp_path / "my_teacher_mod.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        class T(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.conv = nn.Conv2d(3, 7, 4, stride=4)
            def dense_logits(self, x):
                return self.conv(x)
        def make():
            return T()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "st"
    argv = ["annotate", "--teacher", "my_teacher_mod:make", "--data", str(data), "--out", str(out),
            "--size", "8", "--topk", "3", "--img-size", "32", "--device", "cpu", "-j", "0", "--no-progress"]
    assert main(argv) == 0
    st = LabelStore.open(out)
    assert st.num_done == 15 and st.num_classes == 7 and st.provenance["teacher"] == "my_teacher_mod:make"
    assert main(argv) == 0 and '"annotated": 0' in capsys.readouterr().out
    assert main(argv[:2] + ["nowhere:missing"] + argv[3:]) == 2
    assert "cannot import" in capsys.readouterr().err
    sys.modules.pop("my_teacher_mod", None)


def test_cli_with_our_checkpoint(tmp_path, data, gen):
    models = pytest.importorskip("tokenlabel.models")
    if not all(hasattr(models, n) for n in ("create_model", "save_checkpoint", "load_checkpoint")):
        pytest.skip("tokenlabel.models has no checkpoint helpers yet")
    from tokenlabel.cli import main

    teacher = models.create_model("resnet_tiny", num_classes=3)
    ema = models.create_model("resnet_tiny", num_classes=3)
    with torch.no_grad():  # two different teachers (moderate logits: fp16 holds them)
        for p in list(teacher.parameters()) + list(ema.parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    models.save_checkpoint(tmp_path / "t.pth", teacher, state_dict_ema=ema.state_dict())
    kw = dict(size=4, topk=2, img_size=64, device="cpu", num_workers=0, progress=False)
    for flag, module in (([], teacher), (["--ema"], ema)):
        out = tmp_path / f"st{len(flag)}"
        assert main(["annotate", "--teacher", str(tmp_path / "t.pth"), "--data", str(data), "--out", str(out),
                     "--size", "4", "--topk", "2", "--img-size", "64", "--device", "cpu", "-j", "0",
                     "--no-progress"] + flag) == 0
        st = LabelStore.open(out)
        assert st.num_done == 15 and st.num_classes == 3 and "t.pth" in st.provenance["teacher"]
        annotate(module, data, tmp_path / f"direct{len(flag)}", **kw)
        direct = LabelStore.open(tmp_path / f"direct{len(flag)}")
        np.testing.assert_array_equal(st.read(np.arange(15))[0], direct.read(np.arange(15))[0])


@pytest.mark.gpu
def test_cuda_matches_cpu(tmp_path, data, gen):
    teacher = ConvTeacher(50, gen)
    kw = dict(size=16, topk=5, img_size=64, batch_size=8, num_workers=2, progress=False)
    annotate(teacher, data, tmp_path / "cpu", device="cpu", **kw)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare fp32 with fp32
    try:
        annotate(teacher, data, tmp_path / "gpu", device="cuda", **kw)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    res = annotate(teacher, data, tmp_path / "amp", device="cuda", amp=True, **kw)
    assert res["done"] == 15
    # a run started on the CPU resumes on the GPU (the teacher fingerprint does not depend on the device)
    with pytest.raises(Stop):
        annotate(teacher.cpu(), data, tmp_path / "mixed", device="cpu",
                 on_batch=lambda b, r: (_ for _ in ()).throw(Stop()), **kw)
    res = annotate(teacher, data, tmp_path / "mixed", device="cuda", **kw)
    assert res["annotated"] == 7 and res["done"] == 15
    a, b = LabelStore.open(tmp_path / "cpu"), LabelStore.open(tmp_path / "gpu")
    va, ia = a.read(np.arange(15))
    vb, ib = b.read(np.arange(15))
    np.testing.assert_allclose(va.astype(np.float32), vb.astype(np.float32), atol=5e-3, rtol=2e-3)
    assert (ia == ib).mean() > 0.99


def test_second_annotator_on_the_same_store_is_refused(tmp_path, data, gen):
    pytest.importorskip("fcntl")
    from tokenlabel.dataloading.annotate import writer_lock

    kw = dict(size=4, topk=1, img_size=32, device="cpu", num_workers=0, progress=False)
    with writer_lock(tmp_path / "st"):
        with pytest.raises(ValueError, match="another annotator"):
            annotate(DenseTeacher(3, gen), data, tmp_path / "st", **kw)
    assert annotate(DenseTeacher(3, gen), data, tmp_path / "st", **kw)["done"] == 15


@pytest.mark.gpu  # torchvision is installed only on the GPU machine
@pytest.mark.parametrize("w,h,img_size,crop_pct", [(50, 30, 24, 0.875), (31, 64, 32, 1.0), (200, 199, 96, 0.9)])
def test_eval_transform_matches_torchvision(gen, w, h, img_size, crop_pct):
    tv = pytest.importorskip("torchvision.transforms")
    from tokenlabel.dataloading.annotate import eval_transform

    img = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy(), "RGB")
    ref = tv.Compose([tv.Resize(int(img_size / crop_pct), interpolation=tv.InterpolationMode.BICUBIC),
                      tv.CenterCrop(img_size), tv.ToTensor(), tv.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)
    torch.testing.assert_close(eval_transform(img, img_size, crop_pct), ref, atol=1e-5, rtol=1e-5)
