"""The full training input pipeline in images/s: decode, RandomResizedCrop, flip, RandAugment
(rand-m9-mstd0.5-inc1), normalise, random erasing, label maps: DALI (decoding on the GPU) against
the PIL DataLoader with one worker per CPU core doing the same work (the baseline).

Data: ``--data`` (default: the ImageNet sample ``imagenet-sample-334.tar``, 334 real JPEGs,
looped over several epochs), label maps from ``--labels`` or a random store made for those images.
Beside them, the LV-ViT-S step's consumption rate when the step bench ran in the same invocation.
"""
from __future__ import annotations

import os
import time

import torch

from .registry import Case, CheckFailed, Prepared, Skip, register

# min_images: the image set is repeated (symlinks) up to this size so one epoch amortises start-up;
# epochs: timed epochs (one untimed epoch first)
SHAPES = {"imagenet334": (dict(B=128, img=224, min_images=4096, epochs=3), ("-",))}
QUICK_SHAPES = {"tiny": (dict(B=4, img=32, min_images=0, epochs=2), ("-",))}
# Run only when --shapes names them, with --data the CIFAR-10 training folder (data/cifar10/train): the
# loaders of the CIFAR experiment's students (128 px, B 512, C 10 / k 5 / S 8 label maps) and teacher
# (64 px, B 1024, class labels only), to compare with the runs' own rates and data wait.
NAMED_SHAPES = {
    "cifar128": (dict(B=512, img=128, min_images=0, epochs=3, C=10, k=5, S=8), ("-",)),
    "cifar64": (dict(B=1024, img=64, min_images=0, epochs=3, labels=False), ("-",)),
}


def make_loader(backend, root, store, batch_size, image_size, device, workers=None, **kw):
    try:
        from tokenlabel.dataloading import build_loader
    except Exception as e:  # noqa: BLE001
        raise Skip(f"tokenlabel.dataloading.build_loader not importable: {type(e).__name__}: {e}")
    extra = {} if workers is None else {"num_workers": workers}   # None: the loader's own default
    try:
        return build_loader(str(root), labels=None if store is None else str(store), batch_size=batch_size,
                            image_size=image_size, train=True, backend=backend, device=str(device), seed=0,
                            **extra, **kw)
    except ImportError as e:
        raise Skip(f"{backend} loader unavailable: {e}")


