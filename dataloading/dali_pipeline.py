"""DALI pipeline (backend="dali"): JPEG files in, decoded + cropped + resized uint8 crops out.

Division of labour (why it is built this way):
* The Python sampler owns the order and the geometry (sampling.py), so exact epochs, sharding,
  resume and DALI/PIL parity hold by construction. A producer thread prepares the next batches:
  it looks at each file's header once (size, and whether the GPU decoder can take the file; cached
  per file, so only a file's first sighting reads it in Python), draws the RandomResizedCrop boxes
  for the batch in a few vectorised numpy lines, reads and warps the label maps, and queues the
  batch.
* ``fn.external_source`` (batch mode) hands DALI the file paths, the crop window (anchor, shape in
  pixels), the per-sample interpolation and the sample ids; ``fn.io.file.read`` reads the files in
  DALI's own threads (no GIL), ``fn.decoders.image_slice`` decodes only the crop window (device
  "mixed": nvJPEG / the hardware decoder; "cpu": libjpeg-turbo in DALI's threads, for tests and for small
  JPEGs such as CIFAR's, whose crops then go to the GPU for the resize: ``resize_device``), and
  ``fn.resize`` scales it to image_size with the drawn interpolation. The returned box is exactly
  this window, normalised by the header size (EXIF orientation is ignored on both sides).
* DALI hands the crops over in its own HWC layout (no transpose op); the rest runs in
  loader.finish_batch on the GPU: RandAugment, flip, normalise, random erasing in a few Triton
  launches (ra_kernel.py) reading the HWC bytes through strides, with all per-batch metadata packed
  by the producer into one pinned buffer (packing.py) and copied once.
* One producer stream runs across epoch boundaries: after epoch e it goes on with epoch e + 1 from
  batch 0, so a training loop that asks for the next epoch finds DALI's prefetch queue full instead
  of restarting the producer and refilling the queue. A request for anything else (another epoch,
  a resume at batch b, a repeat) stops the stream, drains what DALI holds and starts a new one
  there; every batch is a pure function of (epoch, sample), so the batches are the same either way (with
  lanes of different decoders, up to the decoders' rounding of the pixels: see Lanes below).
* Files the GPU decoder should not see (PNG/GIF/CMYK/truncated JPEGs with a .jpg name) are decoded
  by PIL in the producer once and handed over as lossless PNM files in a cache folder (removed with
  the backend); files nothing can decode are replaced by the next readable sample with one warning
  (sampling.warn_once).

* Lanes (``hw_decoder_load`` as a sequence, e.g. (1.0, 0.0)): one DALI pipeline per load, each run by its own
  pump thread. The producer's batches go, in order, to whichever pipeline asks for its next input (``_Dispatch``),
  at most ``reorder_limit`` batches ahead of the consumer; each pump copies its outputs out of DALI's buffers and
  deposits them by position, and the consumer takes them in order. A fast decoder takes more batches, a slow one
  fewer: the share follows what each delivers, alone or beside a training step, with no fixed split.
  Which lane decodes a batch depends on timing, and nvJPEG's hardware engines and its hybrid path round the
  pixels differently (chroma upsampling), so a repeat of an epoch is bit-equal in everything but the pixels;
  bit-equal pixels need one decoder (a single load, or the same load on every lane).
* ``hw_decoder_load="auto"``: the lanes (1.0, 0.0), the hybrid lane ``DEFAULT_GPU_PREFETCH`` batches ahead, and the
  hardware engines' lane switched on and off by what it delivers (``_Assist``). Alone the engines deliver more than
  half of the batches and double the rate (H100: 13,123 against 6,749 img/s); beside a training step they slow ~3x,
  deliver ~30% of the batches, and the step waits for their late batches (GPU idle 4.8-5.4% against 2.4-2.6% with
  the hybrid pipeline alone, H100 2026-12-06). So the engines' lane stays on while its share of the batches is at
  least ``min_share`` over a window, is paused otherwise (its pipeline finishes what it holds, and the consumer runs
  the hybrid pipeline itself, with no thread in between, as with one pipeline), and is tried again after a number
  of batches that doubles while the tries fail.

Sample ids travel through the pipeline with the images, and each output batch is checked against
the metadata queued for it, so label maps always belong to the images they arrive with.
"""
from __future__ import annotations

import collections
import contextlib
import gc
import io
import numbers
import os
import queue
import shutil
import tempfile
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

MAX_LANES = 4  # DALI pipelines one loader may run side by side (hw_decoder_load as a sequence)
# The defaults. Where nvJPEG decodes on CUDA: "auto" (the engines' lane beside the hybrid one, switched by its share
# of the batches; _Assist). Alone it is the lanes (1.0, 0.0), the fastest (H100 2026-12-06: 13,123 img/s against the
# hybrid pipeline's 6,749); beside a training step the engines' lane is paused and the consumer runs the hybrid
# one, 4 ahead (DEFAULT_GPU_PREFETCH), itself, as that pipeline alone: H100, imagenet334, B 128, beside the LV-ViT-S
# CUDA-graph step with our kernels, GPU idle 2.34 / 2.53% against 2.54% for the one hybrid pipeline in the same
# call (2026-12-06 06:23 UTC; with the lanes' pump thread in between it had been 2.8-3.5%; bench/results/step.csv,
# dataloading/NOTES.md). CPU decoding: one pipeline, 2 ahead; plain lanes: 2 ahead each (4 ahead left the step
# idle 6.7%, H100 2026-12-06).
DEFAULT_GPU_LOADS = "auto"
DEFAULT_GPU_PREFETCH = 4
# hw_decoder_load="auto" (see _Assist): the engines' lane is kept while it delivers at least AUTO_MIN_SHARE of the
# last AUTO_WINDOW batches (counted AUTO_SETTLE deliveries after it starts); paused, it is tried again
# after AUTO_PROBE[0] batches, doubling up to AUTO_PROBE[1] while the tries fail; meanwhile the consumer runs the
# hybrid pipeline itself (_run_direct). The engines' share measured on H100 / H200 boxes: 50-60% of the batches
# alone, 29-41% beside the LV-ViT-S step. A try beside the step costs ~0.4 points of GPU idle in a 600-step run
# (first try after 256 batches, H100 2026-12-06), so the first comes after 1,024 (dataloading/NOTES.md).
AUTO_SETTLE, AUTO_WINDOW, AUTO_MIN_SHARE, AUTO_PROBE = 4, 32, 0.40, (1024, 4096)

INSTALL_HINT = ("NVIDIA DALI is not installed: pip install 'tokenlabel[dali-cu13]' (CUDA 13) or "
                "'tokenlabel[dali-cu12]' (CUDA 12), i.e. nvidia-dali-cuda130 / nvidia-dali-cuda120; "
                "or use backend='torch' (--loader torch)")


def import_dali():
    try:
        import nvidia.dali as dali  # noqa: F401
        from nvidia.dali import fn, types, pipeline_def
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return fn, types, pipeline_def


def dali_available() -> bool:
    try:
        import_dali()
        return True
    except ImportError:
        return False


_FORKED = {}  # backend key -> SampleSource, inherited by the forked worker processes


