"""The change between two sets of results rows, per (op, provider, mode, shape, dtype, metric).

    python -m tokenlabel.bench.compare OLD.csv NEW.csv
"""
from __future__ import annotations

import argparse

from .results import HIGHER_IS_BETTER, latest, read_rows, row_key


def compare_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """One entry per key present in both (latest row of each side) with p50 values and the change.

    ``ratio`` = new / old; ``better`` is True when the change is an improvement for that metric
    (higher GB/s, img/s, speedup, ...; lower ms or MiB)."""
    old_by = {row_key(r): r for r in latest(old)}
    out = []
    for r in latest(new):
        key = row_key(r)
        o = old_by.get(key)
        if o is None or r["p50"] is None or o["p50"] is None or r["metric"] == "status":
            continue
        ratio = r["p50"] / o["p50"] if o["p50"] else float("inf")
        higher = r["metric"] in HIGHER_IS_BETTER or r["unit"] in HIGHER_IS_BETTER
        better = ratio > 1 if higher else ratio < 1
        out.append(dict(op=r["op"], provider=r["provider"], mode=r["mode"], shape=r["shape"], dtype=r["dtype"],
                        metric=r["metric"], unit=r["unit"], old=o["p50"], new=r["p50"], ratio=ratio,
                        better=better if ratio != 1 else None, old_date=o["date"], new_date=r["date"]))
    return out


def format_comparison(entries: list[dict]) -> str:
    if not entries:
        return "compare: no (op, provider, mode, shape, dtype, metric) in common with the earlier file"
    header = ("op", "provider", "mode", "shape", "dtype", "metric", "old", "new", "change")
    lines = []
    for e in entries:
        change = f"{(e['ratio'] - 1) * 100:+.1f}%"
        if e["better"] is not None:
            change += " better" if e["better"] else " worse"
        lines.append((e["op"], e["provider"], e["mode"], e["shape"], e["dtype"], f"{e['metric']} [{e['unit']}]",
                      f"{e['old']:.4g}", f"{e['new']:.4g}", change))
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    text = ["== compare (p50, new vs old)", "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    text += ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(text) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenlabel.bench.compare", description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    args = parser.parse_args(argv)
    print(format_comparison(compare_rows(read_rows(args.old), read_rows(args.new))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