def _cores() -> int:
    """CPU cores this process may use (the affinity mask; os.cpu_count() may report the whole host)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _quick_data(case: Case):
    """A tiny generated ImageFolder for --quick without --data."""
    from tokenlabel.dataloading import make_synthetic_imagefolder

    from .data import _tmpdir

    root = _tmpdir("tokenlabel-bench-quick-")
    make_synthetic_imagefolder(root, num_classes=2, per_class=8, size=48, seed=0)
    return root / "train"


def _check_batch(batch, B, img, device, k, S):
    """k, S None: a loader without label maps (the batch must then carry none)."""
    want = {"images": (B, 3, img, img), "classes": (B,), "boxes": (B, 4), "flips": (B,)}
    if k is None:
        if "label_values" in batch or "label_indices" in batch:
            raise CheckFailed("a loader built without labels returned label maps")
    else:
        want.update(label_values=(B, k, S, S), label_indices=(B, k, S, S))
    for key, shape in want.items():
        if key not in batch:
            raise CheckFailed(f"batch has no {key!r} (keys {sorted(batch)})")
        t = batch[key]
        if tuple(t.shape) != shape:
            raise CheckFailed(f"{key} has shape {tuple(t.shape)}, expected {shape}")
        if t.device.type != torch.device(device).type:
            raise CheckFailed(f"{key} is on {t.device}, expected {device}")
    if not batch["images"].is_floating_point() or not torch.isfinite(batch["images"]).all():
        raise CheckFailed(f"images must be finite floats, got {batch['images'].dtype}")
    if batch["flips"].dtype != torch.bool or batch["classes"].dtype != torch.int64:
        raise CheckFailed(f"flips {batch['flips'].dtype} (want bool), classes {batch['classes'].dtype} (want int64)")
    if k is not None and batch["label_indices"].is_floating_point():
        raise CheckFailed(f"label_indices must be integer, got {batch['label_indices'].dtype}")
    boxes = batch["boxes"].float()
    if not ((boxes >= -1e-6).all() and (boxes[:, 0] + boxes[:, 2] <= 1 + 1e-4).all()
            and (boxes[:, 1] + boxes[:, 3] <= 1 + 1e-4).all() and (boxes[:, 2:] > 0).all()):
        raise CheckFailed("boxes must be (top, left, height, width) inside [0, 1]")


# one DALI pipeline on nvJPEG's hybrid path, 12 threads, 2 batches ahead: the CUDA default until lanes measured
# faster alone and fed (H200, 2026-12-05, dataloading/NOTES.md); kept as the rows "dali" / "loader_fed" so results
# stay comparable (the default was this pipeline 4 ahead on 2026-12-06, HYBRID_DEEP, then "auto": HW_AUTO)
HYBRID = dict(hw_decoder_load=0.0, prefetch=2)
# the one-pipeline DALI configuration fastest alone: most JPEGs on nvJPEG's hardware decoder, 8 threads
HW_DECODER = dict(hw_decoder_load=0.9, dali_threads=8, prefetch=2)
CPU_DECODE_GPU_RESIZE = dict(decode_device="cpu", resize_device="gpu")  # the CIFAR configs' setting
# two DALI pipelines sharing the batches by what each delivers: all JPEGs on the hardware engines (4 threads), and
# all on the hybrid path (12 threads)
HW_LANES = dict(hw_decoder_load=(1.0, 0.0), dali_threads=(4, 12))
# the fallback if the hybrid lane slows beside the step: two engine pipelines (more images in flight on the engines)
HW_LANES3 = dict(hw_decoder_load=(1.0, 1.0, 0.0), dali_threads=(2, 2, 12))
# More batches in flight, for the step's data wait (fifteenth session, dataloading/NOTES.md): beside the step the
# decoders deliver ~15% less than they do alone (H100, 2026-12-05), the signature of CPU threads waiting on GPU work
# queued behind the step's kernels, which more work in flight can hide where more threads cannot.
# one hybrid pipeline, 4 batches prepared ahead instead of 2: build_loader's default on CUDA on 2026-12-06, as it fed
# the step best (H100, 2026-12-06: 2.6% GPU idle against the lanes' 5.4%)
HYBRID_DEEP = dict(hw_decoder_load=0.0, prefetch=4)
HYBRID_LANES = dict(hw_decoder_load=(0.0, 0.0), dali_threads=(8, 8))  # two hybrid pipelines, 8 threads each
HW_LANES_DEEP = dict(HW_LANES, prefetch=4)
# the lanes with the engines' pipeline switched off while it delivers few batches (beside a step), the hybrid one 4
# ahead (dataloading/dali_pipeline.py _Assist): the lanes alone and the deep hybrid pipeline, run by the consumer,
# when fed; build_loader's default on CUDA since 2026-12-06 04:50 UTC (H100, 06:23-06:27 UTC: 12,294 img/s alone,
# 2.34 / 2.53% GPU idle fed against the deep hybrid pipeline's 2.54%)
HW_AUTO = dict(hw_decoder_load="auto")


def _dali_what(backend) -> str:
    """Where this DALI loader decodes and resizes, for the rows' notes."""
    if len(backend.lanes_spec) > 1:
        lanes = " + ".join(f"load {load:g} with {t} threads, {d} ahead"
                           for (load, t), d in zip(backend.lanes_spec, backend.lane_prefetch))
        if getattr(backend, "assist", None) is not None:
            a = backend.assist
            lanes += (f"; 'auto': the load-{backend.lanes_spec[a.lane][0]:g} pipeline paused while it delivers under "
                      f"{a.min_share:.0%} of the last {a.window} batches, tried again after {a.probe_first}..."
                      f"{a.probe_max} batches")
        where = "on the 'mixed' device (nvJPEG)" if backend.decode_device == "gpu" else "in DALI's CPU threads"
        dec = (f"decode {where} in {len(backend.lanes_spec)} DALI pipelines sharing the batches by what each "
               f"delivers (hardware decoder {lanes}; at most {backend.reorder_limit} batches ahead)")
    elif backend.decode_device == "gpu":
        dec = (f"decode on the 'mixed' device (nvJPEG, hardware decoder load {backend.hw_decoder_load:g}, "
               f"{backend.num_threads} threads)")
    else:
        dec = f"decode in DALI's CPU threads (libjpeg-turbo, {backend.num_threads} threads)"
    return f"DALI: {dec}, resize on the {backend.resize_device.upper()}"


