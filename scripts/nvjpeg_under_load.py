"""nvJPEG's batched JPEG decoder on the GPU, alone and beside the LV-ViT-S training step.

    python scripts/nvjpeg_under_load.py DATA --out FILE [--backends hw,gpu_hybrid,hybrid] [--threads 1,4]
        [--formats rgbi] [--priority high] [--batch 128] [--seconds 4] [--provider compile_graphs_auto] [--no-step]

DATA is a folder of JPEGs (searched recursively) or a .tar of them; their bytes sit in pinned host memory, so
no disk or Python read is timed. The script calls libnvjpeg directly (ctypes; the copy torchvision ships, or
the CUDA toolkit's) on a stream of its own, with nothing of DALI in between, so what it measures is the
decoder: for every backend (``hw``: the A100/Hopper hardware JPEG engines; ``gpu_hybrid``: Huffman decoding
on the GPU for batches over 100; ``hybrid``: Huffman in the calling CPU thread, IDCT on the GPU), thread count
(one decoder state, output buffer and stream per thread) and output format, it prints

* images/s alone (each thread decodes batches of ``--batch`` back to back, each batch synchronised), and the
  CUDA calls one batch makes (the first thread's, under torch.profiler);
* then, unless ``--no-step``, the same while the main thread runs a ``tokenlabel bench step`` provider
  (default: the CUDA-graph LV-ViT-S step, B 128, synthetic inputs) without pause: the step's ms and the
  decoders' images/s beside it.

Used on 2026-12-04 to find out why DALI's hardware decoder, 16k img/s alone, could not feed the training step
(dataloading/NOTES.md). Needs a CUDA GPU; the hardware backend needs an A100, H100/H200 or newer.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import glob
import io
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jpeg_decode_scaling import load  # noqa: E402  (the JPEG bytes of a folder or a .tar)

BACKENDS = {"hw": 3, "gpu_hybrid": 2, "hybrid": 1}  # nvjpegBackend_t
# nvjpegOutputFormat_t: rgbi interleaved RGB (one plane, 3 bytes a pixel: what a training batch wants); rgb
# planar RGB; yuv the decoded planes at their own (subsampled) sizes; unchanged the JPEG's components as coded
FORMATS = {"unchanged": 0, "yuv": 1, "rgb": 3, "rgbi": 5}
PRIORITIES = ("normal", "high")


def parse_list(text: str, valid, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in valid]
    if not items or bad:
        raise SystemExit(f"nvjpeg_under_load: unknown {what} {', '.join(bad) or repr(text)}; valid: "
                         f"{', '.join(valid)}")
    return items


def parse_counts(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise SystemExit(f"nvjpeg_under_load: --threads takes positive integers separated by commas, got {text!r}")
    return out


def plane_layout(fmt: str, ncomp: int, widths, heights) -> list[tuple[int, int]]:
    """(pitch in bytes, rows) of every output plane nvJPEG writes for one image: ``widths``/``heights`` are
    nvjpegGetImageInfo's per-component sizes (component 0 is the full image)."""
    w, h = int(widths[0]), int(heights[0])
    if fmt == "rgbi":
        return [(3 * w, h)]
    if fmt == "rgb":
        return [(w, h)] * 3
    if fmt == "yuv":  # grey images: only Y is written
        return [(w, h)] if ncomp == 1 else [(int(widths[c]), int(heights[c])) for c in range(3)]
    if fmt == "unchanged":
        return [(int(widths[c]), int(heights[c])) for c in range(ncomp)]
    raise ValueError(f"unknown output format {fmt!r}; valid: {', '.join(FORMATS)}")


def find_libnvjpeg() -> list[str]:
    """libnvjpeg files on this machine: under sys.path (torchvision.libs, nvidia/*/lib) and the CUDA toolkit."""
    roots = [p for p in sys.path if p and os.path.isdir(p)]
    roots += [p for p in ("/usr/local/cuda/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/local/lib") if os.path.isdir(p)]
    hits = []
    for r in roots:
        hits += glob.glob(os.path.join(r, "**", "libnvjpeg*.so*"), recursive=True)
    return sorted({h for h in hits if "/stubs/" not in h})


