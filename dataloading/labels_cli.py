"""`tokenlabel labels import|info`: convert the reference repo's per-image label maps; summarise a store.

import: the reference (``generate_label.py``, token_labeling.md §1) writes one ``torch.save`` file per
training image at ``<root>/<wnid>/<image name up to its first '.'>.pt``, holding ``[2, k, S, S]``
float16: row 0 the top-k logits, row 1 the class ids stored as float16. Each file becomes the row of
the image it belongs to: with ``--images`` the image is looked up under that folder by the same rule
(directory + name up to the first '.'); otherwise its path is taken as ``<wnid>/<stem><ext>``.
Files that do not load or hold the wrong shape, non-finite values or ids that are not whole numbers
in [0, C) are reported and skipped; their rows stay not done.

    tokenlabel labels import --src label_top5_train_nfnet --out labels/imagenet --images imagenet/train
    tokenlabel labels info labels/imagenet
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .store import LabelStore

FP16_EXACT_IDS = 2048  # float16 holds every integer up to 2048 exactly


# --------------------------------------------------------------------------- import
def find_label_files(src) -> list[str]:
    """``.pt`` files under ``src`` (any depth), sorted posix paths relative to ``src``."""
    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"--src {str(src)!r} does not exist or is not a directory")
    out = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        rel = Path(dirpath).relative_to(src)
        out.extend((rel / f).as_posix() for f in filenames if f.endswith(".pt"))
    out.sort()
    return out


def _stem_key(relpath: str) -> str:
    """The reference's rule: directory + file name up to its first '.'."""
    d, _, name = relpath.rpartition("/")
    return f"{d}/{name.split('.', 1)[0]}" if d else name.split(".", 1)[0]


def map_to_images(label_files: list[str], images=None, ext: str = ".JPEG") -> tuple[dict[str, str], list[str]]:
    """label file -> image relpath, and the label files with no image (only with ``images``)."""
    if images is None:
        return {f: _stem_key(f) + ext for f in label_files}, []
    from .annotate import list_images

    by_stem: dict[str, str] = {}
    for p in list_images(images)[1]:
        by_stem.setdefault(_stem_key(p), p)
    mapping, orphans = {}, []
    for f in label_files:
        img = by_stem.get(_stem_key(f))
        if img is None:
            orphans.append(f)
        else:
            mapping[f] = img
    return mapping, orphans


def load_label_file(file, num_classes: int):
    """(values fp16 [k,S,S], ids int64 [k,S,S]) from one reference .pt file; ValueError if bad."""
    import torch

    try:
        t = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"holds a {type(t).__name__}, expected a [2, k, S, S] tensor")
    if t.dim() != 4 or t.shape[0] != 2 or t.shape[2] != t.shape[3]:
        raise ValueError(f"has shape {list(t.shape)}, expected [2, k, S, S]")
    if not t.is_floating_point():
        raise ValueError(f"has dtype {t.dtype}, expected float16")
    values = t[0].to(torch.float16).numpy()
    ids = t[1].float().numpy()
    if not np.isfinite(values).all():
        raise ValueError("holds non-finite values")
    if not (np.isfinite(ids).all() and (np.round(ids) == ids).all()):
        raise ValueError("row 1 (class ids) holds values that are not whole numbers")
    if ids.min() < 0 or ids.max() >= num_classes:
        raise ValueError(f"class ids range over [{int(ids.min())}, {int(ids.max())}], outside [0, {num_classes})")
    return values, ids.astype(np.int64)


