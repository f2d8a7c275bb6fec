"""Draw one PNG per op from results rows: grouped bars per (shape, dtype, mode), one bar per
provider, whiskers from p20 to p80; a second panel with the speedup over the baseline.

    python -m tokenlabel.bench.plot bench/results/loss.csv [--out loss.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .results import latest, read_rows

# the metric each op is best judged by (first found is drawn)
PRIMARY = ("img/s", "ms")


def plot_rows(rows: list[dict], path, title: str | None = None) -> Path:
    """Write a PNG of ``rows`` (one op) to ``path``; returns the path. Raises ValueError without timings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = latest(rows)
    ops = sorted({r["op"] for r in rows})
    if len(ops) != 1:
        raise ValueError(f"plot_rows wants the rows of one op, got ops {ops}")
    metric = next((m for m in PRIMARY if any(r["metric"] == m and r["p50"] is not None for r in rows)), None)
    if metric is None:
        raise ValueError(f"no timed rows (metric 'ms' or 'img/s') among {len(rows)} rows of op {ops[0]}")
    panels = [metric] + (["speedup"] if any(r["metric"] == "speedup" for r in rows) else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.2 * _ngroups(rows, metric) + 4), 4.2 * len(panels)),
                             squeeze=False)
    for ax, m in zip(axes[:, 0], panels):
        _bars(ax, [r for r in rows if r["metric"] == m and r["p50"] is not None], m)
    fig.suptitle(title or ops[0])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _group(r):
    return f"{r['shape']}\n{r['dtype']} {r['mode']}"


def _ngroups(rows, metric):
    return len({_group(r) for r in rows if r["metric"] == metric})


def _bars(ax, rows, metric):
    groups = sorted({_group(r) for r in rows})
    provs = []
    for r in sorted(rows, key=lambda r: not r["baseline"]):
        if r["provider"] not in provs:
            provs.append(r["provider"])
    width = 0.8 / max(1, len(provs))
    for i, prov in enumerate(provs):
        xs, ys, lo, hi = [], [], [], []
        for j, g in enumerate(groups):
            r = next((r for r in rows if r["provider"] == prov and _group(r) == g), None)
            if r is None:
                continue
            xs.append(j + (i - (len(provs) - 1) / 2) * width)
            ys.append(r["p50"])
            lo.append(r["p50"] - r["p20"] if r["p20"] is not None else 0)
            hi.append(r["p80"] - r["p50"] if r["p80"] is not None else 0)
        ax.bar(xs, ys, width, label=prov, yerr=[[max(0, v) for v in lo], [max(0, v) for v in hi]], capsize=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    unit = rows[0]["unit"] if rows else ""
    ax.set_ylabel(f"{metric} [{unit}]" if unit and unit != metric else metric)
    if metric in ("ms", "speedup"):
        values = [r["p50"] for r in rows if r["p50"]]
        if values and max(values) / max(min(values), 1e-12) > 50:
            ax.set_yscale("log")
    if metric == "speedup":
        ax.axhline(1.0, color="grey", lw=0.8)
    ax.legend(fontsize=7, ncol=min(4, len(provs)))
    ax.grid(axis="y", alpha=0.3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenlabel.bench.plot", description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="results CSV (bench/results/<op>.csv)")
    parser.add_argument("--out", default=None, help="PNG path (default: beside the CSV, <op>.png per op)")
    args = parser.parse_args(argv)
    rows = read_rows(args.csv)
    ops = sorted({r["op"] for r in rows})
    if not ops:
        parser.error(f"{args.csv} holds no rows")
    for op in ops:
        out = Path(args.out) if args.out and len(ops) == 1 else Path(args.csv).with_name(f"{op}.png")
        print(plot_rows([r for r in rows if r["op"] == op], out, title=op))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