def _worker_init():
    """In a forked worker process, first thing: move every object inherited from the parent to the
    permanent generation, so the child's collector never finalises the parent's objects (DALI pipelines,
    CUDA tensors: their destructors call CUDA, which a forked child cannot use)."""
    gc.freeze()


def _train_meta(key, epoch, ids, heights, widths):
    """In a worker process: a training batch's metadata and its packed host buffer (the label maps
    travel only inside the buffer)."""
    from .packing import pack_arrays

    src = _FORKED[key]
    meta = src.meta(epoch, ids, heights, widths)
    packed = pack_arrays(meta, height=src.image_size, width=src.image_size, train=True, augment=True)
    meta.pop("label_values", None)
    meta.pop("label_indices", None)
    return meta, packed


def _encode_path(path) -> np.ndarray:
    return np.frombuffer(os.fsencode(path), dtype=np.uint8)


def _dense_paths(paths) -> tuple[np.ndarray, np.ndarray]:
    """A batch of encoded paths as one zero-padded uint8 [B, L] array and their lengths [B, 1] (int32).

    DALI's external source converts a list input sample by sample in the thread that runs the pipeline, the
    training loop's (cProfile of a CIFAR student epoch on the H100 box: 1.5 s over 195 batches of 256, the
    largest item of its host time); dense arrays go over in one piece, and fn.slice cuts each path back to
    its length."""
    lens = np.fromiter((len(p) for p in paths), np.int32, len(paths))
    out = np.zeros((len(paths), max(1, int(lens.max(initial=1)))), np.uint8)
    for i, p in enumerate(paths):
        out[i, :len(p)] = p
    return out, lens.reshape(-1, 1)


def _pnm_bytes(img) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format="PPM")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


class _DecodeFailure(Exception):
    def __init__(self, cause, in_flight):
        super().__init__(str(cause))
        self.cause, self.in_flight = cause, in_flight


class _Feeder:
    """The external-source callable: pops prepared batches; StopIteration ends DALI's epoch."""

    def __init__(self):
        self.queue = None
        self.pending = collections.deque()  # the metadata of the batches DALI holds, oldest first

    def _next(self):
        """The next (dali_inputs, meta), or None at the end of the stream."""
        if self.queue is None:
            return None
        item = self.queue.get()
        if isinstance(item, BaseException):
            self.queue = None
            raise item
        return item

    def __call__(self):
        item = self._next()
        if item is None:
            self.queue = None
            raise StopIteration
        dali_inputs, meta = item
        self.pending.append(meta)
        return dali_inputs