class _Progress:
    """tqdm when installed, else a line every few seconds."""

    def __init__(self, total, desc, enabled=True):
        self.total, self.desc, self.n, self.enabled, self.bar = total, desc, 0, enabled, None
        self.last = time.monotonic()
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="file", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n=1):
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (time.monotonic() - self.last > 5 or self.n == self.total):
            self.last = time.monotonic()
            print(f"{self.desc}: {self.n}/{self.total}", file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def import_reference_labels(src, out, num_classes: int = 1000, images=None, ext: str = ".JPEG",
                            overwrite: bool = False, workers: int = 8, chunk: int = 256,
                            progress: bool = True) -> dict:
    """Convert ``<src>/<wnid>/<stem>.pt`` label maps into a LabelStore at ``out``; returns a summary
    (imported, bad files with reasons, label files without an image)."""
    src = Path(src)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    files = find_label_files(src)
    if not files:
        raise ValueError(f"no .pt label files under {str(src)!r}")
    mapping, orphans = map_to_images(files, images, ext)
    files = [f for f in files if f in mapping]
    if not files:
        raise ValueError(f"none of the label files under {str(src)!r} matches an image under {str(images)!r}")
    images_seen: dict[str, str] = {}
    dup = [f for f in files if images_seen.setdefault(mapping[f], f) != f]
    if dup:
        raise ValueError(f"{len(dup)} label files map to an image that another one already maps to, "
                         f"e.g. {dup[0]!r} and {images_seen[mapping[dup[0]]]!r}")

    bad: list[tuple[str, str]] = []
    first = None  # k, S from the first file that loads
    for f in files:
        try:
            v, _ = load_label_file(src / f, num_classes)
            first = v.shape
            break
        except ValueError:
            continue
    if first is None:
        raise ValueError(f"none of the {len(files)} .pt files under {str(src)!r} is a valid [2, k, S, S] label map; "
                         f"e.g. {files[0]!r}")
    k, size = int(first[0]), int(first[1])
    if k > num_classes:
        raise ValueError(f"the label maps keep k={k} classes but --num-classes is {num_classes}")
    if num_classes > FP16_EXACT_IDS:
        print(f"labels import: note: the reference stores class ids as float16, exact only up to "
              f"{FP16_EXACT_IDS}; with C={num_classes} larger ids may already be rounded in the files",
              file=sys.stderr)
    store = LabelStore.create(out, [mapping[f] for f in files], num_classes=num_classes, k=k, size=size,
                              overwrite=overwrite,
                              provenance={"source": "reference .pt import", "src": str(src.resolve()),
                                          "images": str(Path(images).resolve()) if images else None})

    def load(i):
        try:
            v, ids = load_label_file(src / files[i], num_classes)
        except ValueError as e:
            return i, None, None, str(e)
        if v.shape != (k, size, size):
            return i, None, None, f"has shape [2, {', '.join(map(str, v.shape))}], the store holds [2, {k}, {size}, {size}]"
        return i, v, ids, None

    bar = _Progress(len(files), "labels import", progress)
    imported = 0
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(files), chunk):
            got = list(pool.map(load, range(start, min(start + chunk, len(files)))))
            ok = [(i, v, ids) for i, v, ids, err in got if err is None]
            bad.extend((files[i], err) for i, _, _, err in got if err is not None)
            if ok:
                store.write(np.array([i for i, _, _ in ok]), np.stack([v for _, v, _ in ok]),
                            np.stack([ids for _, _, ids in ok]), mark_done=True)
                imported += len(ok)
            bar.update(len(got))
    bar.close()
    store.close()
    return {"store": str(out), "imported": imported, "rows": len(files), "bad": bad, "no_image": orphans,
            "num_classes": num_classes, "k": k, "size": size}


# --------------------------------------------------------------------------- info
def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def store_info(path, sample: int = 2048, seed: int = 0) -> dict:
    """Summary of a store: C, k, S, count, done, dtypes, disk size, and a class-id histogram summary
    of the top-1 ids over (a sample of at most ``sample``) done rows."""
    st = LabelStore.open(path)
    done = np.flatnonzero(st.done)
    apparent = sum(os.path.getsize(Path(path) / f) for f in os.listdir(path) if (Path(path) / f).is_file())
    info = {"path": str(path), "num_classes": st.num_classes, "k": st.k, "size": st.size, "count": len(st),
            "done": int(len(done)), "values_dtype": str(st.values.dtype), "indices_dtype": str(st.indices.dtype),
            "disk_bytes": st.disk_bytes(), "apparent_bytes": apparent, "provenance": st.provenance,
            "not_done_examples": [st.paths[i] for i in np.flatnonzero(~st.done)[:5]]}
    if len(done):
        rows = done if len(done) <= sample else np.sort(np.random.default_rng(seed).choice(done, sample, replace=False))
        values, ids = st.read(rows)
        top1 = ids[:, 0].ravel().astype(np.int64)
        counts = np.bincount(top1, minlength=st.num_classes)
        order = np.argsort(-counts, kind="stable")
        present = int(np.count_nonzero(counts))
        # per image: share of locations whose top-1 is the image's most frequent top-1 class
        per_img = ids[:, 0].reshape(len(rows), -1)
        major = np.array([np.bincount(r).max() / r.size for r in per_img])
        info["histogram"] = {
            "rows_sampled": int(len(rows)),
            "top1_classes_present": present,
            "top1_most_common": [[int(c), round(float(counts[c] / top1.size), 4)] for c in order[:5] if counts[c]],
            "top1_least_common_present": [[int(c), round(float(counts[c] / top1.size), 4)]
                                          for c in order[:present][::-1][:5]],
            "mean_share_of_image_majority_class": round(float(major.mean()), 4),
            "all_k_ids_classes_present": int(len(np.unique(ids))),
            "top1_value_mean": round(float(values[:, 0].astype(np.float32).mean()), 4),
            "topk_value_range": [float(values.min()), float(values.max())],
        }
    return info