def _prepare(case: Case, backend: str, **loader_kw) -> Prepared:
    from .data import image_folder, label_store

    p = case.params
    if case.shape in QUICK_SHAPES and case.options.get("data") is None:
        root = _quick_data(case)
    else:
        root = image_folder(case.options.get("data"), p["min_images"])
    if p.get("labels", True):
        from tokenlabel.dataloading import LabelStore

        shape = {key: p[name] for key, name in (("num_classes", "C"), ("k", "k"), ("size", "S")) if name in p}
        store = label_store(root, case.options.get("labels"), **shape)
        meta = LabelStore.open(store)
        k, S = meta.k, meta.size
    else:
        store = k = S = None
    workers = _cores()
    device = case.device
    if backend == "dali" and device.type != "cuda" and not case.quick:
        raise Skip("the DALI pipeline benchmark needs CUDA (decoding on the 'mixed' device)")
    loader = make_loader(backend, root, store, p["B"], p["img"], device, workers if backend == "torch" else None,
                         **loader_kw)
    if len(loader) < 2:
        raise Skip(f"{root} holds fewer than 2 batches of B={p['B']} images")
    per_epoch = len(loader) * p["B"]
    epoch_counter = {"e": 0}

    def one_epoch():
        """Iterate one epoch; returns (images after the first batch, seconds from the first batch's
        arrival to the last one's): the steady-state rate, without the epoch's start-up latency."""
        loader.set_epoch(epoch_counter["e"])
        epoch_counter["e"] += 1
        n, t_first = 0, None
        for batch in loader:
            if device.type == "cuda":
                torch.cuda.synchronize(device)   # the batch is really there (DALI is asynchronous)
            if t_first is None:
                t_first = time.perf_counter()
            else:
                n += batch["images"].shape[0]
        return n, time.perf_counter() - t_first

    def check():
        loader.set_epoch(10_000)
        batch = next(iter(loader))
        _check_batch(batch, p["B"], p["img"], device, k, S)
        return {}

    def timer(fn, warmup, reps):
        fn()   # untimed: worker start-up, DALI pipeline build
        times = []
        for _ in range(p["epochs"]):
            n, seconds = fn()
            times.append(seconds * 1e3 * p["B"] / max(n, 1))    # ms per batch of B
        return times

    def timer(fn, warmup, reps, _timer=timer):
        before = lane_snapshot(loader.backend)
        out = _timer(fn, warmup, reps)
        lane_counts[:] = [a - b for a, b in zip(lane_snapshot(loader.backend), before)]
        return out

    lane_counts = []
    what = (_dali_what(loader.backend) + ", RRC, flip, RandAugment, normalise, erasing on the GPU"
            if backend == "dali" else
            f"PIL DataLoader, {workers} workers: decode, RRC, flip, RandAugment in PIL; normalise on {device}")
    return Prepared(modes={"epoch": one_epoch}, check=check, timer=timer, items=p["B"],
                    notes=f"{what}; {f'label maps k={k} S={S}' if k else 'no label maps'}; "
                          f"{per_epoch} images/epoch x {p['epochs']} epochs timed "
                          f"(steady state: from the first batch to the last); ms per batch of {p['B']}; data {root}",
                    extra_rows=lambda: lane_rows(loader.backend, lane_counts, "epoch"),
                    cleanup=lambda: getattr(loader, "close", lambda: None)())


def lane_snapshot(backend) -> list:
    """The counters lane_rows reads, before and after the timed part: the batches each lane delivered, then with
    hw_decoder_load="auto" the switch's deliveries, deliveries while on, and switches."""
    a = getattr(backend, "assist", None)
    return list(getattr(backend, "lane_batches", ())) + ([a.delivered, a.on_batches, a.switches] if a else [])


def lane_rows(backend, counts, mode) -> list:
    """With several DALI pipelines (lanes): the share of the timed batches each one delivered; with "auto", the
    share delivered while the engines' pipeline was on, and its switches (``counts``: lane_snapshot differences)."""
    spec = getattr(backend, "lanes_spec", ())
    lanes, auto = counts[:len(spec)], counts[len(spec):]
    if len(spec) < 2 or not sum(lanes):
        return []
    rows = [(mode, f"lane{i}_share", 100.0 * c / sum(lanes), None, None, "%",
             f"batches the pipeline with hw_decoder_load {spec[i][0]:g} ({spec[i][1]} threads) delivered: {c} of "
             f"{sum(lanes)} in the timed part (the rest of the epochs ran ahead, as training does)")
            for i, c in enumerate(lanes)]
    if auto and auto[0]:
        delivered, on, switches = auto
        last = ", ".join(f"{x:.2f}" for x in backend.assist.shares[-6:])
        rows += [(mode, "auto_on_share", 100.0 * on / delivered, None, None, "%",
                  f"'auto': batches delivered while the engines' pipeline was switched on, {on} of {delivered} in "
                  "the timed part"),
                 (mode, "auto_switches", float(switches), None, None, "count",
                  f"'auto': times the engines' pipeline was switched off or on in the timed part ({delivered} "
                  f"batches; the engines' share at its last checks: {last})")]
    return rows


@register("loader", "pil", baseline=True)
def pil(case: Case) -> Prepared:
    """PIL DataLoader (one worker per core) doing the full work, label maps included."""
    return _prepare(case, "torch")