class _Image(ctypes.Structure):  # nvjpegImage_t
    _fields_ = [("channel", ctypes.c_void_p * 4), ("pitch", ctypes.c_size_t * 4)]


class Nvjpeg:
    """The few libnvjpeg entry points the batched decoder needs, typed."""

    def __init__(self, path: str):
        self.path = path
        lib = self.lib = ctypes.CDLL(path)
        vp, ci, P = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER
        sig = {
            "nvjpegCreateEx": [ci, vp, vp, ctypes.c_uint, P(vp)],
            "nvjpegJpegStateCreate": [vp, P(vp)],
            "nvjpegGetImageInfo": [vp, ctypes.c_char_p, ctypes.c_size_t, P(ci), P(ci), P(ci), P(ci)],
            "nvjpegDecodeBatchedInitialize": [vp, vp, ci, ci, ci],
            "nvjpegDecodeBatchedPreAllocate": [vp, vp, ci, ci, ci, ci, ci],
            "nvjpegDecodeBatched": [vp, vp, P(vp), P(ctypes.c_size_t), P(_Image), vp],
        }
        for name, args in sig.items():
            getattr(lib, name).argtypes = args
            getattr(lib, name).restype = ci

    def check(self, status: int, what: str):
        if status != 0:
            raise RuntimeError(f"{what} failed: nvjpegStatus_t {status} ({self.path})")

    def handle(self, backend: str):
        h = ctypes.c_void_p()
        self.check(self.lib.nvjpegCreateEx(BACKENDS[backend], None, None, 0, ctypes.byref(h)),
                   f"nvjpegCreateEx({backend})")
        return h

    def info(self, h, data: bytes):
        nc, ss = ctypes.c_int(), ctypes.c_int()
        ws, hs = (ctypes.c_int * 4)(), (ctypes.c_int * 4)()
        self.check(self.lib.nvjpegGetImageInfo(h, data, len(data), ctypes.byref(nc), ctypes.byref(ss), ws, hs),
                   "nvjpegGetImageInfo")
        return nc.value, list(ws), list(hs)


class Decoder:
    """One thread's decoder: state, output buffer and stream; decode() runs one batch and waits for it."""

    def __init__(self, nv: Nvjpeg, h, fmt: str, batch: int, host, offsets, infos, priority: int):
        import torch

        self.nv, self.h, self.fmt, self.batch = nv, h, fmt, batch
        self.host, self.offsets, self.infos = host, offsets, infos
        self.state = ctypes.c_void_p()
        nv.check(nv.lib.nvjpegJpegStateCreate(h, ctypes.byref(self.state)), "nvjpegJpegStateCreate")
        nv.check(nv.lib.nvjpegDecodeBatchedInitialize(h, self.state, batch, 1, FORMATS[fmt]),
                 "nvjpegDecodeBatchedInitialize")
        maxw = max(i[1][0] for i in infos)
        maxh = max(i[2][0] for i in infos)
        nv.lib.nvjpegDecodeBatchedPreAllocate(h, self.state, batch, maxw, maxh, 0, FORMATS[fmt])  # hw only; hint
        self.ptrs = (ctypes.c_void_p * batch)()
        self.lens = (ctypes.c_size_t * batch)()
        self.imgs = (_Image * batch)()
        sizes = sorted((sum(p * r for p, r in plane_layout(fmt, *i)) for i in infos), reverse=True)
        self.out = torch.empty(sum(sizes[:batch]), dtype=torch.uint8, device="cuda")
        self.stream = torch.cuda.Stream(priority=priority)

    def decode(self, idx) -> int:
        """Decode images ``idx`` (len == batch) into self.out, back to back; returns the bytes written."""
        off, base, hbase = 0, self.out.data_ptr(), self.host.data_ptr()
        for j, i in enumerate(idx):
            self.ptrs[j] = hbase + int(self.offsets[i])
            self.lens[j] = int(self.offsets[i + 1] - self.offsets[i])
            planes = plane_layout(self.fmt, *self.infos[i])
            for c in range(4):
                if c < len(planes):
                    self.imgs[j].channel[c] = base + off
                    self.imgs[j].pitch[c] = planes[c][0]
                    off += planes[c][0] * planes[c][1]
                else:
                    self.imgs[j].channel[c] = None
                    self.imgs[j].pitch[c] = 0
        self.nv.check(self.nv.lib.nvjpegDecodeBatched(self.h, self.state, self.ptrs, self.lens, self.imgs,
                                                      ctypes.c_void_p(self.stream.cuda_stream)),
                      "nvjpegDecodeBatched")
        self.stream.synchronize()
        return off


