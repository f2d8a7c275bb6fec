"""``tokenlabel train`` under torch.profiler, and where the training stream's idle time goes.

    python scripts/profile_train.py --out DIR [--start 214] [--steps 20] -- <tokenlabel train arguments>
    python scripts/profile_train.py --analyze DIR/trace.json.gz

The first form skips ``--start`` optimizer steps (compile, warm-up), records the next ``--steps`` and writes
``trace.json.gz`` (Chrome trace) and ``prof_table.txt`` (key averages) into ``--out``. The loader's and the
step's host parts carry ``TL::`` labels (next, pipe_run, to_torch, finish_batch, step, loss, ema, ...). The
second form prints, from such a trace: CUDA runtime calls per host thread, GPU time per stream, the labelled
host parts' durations, the host breakdown of a step, and every gap of the busiest stream (the training step's)
over 0.2 ms with what the training thread was doing meanwhile. How the 2026-12-04 CIFAR diagnosis used it:
dataloading/NOTES.md.
"""
from __future__ import annotations

import argparse
import collections
import functools
import gzip
import json
import os
import shutil
import sys

LABELS = [  # (module path, object, attribute, label)
    ("tokenlabel.train", "Trainer", "step", "TL::step"),
    ("tokenlabel.train", None, "compute_loss", "TL::loss"),
    ("tokenlabel.train", "ModelEma", "update", "TL::ema"),
    ("tokenlabel.train", None, "_to_device", "TL::to_device"),
    ("tokenlabel.dataloading.loader", None, "finish_batch", "TL::finish_batch"),
    ("tokenlabel.dataloading.dali_pipeline", "DaliBackend", "_wait_copy", "TL::wait_copy"),
    ("tokenlabel.dataloading.dali_pipeline", "DaliBackend", "_to_torch", "TL::to_torch"),
    ("tokenlabel.dataloading.dali_pipeline", "_Feeder", "__call__", "TL::feeder"),
    ("tokenlabel.dataloading.dali_pipeline", "DaliBackend", "_prepare", "TL::prepare"),
]


def _labelled(f, tag):
    from torch.profiler import record_function

    @functools.wraps(f)
    def g(*a, **k):
        with record_function(tag):
            return f(*a, **k)
    return g


def install_labels() -> list:
    """Wrap the host parts in record_function labels; returns the undo list for ``remove_labels``."""
    import importlib

    from torch.profiler import record_function

    undo = []
    for mod, obj, attr, tag in LABELS:
        owner = importlib.import_module(mod)
        owner = getattr(owner, obj) if obj else owner
        undo.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, _labelled(getattr(owner, attr), tag))
    from tokenlabel.dataloading import dali_pipeline as DP, loader as L

    build = DP.DaliBackend._build

    def labelled_build(self):  # DALI's run(): feeding and waiting for the batch
        p = build(self)
        p.run = _labelled(p.run, "TL::pipe_run")
        return p
    undo.append((DP.DaliBackend, "_build", build))
    DP.DaliBackend._build = labelled_build
    it = L.Loader.__iter__

    def labelled_iter(self):  # the training loop's next()
        g = it(self)
        while True:
            with record_function("TL::next"):
                try:
                    x = next(g)
                except StopIteration:
                    return
            yield x
    undo.append((L.Loader, "__iter__", it))
    L.Loader.__iter__ = labelled_iter
    return undo


def remove_labels(undo: list) -> None:
    for owner, attr, f in reversed(undo):
        setattr(owner, attr, f)


