"""Timers and the machine's own yardsticks (copy bandwidth, bf16 matmul peak).

On CUDA each call is timed with its own pair of CUDA events, after a write of 256 MiB that flushes
the L2 cache (as ``triton.testing.do_bench`` does), so a kernel never reads its inputs from a warm
cache; the quantiles are taken over the calls. Before each timed call the GPU is also given a short
spin (``torch.cuda._sleep``), so the host enqueues the whole call while the GPU is still busy: the
events then measure the GPU's own time for the call, as in a training step where the host runs ahead,
not the Python launch overhead of small ops. On the CPU (``--quick``) it is wall clock.
"""
from __future__ import annotations

import gc
import time

import numpy as np
import torch

QUANTILES = (50, 20, 80)
_L2_FLUSH_BYTES = 256 << 20
_HOST_AHEAD_CYCLES = 2_000_000  # ~1 ms of GPU spin at H100 clocks: time for the host to enqueue a call


def quantiles(values) -> tuple[float, float, float]:
    """(p50, p20, p80) of ``values``."""
    q = np.percentile(np.asarray(values, dtype=np.float64), QUANTILES)
    return float(q[0]), float(q[1]), float(q[2])


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, warmup: int = 5, reps: int = 20, flush_l2: bool = True,
               host_ahead: bool = True) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed calls.

    ``host_ahead``: spin the GPU before each call so the events time the GPU work, not the host's
    launch latency (see the module docstring)."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_l2 else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize(device)
    for i in range(reps):
        if flush is not None:
            flush.zero_()
        if host_ahead:
            torch.cuda._sleep(_HOST_AHEAD_CYCLES)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


class StepGaps:
    """How long the GPU's stream sat idle between consecutive training steps.

    ``begin()`` before a step's work is enqueued and ``end()`` after it record CUDA events on the current
    stream; nothing synchronises until ``result()``. The gap from one step's end event to the next one's
    begin event is time in which that stream had nothing of the step to run: it waited for the input
    pipeline (the host still blocked in ``next(loader)``, or the batch's own copy or kernels queued in
    between), not for the previous step. This is the data wait as the GPU sees it; a host-side timer
    around ``next()`` also counts the GPU time of an asynchronous step, so it overstates it. On the CPU
    (no events) the two are the same: the wall time between a step's end and the next step's start."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self._spans = []
        self._open = None

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def begin(self) -> None:
        if self._open is not None:
            raise RuntimeError("StepGaps.begin() called twice without end()")
        self._open = self._mark()

    def end(self) -> None:
        if self._open is None:
            raise RuntimeError("StepGaps.end() called without begin()")
        self._spans.append((self._open, self._mark()))
        self._open = None

    def __len__(self) -> int:
        return len(self._spans)

    def result(self) -> tuple[float, float]:
        """(idle ms between steps, ms from the first step's start to the last step's end); waits for
        the last step. (0, 0) before any step."""
        if not self._spans:
            return 0.0, 0.0
        if self.cuda:
            self._spans[-1][1].synchronize()
            gap = (lambda a, b: a.elapsed_time(b))
        else:
            gap = (lambda a, b: (b - a) * 1e3)
        idle = sum(max(0.0, gap(self._spans[i][1], self._spans[i + 1][0])) for i in range(len(self._spans) - 1))
        return idle, gap(self._spans[0][0], self._spans[-1][1])

    def reset(self) -> None:
        self._spans.clear()
        self._open = None


def peak_extra_bytes(fn, device, exclude: int = 0) -> int | None:
    """Peak memory one call of ``fn`` allocates beyond what was allocated before it, less ``exclude``
    (the bytes of its own outputs, e.g. gradients). None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return peak - before - exclude


def copy_bandwidth(device, nbytes: int = 1 << 30, reps: int = 20) -> tuple[float, float, float]:
    """GB/s (p50, p20, p80) of a device-to-device copy of ``nbytes``, counting read + write."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_calls(lambda: dst.copy_(src), device, warmup=3, reps=reps, flush_l2=False)
    p50, p20, p80 = quantiles(ms)
    moved = 2 * src.numel() * 4
    del src, dst
    # the slower time gives the lower rate: p20 of the rate is the rate at p80 of the time
    return moved / p50 / 1e6, moved / p80 / 1e6, moved / p20 / 1e6


_PEAK_CACHE: dict = {}


def matmul_peak_tflops(device, n: int = 8192, reps: int = 20) -> tuple[float, float, float]:
    """Measured dense bf16 TFLOP/s (p50, p20, p80) of an n x n x n matmul, measured once per process."""
    key = (str(device), n)
    if key not in _PEAK_CACHE:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = time_calls(lambda: a @ b, device, warmup=5, reps=reps, flush_l2=False)
        flops = 2.0 * n ** 3
        p50, p20, p80 = quantiles(ms)
        _PEAK_CACHE[key] = (flops / p50 / 1e9, flops / p80 / 1e9, flops / p20 / 1e9)
    return _PEAK_CACHE[key]


# Datasheet dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched on the device name.
DATASHEET_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def datasheet_bf16_tflops(gpu_name: str) -> float | None:
    for key, value in DATASHEET_BF16_TFLOPS.items():
        if key in gpu_name:
            return value
    return None