def format_info(info: dict) -> str:
    lines = [f"label store {info['path']}",
             f"  classes C      {info['num_classes']}",
             f"  top-k          {info['k']}",
             f"  map size S     {info['size']} x {info['size']}",
             f"  images         {info['count']}",
             f"  done           {info['done']} ({100.0 * info['done'] / max(1, info['count']):.1f}%)",
             f"  dtypes         values {info['values_dtype']}, indices {info['indices_dtype']}",
             f"  disk           {_human(info['disk_bytes'])} allocated, {_human(info['apparent_bytes'])} apparent"]
    if info["not_done_examples"]:
        lines.append(f"  not done, e.g. {', '.join(info['not_done_examples'])}")
    prov = info.get("provenance") or {}
    if prov:
        lines.append(f"  provenance     {json.dumps(prov, sort_keys=True)}")
    h = info.get("histogram")
    if h:
        lines += [f"  top-1 class ids over {h['rows_sampled']} done rows:",
                  f"    classes present       {h['top1_classes_present']} of {info['num_classes']}",
                  "    most common           " + ", ".join(f"{c}: {p:.2%}" for c, p in h["top1_most_common"]),
                  "    least common present  " + ", ".join(f"{c}: {p:.2%}" for c, p in h["top1_least_common_present"]),
                  f"    image-majority share  {h['mean_share_of_image_majority_class']:.2%} of locations",
                  f"    classes in any top-k  {h['all_k_ids_classes_present']}",
                  f"    top-1 logit mean      {h['top1_value_mean']:.3f}; top-k range "
                  f"[{h['topk_value_range'][0]:.3f}, {h['topk_value_range'][1]:.3f}]"]
    else:
        lines.append("  no done rows yet")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="labels_command", metavar="{import,info}")
    p = sub.add_parser("import", help="convert the reference repo's per-image .pt label maps into a store")
    p.add_argument("--src", required=True, help="root of <wnid>/<stem>.pt files ([2, k, S, S] float16)")
    p.add_argument("--out", required=True, help="label store directory to create")
    p.add_argument("--num-classes", type=int, default=1000, help="number of classes C (default 1000)")
    p.add_argument("--images", default=None,
                   help="image folder: match each .pt to its image file (directory + name up to the first '.')")
    p.add_argument("--ext", default=".JPEG", help="without --images: image extension to append (default .JPEG)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("-j", "--workers", type=int, default=8, help="threads loading .pt files")
    p.add_argument("--no-progress", action="store_true")
    q = sub.add_parser("info", help="summarise a label store")
    q.add_argument("store", help="label store directory")
    q.add_argument("--sample", type=int, default=2048, help="rows sampled for the class-id histogram")
    q.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    cmd = getattr(args, "labels_command", None)
    try:
        if cmd == "import":
            res = import_reference_labels(args.src, args.out, num_classes=args.num_classes, images=args.images,
                                          ext=args.ext, overwrite=args.overwrite, workers=args.workers,
                                          progress=not args.no_progress)
            for f, err in res["bad"][:20]:
                print(f"labels import: skipped {f}: {err}", file=sys.stderr)
            if len(res["bad"]) > 20:
                print(f"labels import: ... and {len(res['bad']) - 20} more bad files", file=sys.stderr)
            if res["no_image"]:
                print(f"labels import: {len(res['no_image'])} label file(s) match no image under {args.images}, "
                      f"e.g. {res['no_image'][:3]}", file=sys.stderr)
            print(f"imported {res['imported']} of {res['rows']} label maps (C={res['num_classes']}, k={res['k']}, "
                  f"S={res['size']}) into {res['store']}; {len(res['bad'])} bad, {len(res['no_image'])} without image")
            return 1 if res["bad"] else 0
        if cmd == "info":
            info = store_info(args.store, sample=args.sample)
            print(json.dumps(info, indent=1) if args.json else format_info(info))
            return 0
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"tokenlabel labels {cmd}: error: {e}", file=sys.stderr)
        return 2
    print("usage: tokenlabel labels {import,info} ... (see tokenlabel labels --help)", file=sys.stderr)
    return 2
