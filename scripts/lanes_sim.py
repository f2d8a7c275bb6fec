"""Replay the DALI loader's lanes (several pipelines sharing the batches) with stand-in pipelines of given speed.

The loader's own dispatch code runs here unchanged (``dataloading.dali_pipeline``: ``_Dispatch``, ``_pump``,
``_LaneFeeder``); only the DALI pipelines are replaced by stand-ins that keep DALI's ordering rules: ``run()``
first schedules the next iteration (asking the feeder for its input), then returns the oldest output; after a
reset the first ``run()`` schedules ``prefetch`` iterations; a pipeline works through its iterations one at a
time, each taking its service time (drawn per batch, uniform within +-jitter). A consumer takes the batches in
order and spends ``step_ms`` on each, like a training step whose GPU work the host only queues.

It answers what the dispatch itself costs, with no GPU, no DALI and no CPU contention: given each lane's
per-batch time beside the step (measured on the GPU), how much of the time does the consumer wait, which share
does each lane take, and how deep must the reorder window (``reorder_limit``) be so that a slow lane's batches
arrive in time. What it can not say: how much the lanes slow each other and the step on a real GPU box (CPU
threads, copy engines, the hardware decoder's own slowdown); those are the GPU measurement's.

    python scripts/lanes_sim.py                      # the default scenarios (dataloading/NOTES.md)
    python scripts/lanes_sim.py --step-ms 22 --lane 25 --lane 60,0.3 --limit 16 --steps 300
"""
from __future__ import annotations

import argparse
import queue
import random
import sys
import threading
import time

import numpy as np


class StandInPipeline:
    """Serves iterations one at a time in a worker thread; the DALI ``run()`` / ``reset()`` ordering."""

    def __init__(self, feeder, service_ms, jitter, prefetch, seed):
        self.feeder, self.service, self.jitter, self.prefetch = feeder, service_ms / 1e3, jitter, prefetch
        self.rng = random.Random(seed)
        self.todo, self.out = queue.Queue(), queue.Queue()
        self.started = False
        self.ended = False       # the feeder raised StopIteration: no more iterations
        self.scheduled = 0       # iterations scheduled and not yet returned
        self.worker = threading.Thread(target=self._serve, daemon=True)
        self.worker.start()

    def _serve(self):
        while True:
            item = self.todo.get()
            if item is None:
                return
            time.sleep(self.service * (1 + self.jitter * (2 * self.rng.random() - 1)))
            self.out.put(item)

    def _schedule(self):
        if self.ended:
            return
        try:
            inputs = self.feeder()
        except StopIteration:
            self.ended = True
            return
        self.scheduled += 1
        self.todo.put(inputs)

    def run(self):
        if not self.started:
            self.started = True
            for _ in range(self.prefetch):
                self._schedule()
        else:
            self._schedule()
        if self.scheduled == 0:
            raise StopIteration
        inputs = self.out.get()
        self.scheduled -= 1
        ids = inputs[-1]
        return _Batch(np.zeros((1, 1, 1, 3), np.uint8)), _Batch(ids)

    def reset(self):
        self.started = self.ended = False

    def close(self):
        self.todo.put(None)


class _Batch:
    def __init__(self, array):
        self.array = array

    def as_tensor(self):
        return self.array


