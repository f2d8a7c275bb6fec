"""``tokenlabel bench {loss,attention,blocks,mlp,step,loader,all}``: check, time, record, tabulate, plot.

Examples (the full run on one H100 takes a few minutes)::

    tokenlabel bench all                          # everything, rows -> bench/results/<op>.csv, PNGs
    tokenlabel bench loss --shapes S224 --dtype bf16 --providers fused,reference_eager
    tokenlabel bench loader --data imagenet-sample-334.tar
    tokenlabel bench loader --shapes cifar128,cifar64 --data data/cifar10/train   # the CIFAR runs' loaders
    tokenlabel bench loss --compare bench/results/loss.csv --out /tmp/new
    TRITON_INTERPRET=1 tokenlabel bench loss --quick --out /tmp/q   # CPU smoke run

Rows are appended to ``<out>/<op>.csv`` when every provider of the op has run. Meanwhile each provider's rows
(speedups left out: they need the baseline) go to ``<out>/.<op>.partial.csv`` as soon as it has run, so a run that
is killed keeps what it measured; a completed run deletes that file.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ORDER = ("loss", "attention", "blocks", "mlp", "step", "loader")   # step before loader: the loader rows quote its rate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("op", choices=ORDER + ("all",), help="what to benchmark")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny shapes, few reps (works on the CPU with TRITON_INTERPRET=1)")
    parser.add_argument("--shapes", default=None, help="comma-separated shape names to keep (e.g. S224,C21841)")
    parser.add_argument("--dtype", default=None, help="comma-separated dtypes to keep: bf16,fp16,fp32")
    parser.add_argument("--providers", default=None, help="comma-separated provider names to keep")
    parser.add_argument("--out", default=None,
                        help="results folder (default: bench/results; with --quick: $TMPDIR/tokenlabel-bench-quick)")
    parser.add_argument("--compare", default=None, metavar="FILE",
                        help="earlier results CSV: print the change per (op, provider, shape, dtype, metric)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG plots")
    parser.add_argument("--data", default=None,
                        help="loader/step: JPEG folder or .tar of JPEGs (default: imagenet-sample-334.tar "
                             "in data/ or ../shared/data/)")
    parser.add_argument("--labels", default=None,
                        help="loader/step: label store for --data (default: a random store in a temp dir)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per measurement (default 20; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5; quick 1)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--cudnn-benchmark", choices=("on", "off"), default="on",
                        help="torch.backends.cudnn.benchmark for the whole run (CUDA): cuDNN times its convolution "
                             "algorithms per shape on first use, as the reference's training script sets it. One "
                             "setting per process: cuDNN's plan cache is keyed without it, so the first provider's "
                             "choice would stick (default on; step rows whose notes do not name it ran with it off)")
    parser.add_argument("--cuda-sync", choices=("auto", "spin", "yield", "blocking"), default="auto",
                        help="how this process's threads wait for the GPU (tokenlabel train --cuda-sync; CUDA only, "
                             "set before anything touches CUDA); the step rows note it")
    parser.add_argument("--list", action="store_true", help="list the providers and shapes, run nothing")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing providers")


def _split(text):
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _progress(total: int):
    """A callable to announce each item; tqdm when present, else one line per item."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and total > 0:
        bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)
        state = {"first": True}

        def step(desc):
            if not state["first"]:
                bar.update(1)
            state["first"] = False
            bar.set_description(desc)
        step.close = lambda: (bar.update(1) if not state["first"] else None, bar.close())
        return step
    count = {"i": 0}

    def step(desc):
        count["i"] += 1
        print(f"[{count['i']}/{total}] {desc}", file=sys.stderr, flush=True)
    step.close = lambda: None
    return step


def build_cases(op: str, module, quick: bool, shapes, dtypes, device, options) -> list:
    import torch

    from .registry import Case
    from .runner import DTYPES

    table = module.QUICK_SHAPES if quick else module.SHAPES
    named = getattr(module, "NAMED_SHAPES", {})   # run only when --shapes names them
    if shapes:
        unknown = set(shapes) - set(module.SHAPES) - set(module.QUICK_SHAPES) - set(named)
        if unknown:
            raise ValueError(f"--shapes: unknown shape(s) {sorted(unknown)} for {op}; "
                             f"known: {sorted(module.SHAPES)} (quick: {sorted(module.QUICK_SHAPES)}"
                             + (f"; only when named: {sorted(named)}" if named else "") + ")")
        table = {**module.SHAPES, **module.QUICK_SHAPES, **named}
        table = {k: v for k, v in table.items() if k in shapes}
    if dtypes:
        unknown = set(dtypes) - set(DTYPES)
        if unknown:
            raise ValueError(f"--dtype: unknown dtype(s) {sorted(unknown)}; choose from {sorted(DTYPES)}")
    cases = []
    for name, (params, names) in table.items():
        for dn in names:
            if dtypes and dn != "-" and dn not in dtypes:
                continue
            dtype = None if dn == "-" else DTYPES[dn]
            cases.append(Case(op=op, shape=name, params=dict(params), dtype=dtype, device=torch.device(device),
                              quick=quick, options=options))
    return cases