def _copy_to_torch(images, device, stream):
    """DALI's HWC uint8 batch -> (a torch tensor that owns its copy, the DALI tensor it is copied from). On
    ``device``, copied asynchronously on ``stream``: the caller keeps the DALI tensor alive until the copy is done.
    On the CPU when device is None."""
    t = images.as_tensor()
    if device is None:
        return torch.from_numpy(np.array(t)), t
    from nvidia.dali.plugin.pytorch import feed_ndarray

    with torch.cuda.stream(stream):
        out = torch.empty(t.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(t, out, cuda_stream=stream)
    return out, t


class DaliBackend:
    """Yields (uint8 images [B,3,S,S] on the device, numpy metadata) per batch."""
    applies_augment = False

    def __init__(self, source, sampler, device, num_threads=None, io_workers=None, prefetch=None, worker_processes=None,
                 hw_decoder_load=None, decode_device=None, resize_device=None):
        fn, types, pipeline_def = import_dali()
        self.fn, self.types, self.pipeline_def = fn, types, pipeline_def
        self.source, self.sampler = source, sampler
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        cpus = os.cpu_count() or 2
        # The JPEG decoder. One pipeline on nvJPEG's hybrid path (Huffman on the CPU in DALI's threads, IDCT and
        # colour on the GPU) kept an LV-ViT-S step fed on the H100 box (GPU idle 1.8-3.0% over 5 runs) but delivers
        # only ~6k img/s alone. The hardware decoder is the fastest alone (14-18k img/s at load 0.9, 8 threads)
        # but beside the step sustained ~4,000 img/s: the step sat idle 11-13% (dataloading/NOTES.md
        # "2026-11-25"; libnvjpeg called directly fell from 17.7k to 1.3-2.7k img/s beside the step, fourth
        # session). A sequence of loads builds one DALI pipeline per entry ("lanes", e.g. (1.0, 0.0): the engines
        # and the hybrid path side by side); the batches go, in order, to whichever pipeline asks for its next
        # one, so each decoder takes the share it can deliver (fifth session); the default where nvJPEG decodes
        # from 2026-12-05 to 2026-12-06, when one hybrid pipeline 4 batches ahead fed the step better; "auto"
        # pauses the engines' lane where it holds the step back (DEFAULT_GPU_LOADS).
        if hw_decoder_load is None:  # "auto" where nvJPEG decodes on CUDA, else one pipeline
            hw_decoder_load = DEFAULT_GPU_LOADS if self.gpu and decode_device in (None, "gpu") else 0.0
        # "auto": the engines' lane beside the hybrid one, used while it pulls its weight (_Assist)
        self.auto = isinstance(hw_decoder_load, str) and hw_decoder_load == "auto"
        loads = ((1.0, 0.0) if self.auto else tuple(hw_decoder_load) if isinstance(hw_decoder_load, (list, tuple))
                 else (hw_decoder_load,))
        if not 1 <= len(loads) <= MAX_LANES:
            raise ValueError(f"hw_decoder_load: give one load or 2..{MAX_LANES} (one DALI pipeline each), "
                             f"got {len(loads)}")
        for load in loads:
            if not isinstance(load, numbers.Real) or isinstance(load, bool) or not 0.0 <= float(load) <= 1.0:
                raise ValueError(f"hw_decoder_load must be a number in [0, 1], a sequence of them, or 'auto', "
                                 f"got {hw_decoder_load!r}")
        loads = tuple(float(x) for x in loads)
        # Where DALI decodes and resizes: "gpu" (device "mixed": nvJPEG, the default on CUDA) or "cpu"
        # (libjpeg-turbo and the resize in DALI's CPU threads; on CUDA only the finished crops are copied to
        # the GPU, one transfer per batch). "cpu" keeps every DALI kernel off the GPU, so none of the loader's
        # kernels queue behind the training step's; it suits small images only (CIFAR's 32 px JPEGs). On the
        # CIFAR student (H100, 2026-11-25) it made no clear difference: GPU idle 3.3 / 2.7% against 2.7 / 4.2%
        # with nvJPEG in one call, because that step is bound by the host, not by the decoder.
        if decode_device not in (None, "gpu", "cpu"):
            raise ValueError(f"decode_device must be 'gpu' or 'cpu', got {decode_device!r}")
        if decode_device == "gpu" and not self.gpu:
            raise ValueError(f"decode_device='gpu' needs a CUDA device (the loader's device is {self.device})")
        # asked for CPU decoding and a hardware-decoder share at once: contradictory (without CUDA the
        # share is accepted and unused, so the CPU tests build the same graph)
        if decode_device == "cpu" and max(loads) > 0.0:
            raise ValueError(f"hw_decoder_load={hw_decoder_load} is the GPU decoder's knob; decode_device='cpu' "
                             "decodes on the CPU (leave hw_decoder_load at 0)")
        self.decode_device = decode_device or ("gpu" if self.gpu else "cpu")
        # Where DALI resizes the decoded crop: where it was decoded by default. resize_device="gpu" with CPU
        # decoding copies the small decoded crops to the GPU (one transfer per batch) and resizes them there in
        # one batched launch: the CPU threads do only the decode, and the GPU sees a couple of launches per
        # batch instead of nvJPEG's per-image kernels and event waits. For CIFAR's 32 px JPEGs beside the
        # student's step (H200, 2026-12-04): nvJPEG decoding delivered 50k img/s alone but only the step's
        # ~20k beside it (12 threads each waiting on one event per image behind the step's kernels); CPU
        # decoding with the resize on the CPU ran at 25k img/s alone (the 128 px resize is the CPU's cost).
        if resize_device not in (None, "gpu", "cpu"):
            raise ValueError(f"resize_device must be 'gpu' or 'cpu', got {resize_device!r}")
        if resize_device == "gpu" and not self.gpu:
            raise ValueError(f"resize_device='gpu' needs a CUDA device (the loader's device is {self.device})")
        if resize_device == "cpu" and self.decode_device == "gpu":
            raise ValueError("resize_device='cpu' needs decode_device='cpu' (images decoded on the GPU are resized "
                             "there)")
        self.resize_device = resize_device or ("gpu" if self.decode_device == "gpu" else "cpu")
        default_threads = min(12, cpus) if self.gpu else min(4, cpus)
        if isinstance(num_threads, (list, tuple)):
            if len(num_threads) != len(loads):
                raise ValueError(f"dali_threads {tuple(num_threads)} must give one count per hw_decoder_load entry "
                                 f"{loads}")
            threads = tuple(num_threads)
        elif num_threads is None and len(loads) > 1:  # the hardware engines need few threads, the hybrid path many
            threads = tuple(min(4, cpus) if load > 0.5 else default_threads for load in loads)
        else:
            threads = (num_threads or default_threads,) * len(loads)
        for t in threads:
            if not isinstance(t, numbers.Integral) or isinstance(t, bool) or t < 1:
                raise ValueError(f"dali_threads must be a positive int (or one per pipeline), got {num_threads!r}")
        self.lanes_spec = tuple(zip(loads, (int(t) for t in threads)))
        self.num_threads = threads[0] if len(threads) == 1 else threads
        self.io_workers = io_workers or min(16, max(2, cpus))
        # batches DALI prepares ahead: deeper for one pipeline on the GPU (DEFAULT_GPU_PREFETCH), and for the hybrid
        # lane of "auto" (which feeds a training step alone while the engines' lane is paused)
        auto_depths = prefetch is None and self.auto and self.gpu
        if prefetch is None:
            prefetch = DEFAULT_GPU_PREFETCH if self.decode_device == "gpu" and len(loads) == 1 else 2
        if not isinstance(prefetch, numbers.Integral) or isinstance(prefetch, bool) or prefetch < 1:
            raise ValueError(f"prefetch must be an integer >= 1 (batches DALI prepares ahead), got {prefetch!r}")
        self.prefetch = int(prefetch)
        self.lane_prefetch = (2, DEFAULT_GPU_PREFETCH) if auto_depths else (self.prefetch,) * len(loads)
        # knobs of the DALI graph (read when the pipeline is built): the share of JPEGs the hardware
        # decoder takes (above), and whether fn.io.file.read maps files instead of reading them
        # (plain reads measured faster on the H100 box, 2026-11-24).
        self.hw_decoder_load = "auto" if self.auto else loads[0] if len(loads) == 1 else loads
        # "auto": the engines' lane's switch (its state carries over from stream to stream); its knobs can be set
        # before the first stream (tests)
        self.assist = _Assist(lane=0) if self.auto else None
        # lanes: batches handed out ahead of the consumer at most (decoding or finished, waiting their turn);
        # bounds the GPU memory (~19 MB per 128 x 224^2 batch) and lets a slow lane's batches arrive in time
        self.reorder_limit = 8 * len(loads) if len(loads) > 1 else None
        self.lane_batches = [0] * len(loads)  # batches each pipeline delivered (lanes), since construction
        self.io_mmap = False
        n = len(source.dataset)
        self._size = np.full((n, 2), -1, np.int64)  # header (H, W) cache
        self._kind = np.zeros(n, np.int8)           # 0 unknown, 1 jpeg for the GPU decoder, 2 PIL fallback, 3 unreadable
        self._fallback = {}                         # index -> PNM file of a PIL-decoded fallback image
        self._paths = [None] * n                    # encoded paths for fn.io.file.read, made on first use
        self._fallback_tmp = self._fallback_cleanup = None
        self._lock = threading.Lock()  # guards the lazily made worker processes and PNM cache folder
        self._pool = ThreadPoolExecutor(self.io_workers)
        self._batch_pool = ThreadPoolExecutor(2)
        # Worker processes (forked) probe first sightings (header size, GPU-decodable?) and compute each
        # training batch's metadata (geometry, RandAugment draws, label-map reads and warps, packing):
        # in the training process that Python work queues on the GIL with the training loop (H100 box:
        # epoch 0 at ~1,800 img/s with threaded probes; the producer at ~18 ms per batch beside the
        # step). 0 = all in the producer's threads (the CPU default: tests, no GPU to feed).
        if worker_processes is not None and (not isinstance(worker_processes, int) or worker_processes < 0):
            raise ValueError(f"worker_processes must be an int >= 0 (0: no worker processes), got {worker_processes!r}")
        self.worker_processes = ((max(1, min(8, cpus // 2)) if self.gpu else 0) if worker_processes is None
                                 else worker_processes)
        self._procs = self._procs_cleanup = None
        self.pipe = None
        self._lanes = None      # the lanes' pipelines (_Lane), when hw_decoder_load is a sequence
        self._clean = False
        self._stream = None     # the running producer stream (_Stream) or None
        self._generation = 0    # bumps on every new stream: an older iteration must not read from it
        self._copy_stream = self._held = None  # _held: the last copy out of DALI's buffers (_copy_async)

    # -------------------------------------------------------------------------------- pipeline
    def _build(self, lane=0, feeder=None):
        """The DALI pipeline of lane ``lane`` (its hw_decoder_load and thread count), fed by ``feeder``
        (default: a new _Feeder, kept as self.feeder: the one-pipeline path)."""
        fn, types = self.fn, self.types
        S, train = self.source.image_size, self.source.train
        hw_load, num_threads = self.lanes_spec[lane]
        dec = "mixed" if self.decode_device == "gpu" else "cpu"
        to_gpu = self.gpu and dec == "cpu"  # CPU decoding feeding a GPU: DALI copies the batch over
        early = to_gpu and self.resize_device == "gpu"  # ... the decoded crops, before the resize
        if feeder is None:
            feeder = self.feeder = _Feeder()

        # DALI 2.4 has no stream priority of its own (`default_cuda_stream_priority` is deprecated there
        # and ignored, with a warning); only the copy out of DALI's buffers runs on a high-priority stream

        @self.pipeline_def(batch_size=self.sampler.batch_size, num_threads=num_threads,
                           device_id=self.device.index if self.gpu else None,
                           prefetch_queue_depth=self.lane_prefetch[lane], exec_dynamic=True)
        def pipe():
            if train:
                padded, lens, anchor, shape, interp, ids = fn.external_source(source=feeder, num_outputs=6, batch=True)
                paths = fn.slice(padded, np.array([0], np.int32), lens, axes=[0], normalized_anchor=False,
                                 normalized_shape=False)
                data = fn.io.file.read(paths, dont_use_mmap=not self.io_mmap)
                images = fn.decoders.image_slice(data, anchor, shape, device=dec, output_type=types.RGB,
                                                 normalized_anchor=False, normalized_shape=False,
                                                 adjust_orientation=False, hw_decoder_load=hw_load)
                if early:
                    images = images.gpu()
                images = fn.resize(images, size=[S, S], interp_type=fn.cast(interp, dtype=types.INTERP_TYPE),
                                   antialias=True)
            else:
                # the resize size and the crop anchor come from sampling.eval_geometry (the PIL path's
                # integers exactly)
                padded, lens, size, anchor, ids = fn.external_source(source=feeder, num_outputs=5, batch=True)
                paths = fn.slice(padded, np.array([0], np.int32), lens, axes=[0], normalized_anchor=False,
                                 normalized_shape=False)
                data = fn.io.file.read(paths, dont_use_mmap=not self.io_mmap)
                images = fn.decoders.image(data, device=dec, output_type=types.RGB, adjust_orientation=False,
                                           hw_decoder_load=hw_load)
                if early:
                    images = images.gpu()
                images = fn.resize(images, size=size, interp_type=types.INTERP_CUBIC, antialias=True)
                images = fn.slice(images, anchor, np.array([S, S], np.float32), normalized_anchor=False,
                                  normalized_shape=False)
            if to_gpu and not early:
                images = images.gpu()
            return images, ids  # HWC: finish_batch's kernel reads it through strides

        p = pipe()
        p.build()
        return p

    # -------------------------------------------------------------------------------- producer
    def _read(self, idx):
        """-> (idx actually used, encoded path for DALI's reader, (H, W)); replaces unreadable files.

        Only a file's first sighting reads it here (header size and whether the GPU decoder can
        take it, cached per file); afterwards DALI's ``fn.io.file.read`` reads it in its own C++
        threads, so the bytes never pass through Python (Python file reads in threads queue on the
        GIL: 3-4k img/s on the H100 box against 11-15k for DALI with the bytes in memory). A file
        for the PIL fallback is decoded once and kept as a lossless PNM file in a cache folder,
        whose path DALI reads instead."""
        src, n = self.source, len(self.source.dataset)
        from .sampling import pil_open_rgb, probe_bytes, warn_once

        j = int(idx)
        for _ in range(n):
            kind = self._kind[j]
            if kind == 1:
                return j, self._encoded(j), tuple(self._size[j])
            if kind == 2 and j in self._fallback:
                return j, _encode_path(self._fallback[j]), tuple(self._size[j])
            if kind != 3:
                path = src.dataset.path(j)
                try:
                    data = np.fromfile(path, dtype=np.uint8)
                    if kind == 0:
                        h, w, k = probe_bytes(data.tobytes())
                        self._size[j] = (h, w)
                        self._kind[j] = kind = 1 if k == "jpeg" else 2
                    if kind == 1:
                        return j, self._encoded(j), tuple(self._size[j])
                    img = pil_open_rgb(data.tobytes())
                    out = os.path.join(self._fallback_dir(), f"{j}.ppm")
                    tmp = f"{out}.{threading.get_ident()}"
                    _pnm_bytes(img).tofile(tmp)
                    os.replace(tmp, out)  # whole file or none: another batch may be reading this one
                    self._size[j] = (img.height, img.width)
                    self._fallback[j] = out
                    return j, _encode_path(out), (img.height, img.width)
                except Exception as e:  # noqa: BLE001 - any failure to read/decode means "skip this file"
                    self._kind[j] = 3
                    warn_once(path, f"{type(e).__name__}: {e}")
            j = (j + 1) % n
        raise RuntimeError("no readable image in the dataset")

    def _encoded(self, j):
        e = self._paths[j]
        if e is None:
            e = self._paths[j] = _encode_path(self.source.dataset.path(j))
        return e

    def _fallback_dir(self):
        with self._lock:
            if self._fallback_tmp is None:
                self._fallback_tmp = tempfile.mkdtemp(prefix="tokenlabel-dali-fallback-")
                self._fallback_cleanup = weakref.finalize(self, shutil.rmtree, self._fallback_tmp, True)
            return self._fallback_tmp

    def _read_chunk(self, idx):
        return [self._read(i) for i in idx]

    def _probe(self, idx):
        """Header probes of the never-seen files among ``idx`` in the process pool; fills the size /
        kind caches. A file a worker could not probe stays unknown: _read tries it again and warns."""
        todo = idx[self._kind[idx] == 0]
        if not len(todo) or not self.worker_processes:
            return
        from .sampling import probe_paths

        pool = self._process_pool()
        chunks = [c for c in np.array_split(todo, min(len(todo), 2 * self.worker_processes)) if len(c)]
        futures = [pool.submit(probe_paths, [self.source.dataset.path(j) for j in c.tolist()]) for c in chunks]
        for c, f in zip(chunks, futures):
            for j, r in zip(c.tolist(), f.result()):
                if r is not None and self._kind[j] == 0:
                    self._size[j] = r[:2]
                    self._kind[j] = 1 if r[2] == "jpeg" else 2

    def _process_pool(self):
        with self._lock:
            if self._procs is None:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                # fork: the workers run only file reads, PIL header parsing and numpy (no CUDA, no DALI),
                # and fork does not re-run the user's __main__ as spawn/forkserver would. The source
                # (dataset, label store, RNG spec) reaches them through the fork, not through pickling.
                key = id(self)
                _FORKED[key] = self.source
                # Garbage that still holds CUDA (e.g. a dropped loader's DALI pipeline in a reference
                # cycle) must not be finalised in a child: CUDA does not work after fork, DALI's
                # destructor throws and the child aborts, breaking the pool (seen on the H100 box when a
                # second loader forked its workers). So collect it here, where CUDA works, and have the
                # children freeze everything they inherit (_worker_init).
                gc.collect()
                pool = ProcessPoolExecutor(self.worker_processes, mp_context=multiprocessing.get_context("fork"),
                                           initializer=_worker_init)
                try:
                    with warnings.catch_warnings():  # "multi-threaded process, fork() may deadlock": see above
                        warnings.simplefilter("ignore", DeprecationWarning)
                        for f in [pool.submit(int, 0) for _ in range(self.worker_processes)]:
                            f.result()
                finally:
                    _FORKED.pop(key, None)  # the children have their copy
                self._procs = pool
                self._procs_key = key
                self._procs_cleanup = weakref.finalize(self, pool.shutdown, wait=False, cancel_futures=True)
            return self._procs

    def _prepare(self, epoch, b, idx):
        idx = np.asarray(idx, np.int64)
        self._probe(idx)
        if (self._kind[idx] == 1).all():  # the steady state: every file seen before, no I/O here
            ids, data, hw = idx, [self._encoded(j) for j in idx.tolist()], self._size[idx]
        else:
            chunks = np.array_split(idx, max(1, min(len(idx), self.io_workers)))
            got = [g for part in self._pool.map(self._read_chunk, chunks) for g in part]
            ids = np.array([g[0] for g in got], np.int64)
            data = [g[1] for g in got]
            hw = np.array([g[2] for g in got], np.int64).reshape(-1, 2)
        src = self.source
        S = src.image_size
        packed = None
        if src.train:
            if self.worker_processes:
                fut = self._process_pool().submit(_train_meta, self._procs_key, epoch, ids, hw[:, 0], hw[:, 1])
                meta, packed = fut.result()
            else:
                meta = src.meta(epoch, ids, hw[:, 0], hw[:, 1])
            crop = np.asarray(meta["crop"])
            anchor = np.ascontiguousarray(crop[:, [1, 0]], np.float32)  # (x, y) per sample: a [B, 2] batch
            shape = np.ascontiguousarray(crop[:, [3, 2]], np.float32)   # (w, h)
            interp = np.where(meta["interp"] == 1, int(self.types.INTERP_CUBIC),
                              int(self.types.INTERP_LINEAR)).astype(np.int32)
            dali_inputs = (*_dense_paths(data), anchor, shape, interp, ids)
        else:
            from .sampling import eval_geometry

            g = eval_geometry(hw[:, 0], hw[:, 1], src.image_size, src.crop_pct)
            g = np.asarray(g, np.float32).reshape(-1, 4)
            size = np.ascontiguousarray(g[:, [0, 1]])    # (H, W) of the resize: a [B, 2] batch
            anchor = np.ascontiguousarray(g[:, [3, 2]])  # (x, y) of the crop
            meta = dict(sample_ids=ids, classes=src.dataset.targets[ids])
            dali_inputs = (*_dense_paths(data), size, anchor, ids)
        meta["position"] = (epoch, b)
        # the one host->device buffer of the batch, ready before the training thread needs it
        from .packing import host_batch, pack_arrays

        if packed is None:
            packed = pack_arrays(meta, height=S, width=S, train=src.train, augment=True)
        with torch.cuda.device(self.device) if self.gpu else contextlib.nullcontext():  # pinned on CUDA
            meta["packed"] = host_batch(*packed, height=S, width=S, train=src.train, augment=True, pin=self.gpu)
        return dali_inputs, meta

    # -------------------------------------------------------------------------------- iteration
    def batches(self, epoch, start_batch):
        """Batches start_batch.. of ``epoch``. If DALI fails on a batch (a file the header check let
        through but the decoder rejects), the pipeline is rebuilt, the images of the batches in
        flight go to the PIL fallback decoder, and the epoch continues from that batch: the same
        samples and geometry, so the epoch never dies on one bad image."""
        b, retried_at = start_batch, None
        while True:
            try:
                for out in self._run(epoch, b):
                    yield out
                    b += 1
                return
            except _DecodeFailure as e:
                if retried_at == b:
                    raise RuntimeError(f"DALI failed again on batch {b} after moving its images to the PIL "
                                       f"decoder: {e.cause}") from e.cause
                retried_at = b
                for meta in e.in_flight:
                    for j in meta["sample_ids"]:
                        if self._kind[j] == 1:
                            self._kind[j] = 2
                warnings.warn(f"DALI could not decode batch {b} of epoch {epoch} ({type(e.cause).__name__}: "
                              f"{str(e.cause).splitlines()[0] if str(e.cause) else ''}); decoding the images of "
                              "the batches in flight with PIL and continuing", RuntimeWarning, stacklevel=2)

    def _run(self, epoch, start_batch):
        nb = self.sampler.num_batches
        if start_batch >= nb:
            return
        st = self._stream
        if st is None or st.next != (epoch, start_batch):
            self._end_stream(drain=True)
            st = self._start_stream(epoch, start_batch)
        gen = self._generation
        for b in range(start_batch, nb):
            if self._generation != gen:
                raise RuntimeError("another iteration of this loader started while this one was paused; "
                                   "iterate one epoch at a time")
            if st.dispatch is not None:  # lanes: the pipelines run in their own threads
                try:
                    images, meta = st.dispatch.wait((epoch, b))
                except BaseException:
                    self._end_stream(drain=True)
                    raise
                st.next = (epoch, b + 1) if b + 1 < nb else (epoch + 1, 0)
                if self.gpu:  # made on a lane's copy stream (finished); used on the consumer's from now on
                    images.record_stream(torch.cuda.current_stream(self.device))
                yield images.permute(0, 3, 1, 2), meta
                continue
            self._wait_copy()
            try:
                images, ids = self.pipe.run()
            except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError subclasses
                in_flight = list(self.feeder.pending)
                self._end_stream(drain=False)
                raise _DecodeFailure(e, in_flight) from e
            meta = self.feeder.pending.popleft()
            got = np.asarray(ids.as_tensor()).reshape(-1)
            if meta["position"] != (epoch, b) or not np.array_equal(got, meta["sample_ids"]):
                self._end_stream(drain=False)
                raise RuntimeError(f"DALI output out of step with its metadata: batch {meta['position']} for "
                                   f"{(epoch, b)}, ids {got[:4]}... vs {meta['sample_ids'][:4]}...")
            st.next = (epoch, b + 1) if b + 1 < nb else (epoch + 1, 0)
            yield self._to_torch(images), meta

    def _start_stream(self, epoch, start_batch):
        lanes = len(self.lanes_spec) > 1
        if lanes and (not isinstance(self.reorder_limit, numbers.Integral) or isinstance(self.reorder_limit, bool)
                      or self.reorder_limit < 1):
            raise ValueError(f"reorder_limit must be an int >= 1 (batches out between the producer and the "
                             f"consumer), got {self.reorder_limit!r}")
        if lanes:
            q = queue.Queue(maxsize=sum(self.lane_prefetch) + 2)
            stop = threading.Event()
            dispatch = _Dispatch(q, stop, self.reorder_limit, len(self.lanes_spec), self.lane_batches, self.assist)
            if self._lanes is None:
                self._lanes = [_Lane(i) for i in range(len(self.lanes_spec))]
            for lane in self._lanes:
                lane.feeder.dispatch = dispatch
                lane.feeder.pending.clear()
                if lane.pipe is None or not lane.clean:
                    lane.pipe = lane.held = None
                    lane.pipe = self._build(lane.index, lane.feeder)
                lane.clean = lane.dead = False
            dispatch.lanes, dispatch.device = self._lanes, (self.device if self.gpu else None)
        else:
            if self.pipe is None or not self._clean:
                self.pipe = None
                self.pipe = self._build()
            self._clean = False
            q = queue.Queue(maxsize=self.prefetch + 2)
            stop = threading.Event()
            self.feeder.queue = q
            self.feeder.pending.clear()
            dispatch = None
        th = threading.Thread(target=_produce, args=(weakref.ref(self), self.sampler, self._batch_pool, q, epoch,
                                                     start_batch, stop), daemon=True)
        th.start()
        pumps = []
        if lanes:
            for lane in self._lanes:
                pumps.append(threading.Thread(target=_pump, args=(lane, dispatch, self.device if self.gpu else None),
                                              daemon=True, name=f"tokenlabel-dali-lane{lane.index}"))
                pumps[-1].start()
        self._generation += 1
        self._stream = _Stream(q, stop, th, (epoch, start_batch), dispatch, pumps)
        return self._stream

    def _end_stream(self, drain):
        """Stop the producer. drain=True: run DALI's queued iterations out (discarding them) so the
        pipeline is clean for the next stream; otherwise, or if that fails, drop the pipeline (the
        next stream builds a new one)."""
        st, self._stream = self._stream, None
        if st is None:
            return
        st.stop.set()
        if st.dispatch is not None:
            # lanes: each feeder's next call ends its pipeline's "epoch"; the pump threads run what DALI still
            # holds out (discarded), reset their pipelines (kept for the next stream) and end. A pipeline that
            # failed is dropped and rebuilt then.
            st.dispatch.wake()
            while st.thread.is_alive() or any(p.is_alive() for p in st.pumps):
                try:
                    st.queue.get_nowait()
                except queue.Empty:
                    for p in st.pumps:
                        p.join(0.01)
                    st.thread.join(0.01)
            for lane in self._lanes:
                lane.feeder.pending.clear()
                if not (drain and lane.clean):
                    lane.pipe, lane.clean = None, False
            return
        self.feeder.queue = None  # the feeder's next call ends DALI's "epoch"; a stray call never blocks
        while st.thread.is_alive():  # unblock the producer
            try:
                st.queue.get_nowait()
            except queue.Empty:
                st.thread.join(0.01)
        self._clean = False
        if drain and self.pipe is not None:
            try:
                self._wait_copy()
                for _ in range(self.prefetch + 4):
                    self.pipe.run()
            except StopIteration:
                self.pipe.reset()
                self._clean = True
            except Exception:  # noqa: BLE001 - a failed drain just means a rebuild
                pass
        if not self._clean:
            self.pipe = None
        self.feeder.pending.clear()

    def close(self):
        """Stop the producer stream and release the pipeline."""
        if self._stream is not None:
            self._end_stream(drain=False)
        self._wait_copy()
        self.pipe = None
        self._lanes = None
        with self._lock:  # the probe workers and the PNM cache go too (a later epoch remakes them)
            if self._procs is not None:
                # wait for the pool's processes and its queue-feeder thread: left running, an interpreter that
                # exits right after close() races that thread ("Exception in thread QueueFeederThread ... Bad
                # file descriptor" at the exit of a GPU test run, 2026-12-04). The finalizer (a loader dropped
                # without close()) still does not wait.
                self._procs_cleanup.detach()
                self._procs.shutdown(wait=True, cancel_futures=True)
                self._procs = self._procs_cleanup = None
            if self._fallback_cleanup is not None:
                self._fallback_cleanup()
            self._fallback_tmp = self._fallback_cleanup = None
            self._fallback.clear()

    def __del__(self):
        st = getattr(self, "_stream", None)
        if st is not None:
            st.stop.set()
            if st.dispatch is not None:
                st.dispatch.wake()

    def _wait_copy(self):
        # DALI may reuse an output buffer once run() is called again: the copy out of it must be done
        if self._held is not None:
            self._held[0].synchronize()
            self._held = None

    def _to_torch(self, images):
        """DALI's HWC batch -> a uint8 [B, 3, H, W] view (channels-last memory) that owns its copy."""
        if not self.gpu:
            return _copy_to_torch(images, None, None)[0].permute(0, 3, 1, 2)
        # copy on a side stream that depends only on DALI's work (not on the training step queued on
        # the current stream), so _wait_copy never waits for training kernels
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device, priority=-1)  # above the default 0
        out, self._held = _copy_async(images, self.device, self._copy_stream)
        out.record_stream(torch.cuda.current_stream(self.device))
        return out.permute(0, 3, 1, 2)


class _Stream:
    """A running producer: its queue, stop flag, thread, and the (epoch, batch) it will deliver next; with
    lanes, their dispatch and pump threads."""

    def __init__(self, queue_, stop, thread, next_, dispatch=None, pumps=()):
        self.queue, self.stop, self.thread, self.next = queue_, stop, thread, next_
        self.dispatch, self.pumps = dispatch, list(pumps)


class _Lane:
    """One of several DALI pipelines of a loader (hw_decoder_load as a sequence): its pipeline, feeder, and
    the stream its output is copied out on."""

    def __init__(self, index):
        self.index = index
        self.feeder = _LaneFeeder(index)
        self.pipe = None
        self.clean = False   # drained and reset at the end of the last stream: reusable
        self.copy_stream = None
        # "auto": while the engines' lane is paused, the consumer runs this lane's pipeline itself (_run_direct),
        # as the one-pipeline path does; whoever calls run() holds run_lock. held: the consumer's last copy out of
        # DALI's buffers (_copy_async), waited for before the pipeline's next run(). dead:
        # the pipeline failed in the consumer's hands (its pump leaves it to be rebuilt)
        self.run_lock = threading.Lock()
        self.held = None
        self.dead = False


class _LaneFeeder(_Feeder):
    """A lane's external-source callable: takes the producer's next batch from the dispatch (whichever lane
    asks first gets it); StopIteration ends this pipeline's "epoch" when the stream stops, or while the lane is
    paused ("auto": the dispatch stays attached, and the pump restarts the pipeline when the lane is wanted)."""

    def __init__(self, index=0):
        super().__init__()
        self.index = index
        self.dispatch = None

    def _next(self):
        d = self.dispatch
        item = None if d is None else d.take(self.pending, self.index)
        if item is _PAUSED:
            return None
        if item is None:
            self.dispatch = None
        return item


_PAUSED = object()  # _Dispatch.take's answer to a paused lane


class _Assist:
    """hw_decoder_load="auto": whether the hardware engines' lane (index ``lane``) takes batches.

    On, it is kept while it delivers at least ``min_share`` of the last ``window`` deliveries, checked every
    ``window // 4`` deliveries once ``window`` were counted (counting starts ``settle`` deliveries after it was
    switched on: its pipeline starts empty). Off, it takes nothing (its pipeline runs out what it holds; the
    consumer runs the other lane's pipeline itself, _Dispatch.direct), and after ``probe`` deliveries it is tried
    again; each try that fails doubles ``probe`` up to ``probe_max``, a try that holds resets it. Called under the
    dispatch's lock, from the lanes' pump threads and from the consumer when it runs a pipeline; the state carries
    over from one stream to the next."""

    def __init__(self, lane, settle=None, window=None, min_share=None, probe=None):
        self.lane = lane
        self.settle = AUTO_SETTLE if settle is None else settle
        self.window = AUTO_WINDOW if window is None else window
        self.min_share = AUTO_MIN_SHARE if min_share is None else min_share
        self.probe_first, self.probe_max = AUTO_PROBE if probe is None else probe
        self.probe = self.probe_first
        self.on, self.trying = True, False
        self.recent = collections.deque()  # whether each of the last ``window`` counted deliveries was the lane's
        self.seen = self.unchecked = self.off_for = 0
        self.delivered = self.on_batches = self.switches = 0  # totals, for the benchmark's rows
        self.shares = []  # the engines' share at each check (the last 64)

    def record(self, lane):
        """One batch delivered by ``lane`` (the dispatch then wakes the lanes: a paused one may be on again)."""
        self.delivered += 1
        if not self.on:
            self.off_for += 1
            if self.off_for < self.probe:
                return
            self.on, self.trying, self.switches = True, True, self.switches + 1
            self.seen = self.unchecked = 0
            self.recent.clear()
            return
        self.on_batches += 1
        self.seen += 1
        if self.seen <= self.settle:
            return
        self.recent.append(lane == self.lane)
        while len(self.recent) > self.window:
            self.recent.popleft()
        self.unchecked += 1
        if len(self.recent) < self.window or self.unchecked < max(1, self.window // 4):
            return
        self.unchecked = 0
        share = sum(self.recent) / len(self.recent)
        self.shares = (self.shares + [share])[-64:]
        if share >= self.min_share:
            self.trying, self.probe = False, self.probe_first
            return
        self.probe = min(2 * self.probe, self.probe_max) if self.trying else self.probe_first
        self.on, self.trying, self.off_for, self.switches = False, False, 0, self.switches + 1

    def stats(self) -> dict:
        return dict(delivered=self.delivered, on_batches=self.on_batches, switches=self.switches, on=self.on,
                    shares=list(self.shares))


class _Dispatch:
    """Shared state of a stream over several pipelines (lanes). The producer's batches, in order, go to
    whichever lane asks for its next input, at most ``limit`` batches ahead of the consumer; the lanes' pump
    threads deposit the finished batches by (epoch, batch) and the consumer takes them in order. A lane's
    decoding failure is kept for the positions it had in flight and raised when the consumer reaches one;
    a producer error is raised after the batches before it, a lane's metadata mismatch at once. "auto" with the
    engines' lane paused: the consumer runs the other lane's pipeline itself (``direct``, _run_direct), its pump
    thread parked, because a thread between the pipeline and the consumer left the step idle longer (H100: 2.8-3.5%
    against 2.5% for one pipeline, dataloading/NOTES.md)."""

    def __init__(self, q, stop, limit, lanes, counts, assist=None):
        self.q, self.stop, self.limit = q, stop, limit
        self.assist = assist  # "auto": the engines' lane's switch (_Assist), or None
        self.cond = threading.Condition()
        self.issued = self.consumed = 0
        self.done = {}     # (epoch, b) -> (uint8 HWC images, meta)
        self.failed = {}   # (epoch, b) -> _DecodeFailure for the batches a failed lane had in flight
        self.error = None  # raised to the consumer as is
        self.alive = lanes
        self.counts = counts
        self.want = None   # the position the consumer waits for
        self.qlock = threading.Lock()
        self.taken = 0     # batches the lanes took from the producer's queue
        self.error_at = 0  # ... when ``error`` came: the consumer raises it after that many batches
        self.lanes = None  # the _Lane objects, where the consumer may run a lane itself ("auto"; see direct)
        self.device = None  # ... and the device its copies go to (None: the CPU)

    def ended(self):
        return self.stop.is_set() or self.error is not None

    def wake(self):
        with self.cond:
            self.cond.notify_all()

    def paused(self, lane):
        return self.assist is not None and lane == self.assist.lane and not self.assist.on

    def direct(self, lane):
        """Whether the consumer runs lane ``lane``'s pipeline itself: "auto" with the engines' lane paused (then the
        one other lane delivers alone, and a thread between it and the consumer only adds a hand-over)."""
        return self.assist is not None and self.lanes is not None and lane != self.assist.lane and not self.assist.on

    def pump_turn(self, lane):
        """A lane's pump waits here while the consumer runs its pipeline; False once that pipeline failed there
        (it is left to be rebuilt)."""
        with self.cond:
            while not self.ended() and self.direct(lane.index) and not lane.dead:
                self.cond.wait(0.5)
            return not lane.dead

    def take(self, pending, lane=0):
        """The next prepared batch for lane ``lane`` whose batches in flight are ``pending``, or None once the
        stream stops (or the producer failed), or _PAUSED while the lane is switched off ("auto").

        A lane at the limit still takes one when it holds the batch the consumer waits for: DALI's run()
        schedules the next iteration (asking for its input) before it returns the oldest output, so a lane
        refused here would hold that batch back forever. A paused lane's pipeline gets StopIteration instead,
        which also makes DALI hand out what it holds."""
        with self.cond:
            while not self.ended() and not self.paused(lane) and self.issued - self.consumed >= self.limit and \
                    not any(m["position"] == self.want for m in pending):
                self.cond.wait(0.1)
            if self.ended():
                return None
            if self.paused(lane):
                return _PAUSED
            self.issued += 1
        while not self.ended():  # after an error no lane gets more: each runs out what it holds, in order
            with self.qlock:  # the count of batches taken stays in queue order
                try:
                    item = self.q.get(timeout=0.1)
                except queue.Empty:
                    continue
                if not isinstance(item, BaseException):
                    self.taken += 1
                    return item
            with self.cond:  # the producer failed: the consumer gets its exception after the batches before it
                self.error, self.error_at = item, self.taken
                self.cond.notify_all()
            return None
        return None

    def put(self, lane, position, images, meta):
        with self.cond:
            self.done[position] = (images, meta)
            self.counts[lane] += 1
            if self.assist is not None:
                self.assist.record(lane)
            self.cond.notify_all()

    def resume(self, lane):
        """A paused lane's pump waits here (its pipeline run out and reset) until the lane is switched on again
        (True) or the stream ends (False)."""
        with self.cond:
            while not self.ended() and self.paused(lane):
                self.cond.wait(0.5)
            return not self.ended()

    def fail(self, cause, in_flight=None):
        """in_flight: the metas of the failed lane's batches (a decoding failure); None: raise ``cause``."""
        with self.cond:
            if in_flight is None:  # raised at once
                if self.error is None:
                    self.error, self.error_at = cause, 0
            else:
                failure = _DecodeFailure(cause, in_flight)
                for meta in in_flight:
                    self.failed[meta["position"]] = failure
            self.cond.notify_all()

    def lane_ended(self):
        with self.cond:
            self.alive -= 1
            self.cond.notify_all()

    def _ready(self, position):
        """Under the lock: the finished batch at ``position`` if a lane deposited it (then its slot is freed), the
        error to raise for it, else None."""
        got = self.done.pop(position, None)
        if got is not None:
            self.consumed += 1
            self.cond.notify_all()
            return got
        if self.error is not None and self.consumed >= self.error_at:
            raise self.error
        if position in self.failed:
            raise self.failed[position]
        if self.alive == 0 or self.stop.is_set():
            raise RuntimeError(f"the loader's DALI pipelines stopped before batch {position} (epoch, batch) arrived")
        return None

    def wait(self, position):
        """The finished batch at ``position`` (blocks); frees its slot for the lanes. While a lane is run by the
        consumer (``direct``), runs it here when it holds that batch (or holds nothing yet)."""
        with self.cond:
            self.want = position
            self.cond.notify_all()
        while True:
            with self.cond:
                while True:
                    got = self._ready(position)
                    if got is not None:
                        return got
                    lane = next((x for x in self.lanes or () if self.direct(x.index)), None)
                    if lane is not None:
                        break
                    self.cond.wait(0.5)
            # the lane's pump may still be in a run() begun before the switch (it deposits what it gets): take the
            # pipeline when it lets go, without blocking the lanes' deposits meanwhile
            if not lane.run_lock.acquire(timeout=0.005):
                continue
            try:
                with self.cond:
                    got = self._ready(position)
                    if got is not None:
                        return got
                    if not self.direct(lane.index):
                        continue
                pending = lane.feeder.pending
                if not pending or pending[0]["position"] == position:
                    got = _run_direct(lane, self, position)
                    if got is not None:
                        return got
                    continue  # it failed or ended: the next check raises why
            finally:
                lane.run_lock.release()
            with self.cond:  # another lane holds it (the engines' pipeline running out what it held)
                if position not in self.done:
                    self.cond.wait(0.05)


def _pump(lane, dispatch, device):
    """A lane's thread: runs its pipeline as fast as the dispatch hands it batches, copies each output out of
    DALI's buffers (before the next run() may reuse them) and deposits it. After the stream stops it runs the
    pipeline's queued iterations out and resets it, so the next stream can reuse it."""
    pipe, feeder = lane.pipe, lane.feeder
    try:
        with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
            while True:
                if not dispatch.pump_turn(lane):  # the consumer runs it ("auto"); failed in its hands: dropped
                    _release_held(lane)
                    return
                with lane.run_lock:
                    if dispatch.direct(lane.index) and not dispatch.ended():
                        continue  # switched while this thread waited for the pipeline
                    _release_held(lane)
                    try:
                        images, ids = pipe.run()
                    except StopIteration:
                        pipe.reset()
                        if feeder.dispatch is not None and dispatch.resume(lane.index):  # was paused ("auto")
                            continue
                        lane.clean = True
                        return
                    except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError subclasses
                        dispatch.fail(e, list(feeder.pending))
                        return
                    meta = feeder.pending.popleft()
                    if dispatch.stop.is_set():
                        continue  # draining
                    got = np.asarray(ids.as_tensor()).reshape(-1)
                    if not np.array_equal(got, meta["sample_ids"]):
                        dispatch.fail(RuntimeError(_out_of_step(lane, meta, got)))
                        return
                    dispatch.put(lane.index, meta["position"], _copy_out(lane, images, device), meta)
    except BaseException as e:  # noqa: BLE001 - whatever ends the thread reaches the consumer
        dispatch.fail(e)
    finally:
        dispatch.lane_ended()


def _out_of_step(lane, meta, got):
    return (f"DALI output out of step with its metadata in lane {lane.index}: batch {meta['position']}, ids "
            f"{got[:4]}... vs {meta['sample_ids'][:4]}...")


def _copy_async(images, device, stream):
    """DALI's batch copied out on ``stream`` without a host wait: (the copy, held), the consumer's current stream
    made to wait for the copy. held = (the copy's event, what it reads): keep it until the event is done, which must
    be before the pipeline's next run() (DALI may reuse its output buffers then)."""
    out, t = _copy_to_torch(images, device, stream)
    done = torch.cuda.Event()
    done.record(stream)
    torch.cuda.current_stream(device).wait_event(done)
    return out, (done, images, t)


def _release_held(lane):
    """The consumer's last copy out of the lane's DALI buffers is done (before the pipeline's next run())."""
    if lane.held is not None:
        lane.held[0].synchronize()
        lane.held = None


def _run_direct(lane, dispatch, position):
    """The consumer's turn of a lane's pipeline ("auto" with the engines' lane paused; the caller holds
    ``lane.run_lock`` and the lane's oldest batch in flight is ``position``, or it holds none yet): one run(), the
    batch copied out on the lane's copy stream without waiting (the consumer's stream waits for the copy, the
    pipeline's next run() waits for it on the host), as the one-pipeline path does."""
    feeder, device = lane.feeder, dispatch.device
    _release_held(lane)
    try:
        images, ids = lane.pipe.run()
    except StopIteration:  # the stream ended or the producer failed: the wait loop raises why
        lane.pipe.reset()
        return None
    except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError subclasses
        lane.dead = True
        dispatch.fail(e, list(feeder.pending))
        return None
    meta = feeder.pending.popleft()
    got = np.asarray(ids.as_tensor()).reshape(-1)
    if meta["position"] != position or not np.array_equal(got, meta["sample_ids"]):
        lane.dead = True
        dispatch.fail(RuntimeError(_out_of_step(lane, meta, got)))
        return None
    if device is None:
        out = _copy_to_torch(images, None, None)[0]
    else:
        if lane.copy_stream is None:
            lane.copy_stream = torch.cuda.Stream(device, priority=-1)
        out, lane.held = _copy_async(images, device, lane.copy_stream)
    with dispatch.cond:
        dispatch.consumed += 1
        dispatch.counts[lane.index] += 1
        dispatch.assist.record(lane.index)
        dispatch.cond.notify_all()
    return out, meta


def _copy_out(lane, images, device):
    """The lane's output copied out of DALI's buffers, finished when this returns (the next run() may reuse them)."""
    if device is None:
        return _copy_to_torch(images, None, None)[0]
    if lane.copy_stream is None:
        lane.copy_stream = torch.cuda.Stream(device, priority=-1)
    out, t = _copy_to_torch(images, device, lane.copy_stream)
    lane.copy_stream.synchronize()  # before ``t`` goes
    return out


def _produce(backend_ref, sampler, pool, q, epoch, start_batch, stop):
    """Producer thread: prepares batches in sampler order, epoch after epoch, from (epoch,
    start_batch) on, two at a time in ``pool`` (reads, label warps and numpy release the GIL in
    parts). It holds the backend only weakly between batches, so a dropped loader is collected and
    its producer ends; the bounded queue keeps it at most a few batches ahead."""
    def put(item):
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                if backend_ref() is None:
                    return False
        return False

    window = collections.deque()
    try:
        e, b0 = epoch, start_batch
        while True:
            for b, idx in enumerate(sampler.batches(e, b0), start=b0):
                if stop.is_set():
                    return
                backend = backend_ref()
                if backend is None:
                    return
                window.append(pool.submit(backend._prepare, e, b, idx))
                del backend
                if len(window) > 2 and not put(window.popleft().result()):
                    return
            e, b0 = e + 1, 0
    except BaseException as ex:  # surfaced to the consumer through DALI's feeder
        put(ex)