@register("loader", "dali")
def dali(case: Case) -> Prepared:
    """One DALI pipeline on nvJPEG's hybrid decode (12 threads), augmentation batched on the GPU, label maps with
    the batch, 2 batches ahead (build_loader's CUDA default was this pipeline 4 ahead on 2026-12-06, and is "auto"
    since; the lanes were the default on 2026-12-05)."""
    return _prepare(case, "dali", **HYBRID)


@register("loader", "dali_hw")
def dali_hw(case: Case) -> Prepared:
    """The same DALI pipeline with 90% of the JPEGs on nvJPEG's hardware decoder and 8 threads: the fastest
    alone, not beside a training step."""
    return _prepare(case, "dali", **HW_DECODER)


@register("loader", "dali_lanes")
def dali_lanes(case: Case) -> Prepared:
    """Two DALI pipelines, one on nvJPEG's hardware engines and one on the hybrid path, sharing the batches by
    what each delivers (``hw_decoder_load=(1.0, 0.0)``): meant to be fast alone and to keep feeding beside a
    step. On the CPU (--quick only) the loads are unused: two CPU pipelines sharing the batches."""
    if case.device.type != "cuda" and not case.quick:
        raise Skip("the hardware JPEG decoder needs CUDA")
    return _prepare(case, "dali", **HW_LANES)


@register("loader", "dali_auto")
def dali_auto(case: Case) -> Prepared:
    """dali_lanes with ``hw_decoder_load="auto"``: the hybrid pipeline 4 ahead, the engines' pipeline switched off
    while it delivers under its share (beside a step) and tried again later; alone it should stay on."""
    if case.device.type != "cuda" and not case.quick:
        raise Skip("the hardware JPEG decoder needs CUDA")
    return _prepare(case, "dali", **HW_AUTO)


@register("loader", "dali_lanes3")
def dali_lanes3(case: Case) -> Prepared:
    """dali_lanes with two hardware-engine pipelines beside the hybrid one (``hw_decoder_load=(1.0, 1.0, 0.0)``)."""
    if case.device.type != "cuda" and not case.quick:
        raise Skip("the hardware JPEG decoder needs CUDA")
    return _prepare(case, "dali", **HW_LANES3)


@register("loader", "dali_hybrid_lanes")
def dali_hybrid_lanes(case: Case) -> Prepared:
    """Two DALI pipelines, both on nvJPEG's hybrid path with 8 threads each, sharing the batches by what each
    delivers (``hw_decoder_load=(0.0, 0.0)``): while one waits on its GPU work, the other's threads decode."""
    return _prepare(case, "dali", **HYBRID_LANES)


@register("loader", "dali_cpu_decode")
def dali_cpu_decode(case: Case) -> Prepared:
    """The same DALI pipeline decoding and resizing in DALI's CPU threads (``decode_device="cpu"``, one copy per
    batch to the GPU): the setting for small images, whose GPU decoding kernels would queue behind a step's."""
    return _prepare(case, "dali", decode_device="cpu")


@register("loader", "dali_cpu_decode_gpu_resize")
def dali_cpu_decode_gpu_resize(case: Case) -> Prepared:
    """DALI decoding in its CPU threads and resizing each batch on the GPU (``decode_device="cpu",
    resize_device="gpu"``: the small decoded crops go over in one copy per batch, then one batched resize): the
    CIFAR configs' setting."""
    if case.device.type != "cuda":
        raise Skip("resizes on the GPU: needs CUDA")
    return _prepare(case, "dali", **CPU_DECODE_GPU_RESIZE)


def yardsticks(device, quick: bool, context: dict) -> list[dict]:
    """The LV-ViT-S step's consumption rate: from this invocation's step bench, else the latest
    step rows in the results folder (``<out>/step.csv``) measured on the same GPU."""
    from . import results

    rows, source = context.get("rows", []), "this run's step bench"
    steps = _step_rates(rows)
    out_dir = context.get("out_dir")
    if not steps and out_dir is not None and (out_dir / "step.csv").is_file():
        gpu = results.environment()["gpu"]
        steps = [r for r in _step_rates(results.latest(results.read_rows(out_dir / "step.csv"))) if r["gpu"] == gpu]
        source = f"{out_dir / 'step.csv'}"
    if not steps:
        return []
    best = max(steps, key=lambda r: r["p50"])
    return [dict(provider="lvvit_s_step", mode="consumption", shape=best["shape"], dtype=best["dtype"],
                 metric="img/s", p50=best["p50"], p20=best["p20"], p80=best["p80"], unit="img/s",
                 notes=f"images/s the fastest LV-ViT-S step ({best['provider']}, {best['date']}) consumes; "
                       f"from {source}")]


def _step_rates(rows):
    return [r for r in rows if r["op"] == "step" and r["metric"] == "img/s" and r["p50"]
            and r["provider"].startswith(("eager_", "compile_")) and r["shape"] in ("S224",)]
