"""The annotator: dense top-k label maps from a teacher, written into a LabelStore (`tokenlabel annotate`).

For every image of an ImageFolder tree the teacher's classifier is applied at every location of
its final feature map (or to every patch token of a ViT-like teacher), which gives per-location
logits [C, h, w]; the top-k logits per location, sorted descending, and their class ids are
stored. This is the reference's ``generate_label.py`` (token_labeling.md §1):

* preprocessing: the eval transform: resize the shorter side to ``img_size / crop_pct`` (bicubic
  by default), centre-crop ``img_size`` x ``img_size``, scale to [0, 1], normalise (ImageNet
  mean/std by default). The map therefore covers the central square of each image.
* dense logits: ``teacher.dense_logits(images)`` when the teacher has it (every tokenlabel model
  does); otherwise ``teacher.forward_features(images)`` followed by ``teacher.get_classifier()``
  applied per location; token outputs ``[B, N, D]`` drop their prefix (cls) tokens and are reshaped
  to a sqrt(N) x sqrt(N) grid. No softmax: the stored values are logits.
* when the logit grid h x w differs from ``size`` x ``size`` it is resized bilinearly
  (align_corners=False) to S x S before the top-k (the reference needs no resize because it picks
  S = img_size / stride).

Resuming: rows are written a batch at a time and only then marked done (see store.py), so a
killed run loses at most the batch in flight; running the same command again skips done rows.
Images that fail to decode are skipped with one warning naming the file, stay not-done, and are
listed at the end.

Python::

    from tokenlabel.dataloading import annotate
    annotate(teacher, "data/train", "labels/", size=14, topk=5, img_size=224, device="cuda")

CLI::

    tokenlabel annotate --teacher runs/teacher/best.pth --data data/train --out labels --size 14 --topk 5
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import math
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .store import LabelStore

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
def list_images(root) -> tuple[Path, list[str]]:
    """(image root, sorted posix image paths relative to it) of an ImageFolder tree or a file list,
    listed exactly as the training loader lists them (``sampling.list_dataset``), so every image
    the loader asks a label map for gets one."""
    from .sampling import list_dataset

    ds = list_dataset(root)
    return Path(ds.root), sorted(ds.relpaths)


def resolve_data_root(data) -> Path:
    """The folder whose class sub-folders hold the images: ``data`` itself, or ``data/train`` when
    ``data`` is a split root holding ``train/`` (and e.g. ``val/``) and no class folders of its own."""
    data = Path(data)
    if data.is_dir() and (data / "train").is_dir() and not any(
            (data / d).is_dir() for d in os.listdir(data) if d not in ("train", "val", "test") and
            not d.startswith(".")):
        return data / "train"
    return data


_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1}


def eval_transform(img, img_size: int, crop_pct: float = 1.0, interpolation: str = "bicubic",
                   mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """PIL image -> normalised float32 [3, img_size, img_size] (the timm/torchvision eval transform).

    Shorter side to ``floor(img_size / crop_pct)`` (the longer one scaled and truncated, as
    torchvision's Resize(int) does), then a centre crop whose offsets are rounded like
    torchvision's CenterCrop.
    """
    img = img.convert("RGB")
    w, h = img.size
    short = int(math.floor(img_size / crop_pct))
    if w <= h:
        nw, nh = short, int(short * h / w)
    else:
        nh, nw = short, int(short * w / h)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample=_RESAMPLE[interpolation])
    top = int(round((nh - img_size) / 2.0))
    left = int(round((nw - img_size) / 2.0))
    img = img.crop((left, top, left + img_size, top + img_size))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


class _ImageRows(torch.utils.data.Dataset):
    """(image tensor or None, row, error) for the given store rows."""

    def __init__(self, root: Path, paths: Sequence[str], rows: np.ndarray, transform: Callable):
        self.root, self.paths, self.rows, self.transform = root, paths, rows, transform

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        from PIL import Image

        row = int(self.rows[i])
        file = self.root / self.paths[row]
        try:
            with Image.open(file) as im:
                im.load()
                return self.transform(im), row, None
        except Exception as e:  # corrupt, truncated, unsupported: skipped by the caller
            return None, row, f"{type(e).__name__}: {e}"


def _collate(items):
    good = [(x, r) for x, r, err in items if err is None]
    bad = [(r, err) for _, r, err in items if err is not None]
    images = torch.stack([x for x, _ in good]) if good else None
    rows = np.array([r for _, r in good], dtype=np.int64)
    return images, rows, bad


# --------------------------------------------------------------------------- teacher
def dense_logits(teacher: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Per-location class logits [B, C, h, w] of ``teacher`` on ``images``."""
    if hasattr(teacher, "dense_logits"):
        out = teacher.dense_logits(images)
    elif hasattr(teacher, "forward_features") and hasattr(teacher, "get_classifier"):
        feats = teacher.forward_features(images)
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        head = teacher.get_classifier()
        if feats.dim() == 4:  # [B, D, h, w]: the classifier as a 1x1 conv
            out = head(feats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        elif feats.dim() == 3:  # [B, N, D] tokens: drop prefix tokens, make the grid square
            n = feats.shape[1]
            prefix = getattr(teacher, "num_prefix_tokens", None)
            if prefix is None:
                prefix = next((p for p in (0, 1, 2) if n - p > 0 and math.isqrt(n - p) ** 2 == n - p), None)
            side = math.isqrt(n - prefix) if prefix is not None and n - prefix > 0 else 0
            if prefix is None or side * side != n - prefix:
                raise ValueError(f"teacher features have {n} tokens: cannot drop prefix tokens to get a "
                                 "square grid; give the teacher a dense_logits(images) method")
            tok = head(feats[:, prefix:])
            out = tok.transpose(1, 2).reshape(tok.shape[0], tok.shape[2], side, side)
        else:
            raise ValueError(f"teacher.forward_features returned shape {list(feats.shape)}; expected "
                             "[B, D, h, w] or [B, N, D]")
    else:
        raise ValueError(f"teacher {type(teacher).__name__} has neither dense_logits(images) nor "
                         "forward_features + get_classifier; wrap it in a module with dense_logits")
    if out.dim() != 4 or out.shape[0] != images.shape[0]:
        raise ValueError(f"dense logits must be [B, C, h, w] with B={images.shape[0]}, got {list(out.shape)}")
    return out


def topk_label_maps(logits: torch.Tensor, size: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense logits [B, C, h, w] -> (values [B, k, S, S] float32, indices [B, k, S, S] int64), the
    top-k per location sorted descending; bilinear resize to S x S first when h, w != S."""
    logits = logits.float()
    if logits.shape[-2:] != (size, size):
        logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
    if k > logits.shape[1]:
        raise ValueError(f"topk={k} is larger than the teacher's {logits.shape[1]} classes")
    return torch.topk(logits, k, dim=1, largest=True, sorted=True)


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """A short hash of the teacher's state (names, shapes, dtypes and exact bytes), the same on any
    device, so a resumed annotation refuses to mix label maps of two teachers."""
    h = hashlib.sha1()
    with torch.no_grad():
        for name, t in teacher.state_dict().items():
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            if t.numel():
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- annotate
@contextlib.contextmanager
def writer_lock(out_store: Path):
    """Exclusive lock for one annotator per store (a hidden sibling file, flock: released when the
    process dies, so a killed run never leaves a stale lock). A no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    out_store.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out_store.parent / f".{out_store.name}.annotate.lock"
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another annotator is writing label store {str(out_store)!r} "
                             f"(lock {str(lock_path)!r}); wait for it or use another --out") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _default_img_size(teacher) -> int | None:
    for attr in ("img_size", "image_size"):
        v = getattr(teacher, attr, None)
        if isinstance(v, int):
            return v
        if isinstance(v, (tuple, list)) and v and isinstance(v[-1], int):
            return int(v[-1])
    cfg = getattr(teacher, "default_cfg", None) or getattr(teacher, "pretrained_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        return int(cfg["input_size"][-1])
    return None


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)
    except ImportError:
        return None


def annotate(teacher: torch.nn.Module, data_root, out_store, size: int, topk: int = 5,
             img_size: int | None = None, batch_size: int = 64, device=None,
             num_workers: int | None = None, amp: bool = False, resume: bool = True,
             crop_pct: float = 1.0, interpolation: str = "bicubic", mean=IMAGENET_MEAN,
             std=IMAGENET_STD, teacher_name: str | None = None, progress: bool = True,
             on_batch: Callable[[int, np.ndarray], None] | None = None) -> dict:
    """Annotate every image under ``data_root`` with the top-``topk`` dense logits of ``teacher``
    on a ``size`` x ``size`` grid, into the LabelStore at ``out_store``.

    ``data_root``: an ImageFolder tree (or a split root with ``train/``, which is then used), or a
    file list ("relpath class" lines); store rows are keyed by image path relative to that folder
    (the folder holding the list), as the training loader looks them up. ``img_size``: input side (default: the
    teacher's ``img_size`` attribute, else 224). ``device``: default CUDA when available, else CPU.
    ``amp``: autocast (fp16 on CUDA, bf16 on CPU). ``resume=True`` continues an existing store made
    for the same images, teacher, size and k (done rows are skipped); ``resume=False`` replaces it.
    ``on_batch(batch_index, rows)`` is called after each batch is stored (for progress hooks; an
    exception raised there stops the run, with that batch already safe).

    Returns a summary dict: store path, images, done, newly annotated, skipped bad files.
    """
    if not isinstance(teacher, torch.nn.Module):
        raise ValueError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    for name, v in (("size", size), ("topk", topk), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not 0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available here; pass device='cpu'")
    img_size = int(img_size or _default_img_size(teacher) or 224)
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)

    root, paths = list_images(resolve_data_root(data_root))

    teacher = teacher.to(device).eval()
    name = teacher_name or type(teacher).__name__
    fingerprint = teacher_fingerprint(teacher)
    preprocessing = {"img_size": img_size, "crop_pct": crop_pct, "interpolation": interpolation,
                     "mean": list(map(float, mean)), "std": list(map(float, std)),
                     "resize": "shorter side to img_size/crop_pct, centre crop img_size",
                     "logits_resize": "bilinear to size x size when the teacher grid differs"}
    provenance = {"teacher": name, "teacher_fingerprint": fingerprint, "preprocessing": preprocessing,
                  "data_root": str(Path(root).resolve()), "amp": bool(amp), "tool": "tokenlabel annotate"}

    out_store = Path(out_store)
    with writer_lock(out_store):  # one annotator per store: two would race to create it
        store = None
        if resume and (out_store / "meta.json").exists():
            store = LabelStore.open(out_store, mode="r+")
            store.check_compatible(k=topk, size=size)
            if store.paths != paths:
                extra = sorted(set(paths) - set(store.paths))[:3]
                gone = sorted(set(store.paths) - set(paths))[:3]
                raise ValueError(f"label store {str(out_store)!r} was made for other images than {str(root)!r} "
                                 f"({len(store.paths)} vs {len(paths)} images; new e.g. {extra}, gone e.g. {gone}); "
                                 "use another --out or resume=False (--restart) to replace it")
            old = store.provenance
            if old.get("teacher_fingerprint") not in (None, fingerprint) or \
                    old.get("preprocessing", preprocessing) != preprocessing:
                raise ValueError(f"label store {str(out_store)!r} was started with another teacher or "
                                 f"preprocessing ({old.get('teacher')!r}, {old.get('preprocessing')}); "
                                 "resuming would mix label maps; use resume=False (--restart) to replace it")

        todo = np.arange(len(paths)) if store is None else np.flatnonzero(~store.done)
        transform = functools.partial(eval_transform, img_size=img_size, crop_pct=crop_pct,
                                      interpolation=interpolation, mean=mean, std=std)
        dataset = _ImageRows(Path(root), paths, todo, transform)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                             num_workers=num_workers, collate_fn=_collate,
                                             pin_memory=device.type == "cuda",
                                             persistent_workers=False)
        bar = _progress(len(todo), f"annotate {out_store.name}", progress)
        bad_files: list[tuple[str, str]] = []
        written = 0
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        try:
            for b, (images, rows, bad) in enumerate(loader):
                for row, err in bad:
                    warnings.warn(f"annotate: skipping unreadable image {str(Path(root) / paths[row])!r} ({err})",
                                  RuntimeWarning, stacklevel=2)
                    bad_files.append((paths[row], err))
                if images is not None:
                    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                        logits = dense_logits(teacher, images.to(device, non_blocking=True))
                    values, indices = topk_label_maps(logits, size, topk)
                    if store is None:  # C is known from the first batch's logits
                        store = LabelStore.create(out_store, paths, num_classes=int(logits.shape[1]), k=topk,
                                                  size=size, overwrite=True)
                        store.set_provenance(**provenance)
                    elif written == 0:  # resuming: the teacher must give the store's C
                        store.check_compatible(num_classes=int(logits.shape[1]))
                    store.write(rows, values.cpu(), indices.cpu(), mark_done=True)
                    written += len(rows)
                if bar is not None:
                    bar.update(len(rows) + len(bad))
                if on_batch is not None:
                    on_batch(b, rows)
        finally:
            if bar is not None:
                bar.close()
        if store is None:
            raise ValueError(f"annotate: none of the {len(todo)} images under {str(root)!r} could be read; "
                             f"first failures: {bad_files[:3]}")
        summary = {"store": str(out_store), "images": len(paths), "done": store.num_done,
                   "annotated": written, "skipped": [p for p, _ in bad_files]}
        if bad_files:
            print(f"annotate: {len(bad_files)} image(s) could not be read and have no label map: "
                  f"{[p for p, _ in bad_files[:10]]}{' ...' if len(bad_files) > 10 else ''}", file=sys.stderr)
        store.close()
        return summary


# --------------------------------------------------------------------------- teacher loading (CLI)
def load_teacher(spec: str, model_name: str | None = None, num_classes: int | None = None,
                 use_ema: bool = False) -> tuple[torch.nn.Module, str]:
    """A teacher from a checkpoint path or a ``package.module:attr`` spec (a module or a factory).

    Checkpoints are loaded with ``tokenlabel.models.load_checkpoint`` (the checkpoint names its
    model and arguments); with ``model_name`` the model is built by ``create_model`` first and the
    weights loaded into it; ``use_ema`` takes the checkpoint's EMA weights. Returns (module, a name
    for the provenance).
    """
    if os.path.exists(spec):
        try:
            from tokenlabel import models as tm

            tm.create_model, tm.load_checkpoint  # noqa: B018 (fail here, with a clear message)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--teacher {spec!r}: loading a checkpoint needs tokenlabel.models "
                             f"(create_model, load_checkpoint): {e}") from None
        if model_name is not None:
            kwargs = {} if num_classes is None else {"num_classes": num_classes}
            model = tm.create_model(model_name, **kwargs)
            tm.load_checkpoint(spec, model, use_ema=use_ema)
            return model, f"{model_name}{'(ema)' if use_ema else ''}:{spec}"
        loaded = tm.load_checkpoint(spec, use_ema=use_ema)
        model = _find_module(loaded)
        if model is None:
            raise ValueError(f"checkpoint {spec!r} did not give a model (got {type(loaded).__name__}); "
                             "pass --model NAME to build it")
        name = getattr(model, "model_name", None) or type(model).__name__
        return model, f"{name}{'(ema)' if use_ema else ''}:{spec}"
    if ":" in spec:
        mod_name, attr = spec.split(":", 1)
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--teacher {spec!r}: cannot import ({e})") from None
        if not isinstance(obj, torch.nn.Module) and callable(obj):
            obj = obj()
        if not isinstance(obj, torch.nn.Module):
            raise ValueError(f"--teacher {spec!r} is not a torch module or a factory returning one")
        return obj, spec
    raise ValueError(f"--teacher {spec!r} is neither an existing checkpoint file nor a 'package.module:attr' spec")


