"""build_loader: the training / eval loader behind ``--loader dali|torch``.

Both backends share the sampler (exact, seeded, shardable, resumable epochs), the per-sample
random draws and the label-map handling (sampling.py), and the last GPU steps (finish_batch), so
they differ only in who decodes and augments the pixels:

* ``backend="dali"`` (dali_pipeline.py): DALI decodes the crop window on the GPU ("mixed"),
  resizes it; RandAugment, flip, normalise and random erasing run batched on the GPU (Triton,
  ra_kernel.py; the torch ops of randaugment.apply_torch on the CPU).
* ``backend="torch"`` (pil_pipeline.py): DataLoader workers do decode, crop, resize, RandAugment and
  flip with PIL; normalise and erasing run on the device.

Batches are dicts (design.md): images [B,3,H,W] normalised (fp32, or bf16 with dtype=), classes
[B] int64, and in training boxes [B,4] float32 (top, left, height, width) of the crop normalised
to the decoded image before the flip, flips [B] bool, and with ``labels`` label_values [B,k,S,S]
fp16 and label_indices [B,k,S,S] (int64 by default); plus sample_ids [B] int64 (dataset indices,
for checks). Label maps are warped by RandAugment's spatial ops so they stay aligned.

Epochs: call ``loader.set_epoch(epoch)`` before iterating each epoch (like DistributedSampler);
``set_epoch(epoch, start_batch=b)`` makes the next iteration resume at batch b with exactly the
samples, order and augmentation an uninterrupted epoch would have had from there on. len(loader)
is the number of batches of a full epoch for this shard.

Images without a label map: ``missing_labels="error"`` (default) refuses at start-up listing the
first missing ones; ``missing_labels="class"`` trains them on their class label: their map holds
the class id with logit ``CLASS_LABEL_LOGIT`` (20) at every location and value 0 (the logit every
class outside the top-k has anyway) for the other k-1 entries, so the loss's softmax gives the
class probability 1 - (C-1)e^-20 (one-hot up to 2e-6 at C=1000) before smoothing.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from . import packing
from . import randaugment as ra
from .sampling import (EpochSampler, draw_geometry, list_dataset, pil_open_rgb, warn_once,
                       warp_label_maps)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASS_LABEL_LOGIT = 20.0
_MISSING_SHOWN = 10


class SampleSource:
    """Everything a worker needs to turn a dataset index into a sample (picklable)."""

    def __init__(self, dataset, *, train, image_size, seed, interpolation, randaugment, random_erasing,
                 crop_pct, labels_path=None, label_rows=None, num_classes=None, index_dtype=np.int64):
        self.dataset, self.train, self.image_size, self.seed = dataset, train, image_size, seed
        self.interpolation, self.ra_spec, self.random_erasing = interpolation, randaugment, random_erasing
        self.crop_pct, self.labels_path, self.label_rows = crop_pct, labels_path, label_rows
        self.num_classes, self.index_dtype = num_classes, index_dtype
        self._store = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_store"] = None
        return d

    @property
    def store(self):
        if self._store is None and self.labels_path is not None:
            from .store import LabelStore

            self._store = LabelStore.open(self.labels_path)
        return self._store

    def load_pil(self, idx):
        """-> (index used, RGB PIL image); unreadable files are replaced by the next readable one."""
        n = len(self.dataset)
        j = int(idx)
        for _ in range(n):
            path = self.dataset.path(j)
            try:
                return j, pil_open_rgb(path)
            except Exception as e:  # noqa: BLE001 - any failure to decode means "skip this file"
                warn_once(path, f"{type(e).__name__}: {e}")
            j = (j + 1) % n
        raise RuntimeError("no readable image in the dataset")

    def meta(self, epoch, idx, heights, widths):
        """Training metadata of the samples ``idx`` (decoded sizes heights x widths): geometry,
        RandAugment draws, classes, and (with labels) their label maps already warped."""
        idx = np.asarray(idx, np.int64)
        g = draw_geometry(self.seed, epoch, idx, heights, widths, image_size=self.image_size,
                          interpolation=self.interpolation, randaugment=self.ra_spec,
                          random_erasing=self.random_erasing)
        g["sample_ids"] = idx
        g["classes"] = self.dataset.targets[idx]
        if self.labels_path is not None:
            values, indices = self.read_labels(idx)
            if "ra_op" in g:
                M = ra.composed_affine(g["ra_op"], g["ra_arg"], self.image_size, self.image_size)
                values, indices = warp_label_maps(values, indices, M, g["crop"], g["sizes"], self.image_size)
            g["label_values"], g["label_indices"] = values, indices.astype(self.index_dtype, copy=False)
        return g

    def read_labels(self, idx):
        store = self.store
        rows = self.label_rows[idx]
        have = rows >= 0
        n, k, S = len(idx), store.k, store.size
        values = np.zeros((n, k, S, S), np.float16)
        indices = np.zeros((n, k, S, S), np.int64)
        if have.any():
            v, i = store.read(rows[have])
            values[have], indices[have] = v, i
        for b in np.nonzero(~have)[0]:  # missing_labels="class": the class label at every location
            c = int(self.dataset.targets[idx[b]])
            values[b, 0] = CLASS_LABEL_LOGIT
            for j in range(k):
                indices[b, j] = (c + j) % store.num_classes
        return values, indices


ENGINES = ("triton", "torch")


def finish_batch(images, meta, *, device, train, augment, dtype, seed, engine=None):
    """The GPU tail of both pipelines: uint8 [B,3,H,W] (any strides) on ``device`` -> the batch dict.

    augment=True (DALI): apply RandAugment and the flip here, batched on the device.
    Then normalise with the ImageNet mean/std and apply random erasing (mode 'pixel': N(0,1)
    noise in the normalised space, as timm) to the image only; ``seed`` (int) drives the noise.

    All per-batch metadata reaches the device in one copy (packing.py; the DALI producer packs it
    ahead, as ``meta["packed"]``). engine "triton" (default on CUDA): ra_kernel.finish_images, one
    table, a few launches. engine "torch" (default on the CPU, where Triton would run interpreted
    and slowly): randaugment.apply_torch and torch ops, the reference; its erasing noise comes from
    a torch generator seeded with ``seed`` instead of Philox, so the noise values differ (both are
    N(0,1) inside the same boxes).
    """
    dev = torch.device(device)
    engine = engine or ("triton" if dev.type == "cuda" else "torch")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    H, W = int(images.shape[2]), int(images.shape[3])
    hb = meta.get("packed")
    if hb is None or not hb.matches(height=H, width=W, train=train, augment=augment):
        hb = packing.pack(meta, height=H, width=W, train=train, augment=augment, pin=dev.type == "cuda")
    out = packing.to_device(hb, dev)
    table = out.pop("ra_table")
    x = images.to(dev, non_blocking=dev.type == "cuda")
    if engine == "triton":
        from . import ra_kernel

        out["images"] = ra_kernel.finish_images(x, table, hb.plan, dtype=dtype, seed=seed)
    else:
        out["images"] = _finish_images_torch(x, meta, dev, train=train, augment=augment, dtype=dtype, seed=seed)
    return out


def _finish_images_torch(images, meta, dev, *, train, augment, dtype, seed):
    """finish_batch's images with torch ops (engine "torch")."""
    def put(a, dt=None):
        return ra.to_device(a, dev, dt)

    x = images.float()
    if train and augment:
        if "ra_op" in meta:
            x = ra.apply_torch(x, meta["ra_op"], meta["ra_arg"], meta["ra_interp"])
        f = put(meta["flips"]).view(-1, 1, 1, 1)
        x = torch.where(f, x.flip(-1), x)
    mean = ra._const("mean255", [255 * m for m in IMAGENET_MEAN], dev).view(1, 3, 1, 1)
    std = ra._const("std255", [255 * s for s in IMAGENET_STD], dev).view(1, 3, 1, 1)
    x = (x - mean) / std
    if train and meta["erase"].any():
        # noise is drawn only for the erased samples (about a quarter of the batch) and only over
        # the bounding window of their boxes (the host knows both): one randn, one masked copy
        generator = torch.Generator(device=dev)
        generator.manual_seed(int(seed))
        sel = np.nonzero(np.asarray(meta["erase"]))[0]
        e = np.asarray(meta["erase_box"], np.int64)[sel]
        r0, c0 = int(e[:, 0].min()), int(e[:, 1].min())
        r1, c1 = int((e[:, 0] + e[:, 2]).max()), int((e[:, 1] + e[:, 3]).max())
        eb = put(e - np.array([r0, c0, 0, 0], np.int64))
        top, left, h, w = (eb[:, i].view(-1, 1, 1, 1) for i in range(4))
        rows = torch.arange(r1 - r0, device=dev).view(1, 1, -1, 1)
        cols = torch.arange(c1 - c0, device=dev).view(1, 1, 1, -1)
        mask = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        ridx = put(sel)
        win = x[ridx, :, r0:r1, c0:c1]
        noise = torch.randn(win.shape, device=dev, generator=generator)
        x[ridx, :, r0:r1, c0:c1] = torch.where(mask, noise, win)
    return x.to(dtype).contiguous()


