"""One host->device copy per batch: every per-batch array the device needs (classes, sample ids,
crop boxes, flips, the RandAugment/flip/erasing table of ra_kernel, label maps) is laid out in one
uint8 buffer, pinned when it is bound for CUDA, copied with one non-blocking transfer, and viewed
back as typed tensors on the device. The batch's outputs are views of that one device buffer.

``pack`` is cheap numpy work (a few memcpys; the label maps dominate); the DALI producer calls it in
its background threads so the training thread only issues the copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import ra_kernel

ALIGN = 64  # every array starts on a 64-byte boundary (any dtype can view it; coalesced reads)


@dataclass
class HostBatch:
    buffer: torch.Tensor  # uint8 [nbytes], pinned for CUDA
    layout: tuple         # (name, byte offset, torch dtype, shape) per array
    plan: ra_kernel.Plan  # the table's active / LUT layers (host knowledge for the launcher)
    height: int
    width: int
    train: bool
    augment: bool

    def matches(self, *, height, width, train, augment) -> bool:
        return (self.height, self.width, self.train, self.augment) == (height, width, train, augment)


def _torch_dtype(a: np.ndarray):
    return torch.from_numpy(np.empty(0, a.dtype)).dtype


def pack_arrays(meta, *, height, width, train, augment):
    """numpy batch metadata -> (uint8 buffer, layout with numpy dtype names, plan): pack's work
    without torch, so a worker process can do it. train: boxes, flips and erasing are included;
    augment: RandAugment and the flip are applied on the device (DALI path)."""
    table, plan = ra_kernel.build_table(meta, height=height, width=width, train=train, augment=augment)
    arrays = [("classes", np.asarray(meta["classes"], np.int64)),
              ("sample_ids", np.asarray(meta["sample_ids"], np.int64))]
    if train:
        arrays += [("boxes", np.asarray(meta["boxes"], np.float32)), ("flips", np.asarray(meta["flips"], bool))]
    arrays.append(("ra_table", table))
    for key in ("label_values", "label_indices"):
        if key in meta:
            arrays.append((key, np.asarray(meta[key])))
    layout, off = [], 0
    for name, a in arrays:
        layout.append((name, off, a.dtype.str, tuple(a.shape)))
        off += -(-a.nbytes // ALIGN) * ALIGN
    buf = np.empty(max(off, ALIGN), np.uint8)
    for (name, o, _, _), (_, a) in zip(layout, arrays):
        buf[o:o + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return buf, tuple(layout), plan


def host_batch(buf, layout, plan, *, height, width, train, augment, pin) -> HostBatch:
    """pack_arrays' output -> HostBatch (copied into pinned memory when ``pin``)."""
    if pin:
        t = torch.empty(len(buf), dtype=torch.uint8, pin_memory=True)
        t.numpy()[:] = buf
    else:
        t = torch.from_numpy(buf)
    layout = tuple((name, o, _torch_dtype(np.empty(0, np.dtype(dt))), shape) for name, o, dt, shape in layout)
    return HostBatch(t, layout, plan, height, width, train, augment)


def pack(meta, *, height, width, train, augment, pin) -> HostBatch:
    """numpy batch metadata -> HostBatch (see pack_arrays)."""
    buf, layout, plan = pack_arrays(meta, height=height, width=width, train=train, augment=augment)
    return host_batch(buf, layout, plan, height=height, width=width, train=train, augment=augment, pin=pin)


def to_device(hb: HostBatch, device) -> dict:
    """The one copy, then typed views: {name: tensor on ``device``}."""
    device = torch.device(device)
    buf = hb.buffer.to(device, non_blocking=True) if device.type == "cuda" else hb.buffer.to(device)
    out = {}
    for name, off, dtype, shape in hb.layout:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out[name] = buf[off:off + nbytes].view(dtype).view(shape)
    return out