def run_threads(decoders, batches, seconds, during=None):
    """Every decoder decodes batches in its own thread; -> (images/s over the window, during()'s result)."""
    stop, done = threading.Event(), [0] * len(decoders)

    def work(k):
        n = 7 * k
        while not stop.is_set():
            decoders[k].decode(batches[n % len(batches)])
            n += 1
            done[k] += 1

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(len(decoders))]
    for t in threads:
        t.start()
    time.sleep(0.3)
    d0, t0 = sum(done), time.perf_counter()
    res = during() if during is not None else time.sleep(seconds)
    d1, el = sum(done), time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join()
    return (d1 - d0) * decoders[0].batch / el, res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="a folder of JPEGs or a .tar of them")
    ap.add_argument("--out", required=True, help="a text file for the results (also printed)")
    ap.add_argument("--backends", default="hw,gpu_hybrid,hybrid")
    ap.add_argument("--threads", default="1,4", help="decoder threads per configuration, e.g. 1,4")
    ap.add_argument("--formats", default="rgbi")
    ap.add_argument("--priority", default="high", choices=PRIORITIES, help="the decoders' stream priority")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each timed window")
    ap.add_argument("--provider", default="compile_graphs_auto", help="the `bench step` provider run beside")
    ap.add_argument("--no-step", action="store_true", help="only the decoders alone")
    a = ap.parse_args(argv)
    backends = parse_list(a.backends, BACKENDS, "backend")
    formats = parse_list(a.formats, FORMATS, "output format")
    threads = parse_counts(a.threads)
    if a.batch < 1 or a.seconds <= 0:
        ap.error("--batch must be >= 1 and --seconds > 0")
    if os.path.exists(a.out):
        ap.error(f"--out {a.out} already exists: give a new file (an earlier result is not overwritten)")

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("nvjpeg_under_load: needs a CUDA GPU (nvJPEG decodes on the GPU); none is available")
    libs = find_libnvjpeg()
    if not libs:
        raise SystemExit("nvjpeg_under_load: no libnvjpeg found under sys.path or /usr/local/cuda/lib64 "
                         "(torchvision's wheels and the CUDA toolkit ship one)")
    blobs = load(a.data)  # a bad path or no JPEGs: refused before --out is made
    with open(a.out, "x") as out:  # "x": never over an earlier result (checked above, refused here too)
        return measure(a, blobs, backends, formats, threads, libs[0], out)