class Loader:
    """Iterable of batch dicts; see the module docstring."""

    def __init__(self, backend, source, sampler, *, device, dtype, train, seed, shard_id, num_classes, classes,
                 engine=None):
        self.backend, self.source, self.sampler = backend, source, sampler
        self.device, self.dtype, self.train, self.seed, self.shard_id = torch.device(device), dtype, train, seed, shard_id
        self.num_classes, self.classes = num_classes, classes
        self.dataset_size = len(source.dataset)
        self.epoch, self.start_batch = 0, 0
        if engine is not None and engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES} or None, got {engine!r}")
        self.engine = engine  # finish_batch's engine; None: Triton on CUDA, torch on the CPU

    def __len__(self):
        return self.sampler.num_batches

    @property
    def batch_size(self):
        return self.sampler.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0):
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch={start_batch} outside [0, {len(self)}] (len(loader))")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def batch_seed(self, epoch: int, b: int) -> int:
        """The erasing noise stream of batch b of ``epoch`` (a pure function: resumed runs match)."""
        return (self.seed * 1_000_003 + epoch * 7919 + self.shard_id * 104_729 + b) & 0x7FFFFFFF

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch
        self.start_batch = 0  # a later iteration without set_epoch replays the whole epoch
        for b, (images, meta) in enumerate(self.backend.batches(epoch, start), start=start):
            yield finish_batch(images, meta, device=self.device, train=self.train,
                               augment=not self.backend.applies_augment, dtype=self.dtype,
                               seed=self.batch_seed(epoch, b), engine=self.engine)

    def close(self):
        """Stop the backend's background work now (it also stops when the loader is collected)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()


def build_loader(root, labels=None, batch_size=128, image_size=224, train=True, backend="dali", device="cuda",
                 shard_id=0, num_shards=1, seed=0, num_workers=None, randaugment="rand-m9-mstd0.5-inc1",
                 random_erasing=0.25, crop_pct=None, interpolation="random", drop_last=None,
                 missing_labels="error", label_size=None, num_classes=None, label_k=None,
                 dtype=torch.float32, label_index_dtype=torch.int64, shuffle=None, dali_threads=None,
                 prefetch=None, engine=None, hw_decoder_load=None, decode_device=None,
                 resize_device=None):
    """Build the train or eval loader. See the module docstring for the batch format and epochs.

    root: ImageFolder directory or file list ("relpath class" lines). labels: a LabelStore path
    (train only). backend: "dali" | "torch". device: "cuda" | "cpu" (DALI on "cpu" decodes on the
    CPU: for tests). num_workers: PIL DataLoader workers / DALI reader threads (default: the CPU
    count). crop_pct: eval resize ratio (default 0.9). interpolation: "random" | "bilinear" |
    "bicubic" for the training resize. label_size / label_k / num_classes: checked against the
    store (ValueError on any disagreement). engine: finish_batch's "triton" | "torch" (default:
    Triton on CUDA, torch on the CPU). hw_decoder_load (DALI only): the share of JPEGs nvJPEG's
    hardware decoder takes, the rest going through its hybrid path (Huffman on the CPU, the rest on the
    GPU). A sequence of loads, e.g. (1.0, 0.0), runs one DALI pipeline per entry ("lanes"); the batches go in
    order to whichever pipeline asks for its next one, so the hardware engines and the hybrid path each take the
    share they can deliver, alone or beside a training step. The samples, boxes, flips and label maps are exactly the
    one-pipeline batches; which decoder decodes a batch depends on timing, so with different loads per lane the
    pixels of a run can differ from another run's by the decoders' rounding (chroma upsampling: a fraction of a grey
    level on average). 0.0: one pipeline on the hybrid path (beside an LV-ViT-S step on an H100, 4 batches ahead, it
    left the GPU idle 2.4-2.6% against 4.8-5.4% for the lanes; dataloading/NOTES.md); bit-equal repeats. The lanes
    (1.0, 0.0) are the fastest alone (H100: 13.4k img/s against the hybrid pipeline's 6.7k). "auto", the default
    where nvJPEG decodes on CUDA (else 0.0): those lanes with the hybrid one 4 batches ahead and the engines' lane
    paused while it delivers less than AUTO_MIN_SHARE of the last batches (beside a training step, where its late
    batches make the step wait), tried again after a while (dali_pipeline._Assist); while it is paused the consumer
    runs the hybrid pipeline itself, as with one pipeline. ``loader.backend.assist.stats()`` says how it went. H100,
    2026-12-06: 12.3-12.9k img/s alone (4.5-4.7x the PIL DataLoader), 2.3 / 2.5% GPU idle beside the LV-ViT-S step
    over 600 steps, against 2.5% for the one hybrid pipeline in the same call.
    dali_threads: DALI's CPU threads (default 12 on CUDA, capped by the core count), or one count per lane
    (default with lanes: 4 for a lane with load > 0.5, 12 for the others). prefetch (DALI only): batches DALI
    prepares ahead per pipeline (default 4 for one pipeline decoding on the GPU and for the hybrid lane of "auto",
    else 2). decode_device (DALI
    only): "gpu" (default on CUDA: nvJPEG) or
    "cpu" (DALI's CPU threads decode and resize, one copy per batch to the GPU; for small images, where the
    GPU decoder's kernels would queue behind the training step's). resize_device (DALI only): where the decoded
    crop is resized, "gpu" or "cpu" (default: where it was decoded); "gpu" with decode_device="cpu" decodes in
    DALI's CPU threads and resizes the batch on the GPU in one launch (the fastest for CIFAR's 32 px JPEGs
    beside a training step, dataloading/NOTES.md).
    """
    if backend not in ("dali", "torch"):
        raise ValueError(f"backend must be 'dali' or 'torch', got {backend!r}")
    if missing_labels not in ("error", "class"):
        raise ValueError(f"missing_labels must be 'error' or 'class', got {missing_labels!r}")
    if interpolation not in ("random", "bilinear", "bicubic"):
        raise ValueError(f"interpolation must be 'random', 'bilinear' or 'bicubic', got {interpolation!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not 0.0 <= float(random_erasing) <= 1.0:
        raise ValueError(f"random_erasing is a probability, got {random_erasing!r}")
    crop_pct = 0.9 if crop_pct is None else float(crop_pct)
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available (use device='cpu')")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    drop_last = train if drop_last is None else bool(drop_last)
    spec = ra.parse(randaugment) if train else None

    dataset = list_dataset(root)
    n_cls = len(dataset.classes)
    label_rows = None
    if labels is not None:
        from .store import LabelStore

        if not train:
            raise ValueError("labels are used in training only (train=False got labels=...)")
        if not os.path.exists(labels):
            raise ValueError(f"label store {str(labels)!r} does not exist")
        store = LabelStore.open(labels)
        store.check_compatible(num_classes=num_classes, k=label_k, size=label_size)
        if n_cls > store.num_classes:
            raise ValueError(f"root {str(root)!r} has {n_cls} classes but label store {str(labels)!r} "
                             f"has num_classes={store.num_classes}")
        missing = store.missing(dataset.relpaths)
        if missing and missing_labels == "error":
            raise ValueError(f"{len(missing)} of {len(dataset)} images have no label map in {str(labels)!r}, "
                             f"e.g. {missing[:_MISSING_SHOWN]} (build them with `tokenlabel annotate`, or pass "
                             "missing_labels='class' to train those on their class label)")
        missing_set = set(missing)
        label_rows = np.array([-1 if p in missing_set else store.row(p) for p in dataset.relpaths], np.int64)
        num_classes = store.num_classes
    else:
        num_classes = n_cls if num_classes is None else int(num_classes)
        if n_cls > num_classes:
            raise ValueError(f"root {str(root)!r} has {n_cls} classes but num_classes={num_classes}")

    source = SampleSource(dataset, train=train, image_size=image_size, seed=seed, interpolation=interpolation,
                          randaugment=spec, random_erasing=float(random_erasing), crop_pct=crop_pct,
                          labels_path=None if labels is None else str(labels), label_rows=label_rows,
                          num_classes=num_classes,
                          index_dtype={torch.int64: np.int64, torch.int32: np.int32}[label_index_dtype])
    sampler = EpochSampler(len(dataset), batch_size, shard_id=shard_id, num_shards=num_shards, seed=seed,
                           drop_last=drop_last, shuffle=train if shuffle is None else shuffle)
    workers = (os.cpu_count() or 2) if num_workers is None else int(num_workers)
    for name, value in (("hw_decoder_load", hw_decoder_load), ("prefetch", prefetch),
                        ("decode_device", decode_device), ("resize_device", resize_device)):  # DALI-only knobs
        if value is not None and backend != "dali":
            raise ValueError(f"{name} applies to backend='dali' only (got backend={backend!r})")
    if backend == "dali":
        from .dali_pipeline import DaliBackend

        impl = DaliBackend(source, sampler, device, num_threads=dali_threads, io_workers=max(1, workers),
                           prefetch=prefetch, decode_device=decode_device, resize_device=resize_device,
                           hw_decoder_load=hw_decoder_load)
    else:
        from .pil_pipeline import PilBackend

        impl = PilBackend(source, sampler, device, num_workers=workers)
    return Loader(impl, source, sampler, device=device, dtype=dtype, train=train, seed=seed, shard_id=shard_id,
                  num_classes=num_classes, classes=dataset.classes, engine=engine)


def loader_throughput(root, labels=None, backend="dali", batch_size=128, image_size=224, num_batches=50,
                      warmup=5, **kw) -> float:
    """Images/s of the full pipeline (decode, crop, flip, RandAugment, normalise, label maps) as a
    training loop sees it: time from the first post-warm-up batch to the last, synchronised.

    Epochs wrap around as needed (drop_last=True), so any dataset size works.
    """
    kw.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    loader = build_loader(root, labels=labels, backend=backend, batch_size=batch_size, image_size=image_size,
                          drop_last=True, **kw)
    dev = torch.device(kw["device"])

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    if num_batches < 1 or warmup < 0:
        raise ValueError(f"need num_batches >= 1 and warmup >= 0, got {num_batches}, {warmup}")
    seen, epoch = 0, 0
    t0 = time.perf_counter()
    total = warmup + num_batches
    done = 0
    while done < total:
        loader.set_epoch(epoch)
        for batch in loader:
            done += 1
            if done == warmup:
                sync()
                t0 = time.perf_counter()
            elif done > warmup:
                seen += batch["images"].shape[0]
            if done >= total:
                break
        epoch += 1
    sync()
    return seen / (time.perf_counter() - t0)
