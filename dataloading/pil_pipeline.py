"""PIL fallback pipeline (backend="torch"): a torch DataLoader whose workers decode with PIL and do
the whole per-sample work on the CPU, as the reference does (crop + resize, RandAugment, flip,
label-map read and warp). The sampler, the geometry draws and the label warp are the ones the DALI
pipeline uses (sampling.py, loader.SampleSource); the main process only moves the pinned batch to
the device and normalises / erases it (loader.finish_batch), exactly as for DALI.
"""
from __future__ import annotations

import numpy as np
import torch

from . import randaugment as ra


class _EpochBatches(torch.utils.data.Sampler):
    """Batch sampler: lists of (epoch, dataset index) keys for one (epoch, start_batch)."""

    def __init__(self, sampler, epoch, start_batch):
        self.sampler, self.epoch, self.start_batch = sampler, epoch, start_batch

    def __iter__(self):
        for b in self.sampler.batches(self.epoch, self.start_batch):
            yield [(self.epoch, int(i)) for i in b]

    def __len__(self):
        return self.sampler.num_batches - self.start_batch


class PilDataset(torch.utils.data.Dataset):
    """dataset[(epoch, idx)] -> one sample's dict (uint8 CHW image + its numpy metadata)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source.dataset)

    def __getitem__(self, key):
        epoch, idx = key
        src = self.source
        idx, img = src.load_pil(idx)
        S = src.image_size
        if not src.train:
            img = eval_resize_crop(img, S, src.crop_pct)
            return dict(image=_to_chw(img), sample_ids=np.array([idx]), classes=src.dataset.targets[[idx]])
        meta = src.meta(epoch, np.array([idx]), np.array([img.height]), np.array([img.width]))
        t, l, h, w = (int(v) for v in meta["crop"][0])
        from PIL import Image

        resample = Image.BICUBIC if meta["interp"][0] else Image.BILINEAR
        img = img.resize((S, S), resample, box=(l, t, l + w, t + h))
        if "ra_op" in meta:
            img = ra.apply_pil(img, meta["ra_op"][0], meta["ra_arg"][0], meta["ra_interp"][0])
        if meta["flips"][0]:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        meta["image"] = _to_chw(img)
        return meta


def eval_resize_crop(img, image_size, crop_pct):
    """timm eval transform (sampling.eval_geometry): shorter side to int(image_size / crop_pct),
    bicubic, then the centre image_size x image_size crop."""
    from PIL import Image

    from .sampling import eval_geometry

    oh, ow, top, left = (int(v) for v in eval_geometry([img.height], [img.width], image_size, crop_pct)[0])
    img = img.resize((ow, oh), Image.BICUBIC)
    return img.crop((left, top, left + image_size, top + image_size))


def _to_chw(img):
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def collate(samples):
    out = {"images": torch.stack([s.pop("image") for s in samples])}
    for key in samples[0]:
        out[key] = np.concatenate([s[key] for s in samples])
    return out


class PilBackend:
    """Yields (uint8 images [B,3,H,W] on the device, numpy metadata) per batch; RandAugment and the
    flip are already applied (flags tell loader.finish_batch not to redo them)."""
    applies_augment = True

    def __init__(self, source, sampler, device, num_workers, pin_memory=None):
        self.source, self.sampler, self.device = source, sampler, torch.device(device)
        self.num_workers = num_workers
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        self._dl = self._batch_sampler = None

    def batches(self, epoch, start_batch):
        if self._dl is None:
            # one DataLoader for the loader's life: workers persist across epochs; the batch
            # sampler is re-aimed at (epoch, start_batch) before each iteration
            self._batch_sampler = _EpochBatches(self.sampler, epoch, start_batch)
            self._dl = torch.utils.data.DataLoader(
                PilDataset(self.source), batch_sampler=self._batch_sampler, num_workers=self.num_workers,
                collate_fn=collate, pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                prefetch_factor=4 if self.num_workers > 0 else None)
        self._batch_sampler.epoch, self._batch_sampler.start_batch = epoch, start_batch
        for batch in self._dl:
            images = batch.pop("images").to(self.device, non_blocking=True)
            yield images, batch

    def close(self):
        """Stop the persistent DataLoader workers now and wait for them and their queues' feeder threads: left to
        the interpreter's exit, a feeder thread raced the closing of its pipe ("Exception in thread
        QueueFeederThread ... Bad file descriptor" after the GPU train tests, H100, 2026-12-05). A later epoch
        starts new workers."""
        dl, self._dl = self._dl, None
        it = getattr(dl, "_iterator", None) if dl is not None else None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is None:
            return
        shutdown()  # torch's own: joins the workers, closes the index queues without waiting for their feeders
        for q in getattr(it, "_index_queues", ()):
            feeder = getattr(q, "_thread", None)  # multiprocessing.Queue's feeder thread, once it has been fed
            if feeder is not None:
                feeder.join(timeout=30)
