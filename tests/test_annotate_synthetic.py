"""make_synthetic_imagefolder: layout, real JPEGs, determinism, class-dependent content."""
import hashlib

import numpy as np
import pytest
from PIL import Image

from tokenlabel.dataloading import make_synthetic_imagefolder


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_determinism(tmp_path, gen):
    seed = int(gen.initial_seed() % 1000)
    root = make_synthetic_imagefolder(tmp_path / "a", num_classes=3, per_class=4, size=40, seed=seed,
                                      val_per_class=2)
    assert root == tmp_path / "a"
    files = _digests(root)
    assert len(files) == 3 * 4 + 3 * 2
    for split, n in (("train", 4), ("val", 2)):
        classes = sorted(p.name for p in (root / split).iterdir())
        assert classes == ["class_00", "class_01", "class_02"]
        for c in classes:
            imgs = sorted((root / split / c).iterdir())
            assert len(imgs) == n
            with Image.open(imgs[0]) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (40, 40)
    assert _digests(make_synthetic_imagefolder(tmp_path / "b", num_classes=3, per_class=4, size=40, seed=seed,
                                               val_per_class=2)) == files
    other = _digests(make_synthetic_imagefolder(tmp_path / "c", num_classes=3, per_class=4, size=40, seed=seed + 1,
                                                val_per_class=2))
    assert other.keys() == files.keys() and all(other[k] != files[k] for k in files)


def _colour_feature(path):
    """Histogram of the hue of strongly saturated pixels (the shapes; the noise background is grey-ish)."""
    hsv = np.asarray(Image.open(path).convert("HSV")).reshape(-1, 3).astype(np.float32)
    hue = hsv[hsv[:, 1] > 150, 0]
    h = np.histogram(hue, bins=24, range=(0, 256))[0].astype(np.float32)
    return h / max(1.0, h.sum())


def test_classes_are_separable(tmp_path):
    root = make_synthetic_imagefolder(tmp_path / "d", num_classes=6, per_class=6, size=48, seed=3, val_per_class=3)
    classes = sorted(p.name for p in (root / "train").iterdir())
    centroids = np.stack([np.mean([_colour_feature(f) for f in (root / "train" / c).iterdir()], 0)
                          for c in classes])
    correct = total = 0
    for ci, c in enumerate(classes):
        for f in (root / "val" / c).iterdir():
            pred = int(np.argmin(((centroids - _colour_feature(f)) ** 2).sum(1)))
            correct += pred == ci
            total += 1
    assert correct / total >= 0.9


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_imagefolder(tmp_path, num_classes=0)
    with pytest.raises(ValueError, match="size"):
        make_synthetic_imagefolder(tmp_path, size=4)