def measure(a, blobs, backends, formats, threads, lib_path: str, out) -> int:
    """The measurements of main(), each result line printed and written to ``out``."""
    import numpy as np
    import torch

    def say(*parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    nv = Nvjpeg(lib_path)
    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {nv.path}; {len(blobs)} JPEGs, mean "
        f"{np.mean([len(b) for b in blobs]) / 1e3:.1f} KB; batch {a.batch}, decoder stream priority {a.priority}")
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    host = torch.empty(int(offsets[-1]), dtype=torch.uint8, pin_memory=True)
    host.numpy()[:] = np.frombuffer(b"".join(blobs), np.uint8)
    handles = {b: nv.handle(b) for b in backends}
    infos = [nv.info(handles[backends[0]], b) for b in blobs]
    rng = np.random.default_rng(0)
    order = rng.permutation(np.resize(np.arange(len(blobs)), 64 * a.batch))
    batches = [order[i * a.batch:(i + 1) * a.batch] for i in range(64)]
    prio = torch.cuda.Stream.priority_range()[1] if a.priority == "high" else 0

    from torch.profiler import ProfilerActivity, profile

    configs = {}
    for backend in backends:
        for fmt in formats:
            for t in threads:
                key = f"{backend} {fmt} x{t}"
                try:
                    decs = [Decoder(nv, handles[backend], fmt, a.batch, host, offsets, infos, prio) for _ in range(t)]
                    decs[0].decode(batches[0])
                except RuntimeError as e:
                    say(f"{key}: {e}")
                    continue
                configs[key] = decs
                rate, _ = run_threads(decs, batches, a.seconds)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    decs[0].decode(batches[1])
                calls = collections.Counter(e.name[:60] for e in prof.events())
                say(f"{key}: alone {rate:,.0f} img/s; one batch: "
                    + "; ".join(f"{n} x{c}" for n, c in calls.most_common(8)))
    if "rgbi" in formats and configs:  # the output against PIL, first configuration in rgbi
        from PIL import Image

        key = next(k for k in configs if " rgbi " in k)
        dec = configs[key][0]
        dec.decode(batches[2])
        flat, off, diffs = dec.out.cpu().numpy(), 0, []
        for i in batches[2][:32]:
            w, h = infos[i][1][0], infos[i][2][0]
            got = flat[off:off + 3 * w * h].reshape(h, w, 3).astype(np.int16)
            ref = np.asarray(Image.open(io.BytesIO(blobs[i])).convert("RGB"), np.int16)
            diffs.append(np.abs(got - ref).mean())
            off += 3 * w * h
        say(f"{key} against PIL, 32 images: mean abs difference {np.mean(diffs):.3f} grey levels, "
            f"{sum(d == 0 for d in diffs)} of 32 identical")
    if a.no_step or not configs:
        return 0

    from tokenlabel.bench import registry
    from tokenlabel.bench.registry import Case, Skip
    from tokenlabel.bench.step import SHAPES

    params, _ = SHAPES["S224"]
    case = Case(op="step", shape="S224", params=dict(params), dtype=torch.bfloat16, device=torch.device("cuda"))
    providers = {p.name: p for p in registry.providers("step")}
    if a.provider not in providers:
        raise SystemExit(f"nvjpeg_under_load: unknown provider {a.provider!r}; valid: {', '.join(providers)}")
    try:
        step = providers[a.provider].fn(case).modes["train_step"]
    except Skip as e:
        raise SystemExit(f"nvjpeg_under_load: {a.provider} cannot run here: {e}")
    for _ in range(15):  # compile, record the graphs
        step()
    torch.cuda.synchronize()
    B = params["B"]

    def steps():
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < a.seconds:
            step()
            n += 1
            if n % 4 == 0:  # at most 4 steps queued
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        return n, time.perf_counter() - t0

    n, el = steps()
    say(f"step {a.provider} alone: {1e3 * el / n:.2f} ms, {n * B / el:,.0f} img/s")
    for key, decs in configs.items():
        rate, (n, el) = run_threads(decs, batches, a.seconds, during=steps)
        say(f"{key} beside the step: decode {rate:,.0f} img/s; step {1e3 * el / n:.2f} ms ({n * B / el:,.0f} img/s)")
    n, el = steps()
    say(f"step {a.provider} alone again: {1e3 * el / n:.2f} ms, {n * B / el:,.0f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