def run(args) -> int:
    import torch

    if args.cuda_sync != "auto" and args.device != "cpu":  # before anything touches CUDA
        from tokenlabel.env import set_cuda_sync

        try:
            set_cuda_sync(args.cuda_sync)
        except RuntimeError as e:
            print(f"--cuda-sync {args.cuda_sync}: {e}", file=sys.stderr)
            return 2
        from . import step as step_module

        step_module.CUDA_SYNC = args.cuda_sync
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        # Triton kernels run under the interpreter without a GPU; must be set before triton loads.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print(f"--device {device}: CUDA is not available here", file=sys.stderr)
        return 2
    else:
        torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"

    from . import registry, results
    from .plot import plot_rows

    quick = args.quick
    reps = args.reps if args.reps is not None else (3 if quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 5)
    if reps < 1 or warmup < 0:
        print(f"--reps must be >= 1 and --warmup >= 0 (got {reps}, {warmup})", file=sys.stderr)
        return 2
    # default: bench/results of the checkout we run in, else the installed package's folder; smoke
    # runs (--quick) go to a temp folder so they never mix with the committed GPU results
    if args.out:
        out_dir = Path(args.out)
    elif quick:
        import tempfile

        out_dir = Path(tempfile.gettempdir()) / "tokenlabel-bench-quick"
    else:
        out_dir = Path("bench/results") if Path("bench/results").is_dir() else results.DEFAULT_DIR
    old_rows = None
    if args.compare:
        try:
            old_rows = results.read_rows(args.compare)
        except ValueError as e:
            print(f"--compare: {e}", file=sys.stderr)
            return 2
    ops = ORDER if args.op == "all" else (args.op,)
    env = results.environment()
    date = results.today()
    wanted = _split(args.providers)
    context = {"rows": [], "data": args.data, "labels": args.labels, "reps": reps, "warmup": warmup,
               "out_dir": out_dir}
    all_rows = []
    for op in ops:
        module = __import__(registry.OP_MODULES[op], fromlist=["SHAPES"])
        provs = registry.providers(op)
        registry.baseline(op)  # exactly one baseline, or a clear error
        if wanted:
            all_names = {p.name for o in ops for p in registry.providers(o)}
            unknown = set(wanted) - all_names
            if unknown:
                print(f"--providers: unknown {sorted(unknown)}; known for {ops}: {sorted(all_names)}",
                      file=sys.stderr)
                return 2
            provs = [p for p in provs if p.name in wanted]
        try:
            cases = build_cases(op, module, quick, _split(args.shapes), _split(args.dtype), device,
                                {"data": args.data, "labels": args.labels, "context": context})
        except ValueError as e:
            if args.op != "all":
                print(str(e), file=sys.stderr)
                return 2
            cases = []
        if args.list:
            print(f"{op}: providers " + ", ".join(p.name + (" (baseline)" if p.baseline else "") for p in provs))
            print("  shapes: " + "; ".join(f"{c.shape} {c.describe()} {c.dtype}" for c in cases))
            continue
        if not cases or not provs:
            continue
        from .runner import sweep

        step = _progress(len(cases) * len(provs))
        # Each provider's rows also go to a hidden partial file as soon as it has run, so a run killed by a time
        # limit (a device call's) keeps what it measured; the file goes when the run completes.
        partial = out_dir / f".{op}.partial.csv"
        partial.unlink(missing_ok=True)
        fields = sweep(op, cases, provs, warmup=warmup, reps=reps, gpu_name=env["gpu"], progress=step,
                       verbose=args.verbose, on_outcome=lambda fs: results.append_rows(
                           partial, [results.make_row(env, date, **{"op": op, **f}) for f in fs]))
        step.close()
        if hasattr(module, "yardsticks"):
            context["current"] = fields
            fields += module.yardsticks(torch.device(device), quick, context)
        rows = [results.make_row(env, date, **{"op": op, **f}) for f in fields]
        context["rows"] += rows
        path = results.append_rows(out_dir / f"{op}.csv", rows)
        partial.unlink(missing_ok=True)
        print(f"{op}: {len(rows)} rows appended to {path}", file=sys.stderr)
        if not args.no_plot:
            try:
                png = plot_rows(rows, out_dir / f"{op}.png", title=f"{op} ({env['gpu']})")
                print(f"{op}: plot {png}", file=sys.stderr)
            except ImportError as e:
                print(f"{op}: no plot ({e}); pip install matplotlib", file=sys.stderr)
            except ValueError as e:
                print(f"{op}: no plot: {e}", file=sys.stderr)
        all_rows += rows
    if args.list:
        return 0
    if old_rows is not None:
        from .compare import compare_rows, format_comparison

        print(format_comparison(compare_rows(old_rows, all_rows)))
    print(results.format_table(all_rows))
    return 0