def profile_train(train_args: list[str], out: str, start: int, steps: int) -> int:
    """Run ``tokenlabel train train_args``, recording optimizer steps start+3 .. start+3+steps (3 warm-up)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from tokenlabel import train as T
    from tokenlabel.cli import main

    os.makedirs(out, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    written = []

    def ready(p):
        path = os.path.join(out, "trace.json")
        p.export_chrome_trace(path)
        with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
            shutil.copyfileobj(f, g)
        os.remove(path)
        with open(os.path.join(out, "prof_table.txt"), "w") as f:
            f.write(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=60))
        written.append(path + ".gz")
        print(f"[profile] wrote {path}.gz", flush=True)

    prof = profile(activities=acts, schedule=schedule(wait=start, warmup=3, active=steps, repeat=1),
                   on_trace_ready=ready)
    undo = install_labels()
    step = T.Trainer.step

    def counted(self, *a, **k):
        r = step(self, *a, **k)
        prof.step()
        return r
    T.Trainer.step = counted
    try:
        with prof:
            rc = main(["train", *train_args])
    finally:
        T.Trainer.step = step
        remove_labels(undo)
    if not written:
        print(f"[profile] the run ended before step {start + 3 + steps}: no trace (lower --start or --steps)",
              file=sys.stderr)
        return rc or 1
    return rc or 0


# ------------------------------------------------------------------------------------------- analysis
def _load(path):
    with gzip.open(path) if str(path).endswith(".gz") else open(path) as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def analyze(path) -> dict:
    """The figures the report prints, as a dict (tests read it)."""
    ev = _load(path)
    steps_by_tid = collections.Counter(e["tid"] for e in ev if e["name"] == "TL::step")
    if not steps_by_tid:
        raise ValueError(f"{path}: no TL::step events (not a trace from profile_train)")
    main_tid = steps_by_tid.most_common(1)[0][0]
    mev = sorted((e for e in ev if e["tid"] == main_tid), key=lambda e: (e["ts"], -e["dur"]))
    r = {"main_tid": main_tid, "labels": {}, "step_children": {}, "runtime_by_thread": {}, "streams": {}}
    for name in sorted({e["name"] for e in mev if e["name"].startswith("TL::")}):
        d = sorted(e["dur"] / 1e3 for e in mev if e["name"] == name)
        r["labels"][name] = dict(n=len(d), median_ms=d[len(d) // 2], max_ms=d[-1], sum_ms=sum(d))
    steps = [e for e in mev if e["name"] == "TL::step"]
    kids = collections.Counter()
    for p in steps:  # direct children of each step on the training thread
        a, b, end = p["ts"], p["ts"] + p["dur"], -1
        for e in mev:
            if e is not p and a <= e["ts"] and e["ts"] + e["dur"] <= b and e["ts"] >= end:
                kids[e["name"][:70]] += e["dur"] / 1e3 / len(steps)
                end = e["ts"] + e["dur"]
    r["step_children"] = dict(kids.most_common(12))
    r["step_uncovered_ms"] = (sum(p["dur"] for p in steps) / 1e3 / len(steps)) - sum(kids.values())
    rt = collections.defaultdict(collections.Counter)
    for e in ev:
        if e.get("cat") == "cuda_runtime":
            rt[e["tid"]][e["name"]] += e["dur"] / 1e3
    r["runtime_by_thread"] = {t: dict(c.most_common(5)) for t, c in rt.items()}
    kern = [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    for e in kern:
        r["streams"][e["tid"]] = r["streams"].get(e["tid"], 0.0) + e["dur"] / 1e3
    r["gaps"] = []
    if kern:
        s0 = max(r["streams"], key=r["streams"].get)
        busy = []
        for e in sorted((e for e in kern if e["tid"] == s0), key=lambda e: e["ts"]):
            if busy and e["ts"] <= busy[-1][1] + 1:
                busy[-1][1] = max(busy[-1][1], e["ts"] + e["dur"])
            else:
                busy.append([e["ts"], e["ts"] + e["dur"]])
        t0 = steps[0]["ts"]
        labelled = [e for e in mev if e["name"].startswith("TL::")]
        for (_, a), (b, _) in zip(busy, busy[1:]):
            if b - a > 200 and a > t0:
                during = {e["name"]: round((min(b, e["ts"] + e["dur"]) - max(a, e["ts"])) / 1e3, 2)
                          for e in labelled if e["ts"] < b and e["ts"] + e["dur"] > a}
                r["gaps"].append(dict(at_ms=(a - t0) / 1e3, ms=(b - a) / 1e3, host=during))
        span = steps[-1]["ts"] + steps[-1]["dur"] - t0
        r["step_stream"] = dict(stream=s0, span_ms=span / 1e3,
                                busy_ms=sum(f - s for s, f in busy if s > t0) / 1e3,
                                gap_ms=sum(g["ms"] for g in r["gaps"]))
    return r


def report(path) -> None:
    r = analyze(path)
    print(f"training thread {r['main_tid']}")
    for name, d in r["labels"].items():
        print(f"  {name:18s} n {d['n']:4d}  median {d['median_ms']:7.2f} ms  max {d['max_ms']:7.2f}  "
              f"sum {d['sum_ms']:8.1f}")
    print(f"a step's host time by direct child (ms per step; {r['step_uncovered_ms']:.2f} ms in none, e.g. "
          "waiting for the autograd thread):")
    for k, v in r["step_children"].items():
        print(f"  {v:7.3f}  {k}")
    print("CUDA runtime calls per thread (ms):")
    for t, c in sorted(r["runtime_by_thread"].items(), key=lambda kv: -sum(kv[1].values()))[:14]:
        print(f"  {t}{' (training)' if t == r['main_tid'] else ''}: "
              + ", ".join(f"{k} {v:.1f}" for k, v in c.items()))
    print("GPU time per stream (ms): " + ", ".join(f"{s}: {v:.1f}" for s, v in
                                                   sorted(r["streams"].items(), key=lambda kv: -kv[1])))
    if "step_stream" in r:
        s = r["step_stream"]
        print(f"step stream {s['stream']}: span {s['span_ms']:.1f} ms, busy {s['busy_ms']:.1f}, gaps over 0.2 ms "
              f"{s['gap_ms']:.1f} ({s['gap_ms'] / max(s['span_ms'], 1e-9):.1%})")
        for g in r["gaps"]:
            print(f"  gap {g['ms']:6.2f} ms at {g['at_ms']:8.1f} ms; training thread in {g['host']}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for trace.json.gz and prof_table.txt")
    ap.add_argument("--start", type=int, default=214, help="optimizer steps before recording (default 214)")
    ap.add_argument("--steps", type=int, default=20, help="steps recorded (default 20)")
    ap.add_argument("--analyze", metavar="TRACE", help="print the analysis of a trace instead")
    a = ap.parse_args(argv)
    if a.analyze:
        report(a.analyze)
        return 0
    if not a.out or not train_args:
        ap.error("give --out DIR and the train arguments after --")
    if a.start < 0 or a.steps < 1:
        ap.error("--start must be >= 0 and --steps >= 1")
    if os.path.exists(a.out) and (not os.path.isdir(a.out) or os.listdir(a.out)):
        ap.error(f"--out {a.out} exists and is not an empty folder: give a new one (an earlier profile is not "
                 "overwritten)")
    return profile_train(train_args, a.out, a.start, a.steps)


if __name__ == "__main__":
    raise SystemExit(main())
