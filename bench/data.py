"""Images and label maps for the loader and loader-fed step benchmarks.

``--data`` may be an ImageFolder tree, a flat folder of JPEGs, or a ``.tar`` of either (the
ImageNet sample ``imagenet-sample-334.tar`` is flat: ``<wnid>_<name>.JPEG``). A flat set is laid
out as an ImageFolder in a temp dir (symlinks, class = the wnid prefix). Without ``--labels`` a
label store with random top-k maps (C=1000, k=5, S=18 unless the shape names others) is made for those
images in a temp dir.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from .registry import Skip

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
SAMPLE_NAME = "imagenet-sample-334.tar"
LABEL_C, LABEL_K, LABEL_S = 1000, 5, 18
_CACHE: dict = {}


def default_data() -> Path | None:
    """The ImageNet sample, looked for in data/, shared/data/ and ../shared/data/ (cwd and repo)."""
    repo = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), repo):
        for rel in ("data", "shared/data", "../shared/data"):
            p = base / rel / SAMPLE_NAME
            if p.is_file():
                return p
    return None


def _tmpdir(prefix) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def _images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def image_folder(data, min_images: int = 0) -> Path:
    """An ImageFolder root (class sub-folders) for ``data``; cached per process.

    With ``min_images``, a set smaller than that is repeated (symlinks ``r<i>_<name>``) until it
    holds at least that many images, so an epoch is long enough that worker start-up is amortised."""
    if data is None:
        data = default_data()
        if data is None:
            raise Skip(f"no --data given and {SAMPLE_NAME} not found in data/ or ../shared/data/")
    data = Path(data)
    key = ("folder", str(data.resolve()), min_images)
    if key in _CACHE:
        return _CACHE[key]
    if not data.exists():
        raise ValueError(f"--data {str(data)!r} does not exist")
    if data.is_file():
        if not tarfile.is_tarfile(data):
            raise ValueError(f"--data {str(data)!r} is a file but not a tar archive")
        out = _tmpdir("tokenlabel-bench-data-")
        with tarfile.open(data) as tar:
            tar.extractall(out, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(out)
        data = out
    files = _images(data)
    if not files:
        raise ValueError(f"--data {str(data)!r} holds no .jpg/.jpeg/.png images")
    parents = {f.parent for f in files}
    if len(parents) > 1 or next(iter(parents)) != data:
        # already nested: the root is the common parent of the class folders
        root = Path(os.path.commonpath([str(p.parent) for p in files]))
        if root in parents:   # files directly in the root too: not an ImageFolder
            root = None
    else:
        root = None
    repeats = max(1, -(-min_images // len(files)))
    if root is None or repeats > 1:
        flat = root is None
        base = data if flat else root
        root = _tmpdir("tokenlabel-bench-folder-")
        for f in files:
            if flat:
                cls = f.stem.split("_")[0] if "_" in f.stem else "class0"
            else:
                cls = f.relative_to(base).parts[0]
            (root / cls).mkdir(exist_ok=True)
            for r in range(repeats):
                name = f.name if repeats == 1 else f"r{r}_{f.name}"
                (root / cls / name).symlink_to(f.resolve())
    _CACHE[key] = root
    return root


def label_store(root: Path, labels=None, seed: int = 0, num_classes: int = LABEL_C, k: int = LABEL_K,
                size: int = LABEL_S) -> Path:
    """``labels`` if given, else a store of random realistic top-k maps (``num_classes``, ``k``, ``size``)
    for every image under ``root``."""
    if labels is not None:
        if not Path(labels).exists():
            raise ValueError(f"--labels {str(labels)!r} does not exist")
        return Path(labels)
    if not 1 <= k <= num_classes:
        raise ValueError(f"a random label store needs 1 <= k <= num_classes, got k={k}, num_classes={num_classes}")
    key = ("store", str(root), seed, num_classes, k, size)
    if key in _CACHE:
        return _CACHE[key]
    from tokenlabel.dataloading import LabelStore

    rel = [str(p.relative_to(root).as_posix()) for p in _images(root)]
    path = _tmpdir("tokenlabel-bench-labels-") / "store"
    store = LabelStore.create(path, rel, num_classes=num_classes, k=k, size=size)
    rng = np.random.default_rng(seed)
    n = len(rel)
    values = -np.sort(-(rng.standard_normal((n, k, size, size)) * 2 + 4), axis=1)
    base = rng.integers(0, num_classes, (n, 1, size, size))
    step = 7 if np.gcd(7, num_classes) == 1 else 1   # k distinct ids per location (k <= num_classes)
    indices = (base + np.arange(k).reshape(1, -1, 1, 1) * step) % num_classes
    store.write(np.arange(n), values.astype(np.float32), indices, mark_done=True)
    store.close()
    _CACHE[key] = path
    return path
