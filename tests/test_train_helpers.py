"""Shared set-up for the train/CLI tests: a tiny generated ImageFolder, a random label store for it,
and the argument list of a tiny LV-ViT run (seconds on a CPU)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def make_data(root: Path, num_classes=4, per_class=8, seed=0) -> Path:
    from tokenlabel.dataloading import make_synthetic_imagefolder

    return make_synthetic_imagefolder(root, num_classes=num_classes, per_class=per_class, size=40, seed=seed,
                                      val_per_class=2)


def train_relpaths(data: Path) -> list[str]:
    train = Path(data) / "train"
    return sorted(p.relative_to(train).as_posix() for p in train.rglob("*.JPEG"))


def make_store(path: Path, relpaths: list[str], num_classes: int, k=2, size=6, seed=0):
    """A label store with random top-k maps (distinct class ids per location) for ``relpaths``."""
    from tokenlabel.dataloading import LabelStore

    rng = np.random.default_rng(seed)
    n = len(relpaths)
    store = LabelStore.create(path, relpaths, num_classes=num_classes, k=k, size=size)
    idx = np.argsort(rng.random((n, num_classes, size, size)), axis=1)[:, :k].astype(np.int64)
    vals = np.sort(rng.normal(0, 3, (n, k, size, size)), axis=1)[:, ::-1].astype(np.float32)
    store.write(np.arange(n), vals, idx, mark_done=True)
    return path


def tiny_args(data, out, *extra, epochs=2, batch=4, seed=3) -> list[str]:
    args = ["train", "--output", str(out), "--model", "lvvit_t",
            "--model-kwargs", "depth=1,embed_dim=32,num_heads=2", "--img-size", "32", "--epochs", str(epochs),
            "--batch-size", str(batch), "--workers", "0", "--loader", "torch", "--log-every", "3",
            "--seed", str(seed), "--lr", "1e-3", "--warmup-epochs", "0.5", "--ema-decay", "0.9",
            "--drop-path", "0.1", "--attn", "math"]
    if data is not None:
        args += ["--data", str(data)]
    return args + [str(e) for e in extra]


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_append_csv_upgrades_an_older_header_without_losing_rows(tmp_path):
    from tokenlabel import train as T

    p = tmp_path / "summary.csv"
    old_fields = T.SUMMARY_FIELDS[:-1]  # a run started by a version without the last column
    T._append_csv(p, old_fields, [{f: str(i) for i, f in enumerate(old_fields)}])
    T._append_csv(p, T.SUMMARY_FIELDS, [{f: "x" for f in T.SUMMARY_FIELDS}])
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and list(rows[0]) == T.SUMMARY_FIELDS
    assert rows[0]["epoch"] == "0" and rows[0][T.SUMMARY_FIELDS[-1]] == ""
    assert all(v == "x" for v in rows[1].values())
    assert [q.name for q in tmp_path.iterdir()] == ["summary.csv"]  # no temporary file left
