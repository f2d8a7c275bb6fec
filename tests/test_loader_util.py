"""Fixtures shared by the loader tests (no tests here): small real-JPEG folders and label stores."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tokenlabel.dataloading.loader import IMAGENET_MEAN, IMAGENET_STD


def structured_image(rng, h, w):
    """Smooth colour field + a few hard-edged rectangles: JPEG-friendly, yet any shift shows."""
    low = rng.random((max(2, h // 12), max(2, w // 12), 3))
    img = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float64)
    for _ in range(4):
        y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
        y1, x1 = y0 + rng.integers(3, max(4, h // 3)), x0 + rng.integers(3, max(4, w // 3))
        img[y0:y1, x0:x1] = rng.integers(0, 256, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_folder(root, rng, num_classes=3, per_class=6, hw=(40, 110)):
    """ImageFolder of JPEGs with random non-square sizes; -> list of relpaths in sorted order."""
    rel = []
    for c in range(num_classes):
        d = os.path.join(root, f"c{c}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(hw[0], hw[1], 2))
            Image.fromarray(structured_image(rng, h, w)).save(os.path.join(d, f"im{i:03d}.jpg"), quality=97)
            rel.append(f"c{c}/im{i:03d}.jpg")
    return sorted(rel)


def make_store(path, relpaths, num_classes, k=2, size=6, rng=None):
    """Label store whose values encode the row: values[row, 0] = row (exact in fp16), values[row, 1:]
    = -1; indices are random class ids (distinct across k)."""
    from tokenlabel.dataloading.store import LabelStore

    rng = rng or np.random.default_rng(0)
    st = LabelStore.create(path, relpaths, num_classes=num_classes, k=k, size=size)
    n = len(relpaths)
    vals = np.full((n, k, size, size), -1.0, np.float32)
    vals[:, 0] = np.arange(n, dtype=np.float32)[:, None, None]
    idx = np.stack([rng.permutation(num_classes)[:k] for _ in range(n)])[:, :, None, None]
    idx = np.broadcast_to(idx, (n, k, size, size)).copy()
    st.write(np.arange(n), vals, idx, mark_done=True)
    st.flush()
    return st


def to_uint8(images):
    """Undo the normalisation: [B,3,H,W] float -> float64 numpy in [0,255] (B,H,W,3)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    x = images.float().cpu() * std + mean
    return x.permute(0, 2, 3, 1).double().numpy()


def dali_or_skip():
    from tokenlabel.dataloading.dali_pipeline import dali_available

    if not dali_available():
        pytest.skip("NVIDIA DALI is not importable here (pip install nvidia-dali-cuda120 / tokenlabel[dali-cu12])")


@pytest.fixture
def folder(tmp_path, gen):
    """A fresh random folder per test, drawn from ``gen`` so that the printed seed reproduces it."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    rel = make_folder(str(tmp_path / "train"), rng)
    return str(tmp_path / "train"), rel
