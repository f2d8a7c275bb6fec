"""How JPEG decoding on the CPU scales with the number of processes on this machine.

    python scripts/jpeg_decode_scaling.py DATA [--procs 1,2,4,8,12,16] [--per-proc 160]

DATA is a folder of JPEGs (searched recursively) or a .tar of them. Every process holds all the files' bytes in
memory (no disk in the timing) and decodes ``--per-proc`` images to RGB with PIL after one untimed warm-up
round. It prints images/s for each process count and the rate per process: a machine whose cores scale
linearly keeps the per-process rate flat. Used on 2026-12-04 to explain why DALI's CPU decoding on the GPU box
reached 4.7k img/s with 12 threads rather than the 8k predicted from 2 threads on the CPU box
(dataloading/NOTES.md).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import time
from multiprocessing import get_context

from PIL import Image

JPEG_EXT = (".jpg", ".jpeg")  # compared in lower case
_DATA: list[bytes] = []


def load(path: str) -> list[bytes]:
    """All JPEG files' bytes under ``path`` (a folder or a .tar), in a fixed order."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.lower().endswith(JPEG_EXT))
        out = [open(f, "rb").read() for f in files]
    elif tarfile.is_tarfile(path):
        with tarfile.open(path) as t:
            members = sorted((m for m in t.getmembers() if m.isfile() and m.name.lower().endswith(JPEG_EXT)),
                             key=lambda m: m.name)
            out = [t.extractfile(m).read() for m in members]
    else:
        raise SystemExit(f"jpeg_decode_scaling: {path!r} is neither a folder nor a .tar file")
    if not out:
        raise SystemExit(f"jpeg_decode_scaling: no .jpg/.jpeg files in {path!r}")
    return out


def _init(path: str) -> None:
    global _DATA
    _DATA = load(path)


def _decode(args: tuple[int, int]) -> int:
    start, n = args
    for i in range(start, start + n):
        Image.open(io.BytesIO(_DATA[i % len(_DATA)])).convert("RGB").load()
    return n


def measure(path: str, procs: list[int], per_proc: int) -> list[tuple[int, float]]:
    """[(processes, images/s)] for each process count."""
    load(path)  # fail here, in the parent, on a bad path
    rows = []
    for n in procs:
        with get_context("spawn").Pool(n, initializer=_init, initargs=(path,)) as pool:
            pool.map(_decode, [(i * 7, max(1, per_proc // 8)) for i in range(n)])  # warm-up
            t0 = time.perf_counter()
            done = sum(pool.map(_decode, [(i * 13, per_proc) for i in range(n)]))
            rows.append((n, done / (time.perf_counter() - t0)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="folder of JPEGs or .tar of them")
    ap.add_argument("--procs", default="1,2,4,8,12,16", help="comma-separated process counts")
    ap.add_argument("--per-proc", type=int, default=160, help="timed images per process")
    a = ap.parse_args(argv)
    try:
        procs = [int(p) for p in a.procs.split(",")]
    except ValueError:
        ap.error(f"--procs must be comma-separated integers, got {a.procs!r}")
    if any(p < 1 for p in procs) or a.per_proc < 1:
        ap.error("--procs and --per-proc must be >= 1")
    for n, rate in measure(a.data, procs, a.per_proc):
        print(f"processes {n:2d}: {rate:8.0f} img/s  ({rate / n:6.0f} per process)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