def simulate(step_ms, lanes, limit, prefetch=2, steps=200, warmup=20, seed=0, auto=False):
    """lanes: [(service_ms, jitter)]. -> dict(wait share, per-step ms, each lane's share, the deepest window seen,
    every batch exactly once and in order)."""
    from tokenlabel.dataloading.dali_pipeline import _Assist, _Dispatch, _Lane, _pump

    total = warmup + steps
    q = queue.Queue(maxsize=prefetch * len(lanes) + 2)
    stop = threading.Event()
    counts = [0] * len(lanes)
    # --auto: the first lane is the engines' one, switched by hw_decoder_load="auto"'s _Assist (its defaults)
    assist = _Assist(lane=0) if auto else None
    dispatch = _Dispatch(q, stop, limit, len(lanes), counts, assist)

    def produce():  # the loader's producer: prepared batches in order (instant here)
        for b in range(total + limit + 4 * len(lanes) * prefetch):
            meta = {"position": (0, b), "sample_ids": np.array([b], np.int64)}
            while not stop.is_set():
                try:
                    q.put(((meta["sample_ids"],), meta), timeout=0.05)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return

    prod = threading.Thread(target=produce, daemon=True)
    prod.start()
    pipes, pumps, lane_objs = [], [], []
    if auto:  # the consumer runs the hybrid lane itself while the engines' lane is paused, as the loader does
        dispatch.lanes = lane_objs
    for i, (service_ms, jitter) in enumerate(lanes):
        lane = _Lane(i)
        lane_objs.append(lane)
        lane.feeder.dispatch = dispatch
        depth = (2 if i == 0 else 4) if auto else prefetch  # "auto" on the GPU: the engines 2 ahead, the hybrid 4
        lane.pipe = StandInPipeline(lane.feeder, service_ms, jitter, depth, seed * 100 + i)
        pipes.append(lane.pipe)
        pumps.append(threading.Thread(target=_pump, args=(lane, dispatch, None), daemon=True))
        pumps[-1].start()
    deepest, order, waited = 0, [], 0.0
    before = None
    t_start = on_before = None
    for b in range(total):
        if b == warmup:
            before, t_start, waited = list(counts), time.perf_counter(), 0.0
            on_before = (assist.on_batches, assist.delivered, assist.switches) if auto else None
        t0 = time.perf_counter()
        images, meta = dispatch.wait((0, b))
        waited += time.perf_counter() - t0
        order.append(int(meta["sample_ids"][0]))
        with dispatch.cond:
            deepest = max(deepest, dispatch.issued - dispatch.consumed)
        time.sleep(step_ms / 1e3)
    span = time.perf_counter() - t_start
    stop.set()
    dispatch.wake()
    for t in pumps:
        t.join(5)
    for p in pipes:
        p.close()
    took = [a - b for a, b in zip(counts, before)]
    on = None
    if auto:
        d = [a - b for a, b in zip((assist.on_batches, assist.delivered, assist.switches), on_before)]
        on = (100.0 * d[0] / max(d[1], 1), d[2])
    return dict(wait=100.0 * waited / span, ms_per_step=1e3 * span / steps, on=on,
                shares=[100.0 * c / max(sum(took), 1) for c in took], deepest=deepest,
                in_order=order == list(range(total)))


DEFAULT_SCENARIOS = [
    # (label, step ms, lanes [(ms per batch, jitter)], limits); the per-batch times are the GPU measurements'
    # (dataloading/NOTES.md): hybrid nvJPEG with 12 threads beside the step ~25 ms per batch of 128 (5.1k img/s);
    # the hardware engines beside the step 47-95 ms (2.7k with 4 threads, 1.35k with 1), alone 7.5 ms.
    ("fed: hybrid alone", 22.0, [(25.0, 0.3)], [8]),
    ("fed: engines 95 ms + hybrid", 22.0, [(95.0, 0.3), (25.0, 0.3)], [4, 8, 16, 32]),
    ("fed: engines 47 ms + hybrid", 22.0, [(47.0, 0.3), (25.0, 0.3)], [4, 8, 16, 32]),
    ("alone: engines 7.5 ms + hybrid", 0.5, [(7.5, 0.3), (25.0, 0.3)], [4, 8, 16, 32]),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--step-ms", type=float, help="the consumer's time per batch (omit: the default scenarios)")
    ap.add_argument("--lane", action="append", default=[],
                    help="a lane's ms per batch[,jitter] (repeat per lane; jitter 0.3 = +-30%%)")
    ap.add_argument("--limit", type=int, action="append", help="reorder limit(s) to try (default 16)")
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--auto", action="store_true", help="switch the first lane (the engines) as hw_decoder_load="
                    "'auto' does; the engines 2 ahead, the others 4 (--prefetch ignored)")
    args = ap.parse_args(argv)
    if args.step_ms is None:
        scenarios = DEFAULT_SCENARIOS
    else:
        if not args.lane:
            ap.error("--step-ms needs at least one --lane")
        lanes = []
        for text in args.lane:
            parts = text.split(",")
            try:
                lanes.append((float(parts[0]), float(parts[1]) if len(parts) > 1 else 0.0))
            except (ValueError, IndexError):
                ap.error(f"--lane expects MS[,JITTER], got {text!r}")
        scenarios = [("custom", args.step_ms, lanes, args.limit or [16])]
    print(f"{'scenario':34s} {'limit':>5s} {'wait %':>7s} {'ms/step':>8s} {'deepest':>7s}  lane shares %")
    for label, step_ms, lanes, limits in scenarios:
        for limit in limits:
            r = simulate(step_ms, lanes, limit, prefetch=args.prefetch, steps=args.steps, auto=args.auto)
            if not r["in_order"]:
                print(f"{label}: batches out of order or missing", file=sys.stderr)
                return 1
            shares = " / ".join(f"{s:.0f}" for s in r["shares"])
            auto = (f"  (auto: engines on for {r['on'][0]:.0f}% of the batches, {r['on'][1]} switches)"
                    if r["on"] else "")
            print(f"{label:34s} {limit:5d} {r['wait']:7.1f} {r['ms_per_step']:8.2f} {r['deepest']:7d}  {shares}{auto}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