def _find_module(obj):
    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, (tuple, list)):
        return next((o for o in obj if isinstance(o, torch.nn.Module)), None)
    if isinstance(obj, dict):
        if isinstance(obj.get("model"), torch.nn.Module):
            return obj["model"]
        return next((o for o in obj.values() if isinstance(o, torch.nn.Module)), None)
    return None


def add_arguments(parser) -> None:
    parser.add_argument("--teacher", required=True,
                        help="checkpoint from `tokenlabel train` (or models.save_checkpoint), or package.module:attr")
    parser.add_argument("--data", required=True, help="ImageFolder tree (or a root holding train/)")
    parser.add_argument("--out", required=True, help="label store directory to create or resume")
    parser.add_argument("--size", type=int, required=True, help="side S of the stored label maps")
    parser.add_argument("--topk", type=int, default=5, help="classes kept per location (default 5)")
    parser.add_argument("--img-size", type=int, default=None, help="teacher input side (default: the model's, else 224)")
    parser.add_argument("--crop-pct", type=float, default=1.0, help="resize to img_size/crop_pct, then centre crop")
    parser.add_argument("--interpolation", default="bicubic", choices=sorted(_RESAMPLE))
    parser.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN)
    parser.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD)
    parser.add_argument("-b", "--batch-size", type=int, default=64)
    parser.add_argument("--model", default=None, help="model name to build before loading the checkpoint's weights")
    parser.add_argument("--num-classes", type=int, default=None, help="with --model: its number of classes")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    parser.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda when available)")
    parser.add_argument("-j", "--workers", type=int, default=None, help="DataLoader workers")
    parser.add_argument("--amp", action="store_true", help="autocast the teacher (fp16 on CUDA)")
    parser.add_argument("--restart", action="store_true", help="replace an existing store instead of resuming it")
    parser.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    try:
        teacher, name = load_teacher(args.teacher, args.model, args.num_classes, use_ema=args.ema)
        summary = annotate(teacher, args.data, args.out, size=args.size, topk=args.topk, img_size=args.img_size,
                           batch_size=args.batch_size, device=args.device, num_workers=args.workers,
                           amp=args.amp, resume=not args.restart, crop_pct=args.crop_pct,
                           interpolation=args.interpolation, mean=tuple(args.mean), std=tuple(args.std),
                           teacher_name=name, progress=not args.no_progress)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"tokenlabel annotate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: (v if k != "skipped" else len(v)) for k, v in summary.items()}))
    return 0 if not summary["skipped"] else 1


class _CallableModule(types.ModuleType):
    """Importing this submodule binds ``tokenlabel.dataloading.annotate`` to the module (Python sets
    the package attribute after the import), which would shadow the lazily exported function of the
    same name; calling the module therefore calls :func:`annotate`."""

    def __call__(self, *args, **kwargs):
        return annotate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
