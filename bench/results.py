"""Long-format result rows: one CSV per op in ``bench/results/``, appended to run after run.

One row = one (date, op, provider, mode, shape, dtype, metric) with its p50/p20/p80, the unit, the
GPU and the versions it ran with, and notes (what the bytes or FLOPs count, skips, failures, OOM
halving). The plotter and ``--compare`` read these rows back with :func:`read_rows`.
"""
from __future__ import annotations

import csv
import datetime as _dt
import math
import os
from pathlib import Path

COLUMNS = ("date", "op", "provider", "baseline", "mode", "shape", "dtype", "metric", "p50", "p20", "p80",
           "unit", "gpu", "torch", "triton", "dali", "xformers", "cuda", "notes")
NUMERIC = ("p50", "p20", "p80")
# metrics where a larger value is better (everything else, e.g. ms or MiB, is better smaller)
HIGHER_IS_BETTER = {"GB/s", "img/s", "TFLOP/s", "speedup", "MFU", "MFU_datasheet", "items/s"}

DEFAULT_DIR = Path(__file__).resolve().parent / "results"


def _version(module: str) -> str:
    try:
        mod = __import__(module, fromlist=["__version__"])
        return str(getattr(mod, "__version__", "?"))
    except Exception:  # not installed, or its extension fails to load
        return ""


def environment() -> dict:
    """GPU name and library versions, as written into every row."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "dali": _version("nvidia.dali"),
        "xformers": _version("xformers"),
        "cuda": torch.version.cuda or "",
    }


def today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_row(env: dict, date: str, **fields) -> dict:
    """A complete row: ``fields`` plus ``env`` and ``date``; unknown column names are an error."""
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown result column(s) {sorted(unknown)}; columns are {COLUMNS}")
    row = {c: "" for c in COLUMNS}
    row.update(env)
    row["date"] = date
    row.update(fields)
    for c in NUMERIC:
        v = row[c]
        row[c] = "" if v is None or v == "" or (isinstance(v, float) and math.isnan(v)) else float(v)
    row["baseline"] = bool(row["baseline"])
    return row


def append_rows(path, rows) -> Path:
    """Append rows to a CSV (header written when the file is new or empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if tuple(header or ()) != COLUMNS:
            raise ValueError(f"{path} has columns {header}, expected {list(COLUMNS)}; use another --out")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({c: _fmt(row.get(c, "")) for c in COLUMNS})
        f.flush()
        os.fsync(f.fileno())
    return path


def _fmt(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_rows(path) -> list[dict]:
    """Rows of a results CSV, numbers as floats (None when empty), baseline as bool."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"results file {str(path)!r} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} is not a results CSV: missing columns {sorted(missing)}")
        rows = []
        for r in reader:
            for c in NUMERIC:
                r[c] = float(r[c]) if r[c] not in ("", None) else None
            r["baseline"] = str(r["baseline"]).lower() == "true"
            rows.append(r)
    return rows


def latest(rows: list[dict]) -> list[dict]:
    """Keep, per (op, provider, mode, shape, dtype, metric), the row of the latest date."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = row_key(r)
        if key not in best or r["date"] >= best[key]["date"]:
            best[key] = r
    return list(best.values())


def row_key(r: dict) -> tuple:
    return (r["op"], r["provider"], r["mode"], r["shape"], r["dtype"], r["metric"])


def _num(v, unit=""):
    if v is None or v == "":
        return "-"
    v = float(v)
    if unit == "%" or abs(v) >= 100:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


TABLE_METRICS = ("ms", "img/s", "GB/s", "TFLOP/s", "MFU", "MFU_datasheet", "peak_extra_MiB", "replaced_logits_MiB",
                 "data_wait", "data_wait_gpu", "speedup")


def format_table(rows: list[dict]) -> str:
    """Per op: one line per (shape, dtype, mode, provider) with the p50 of its main metrics, the largest
    correctness error of that provider at that shape, and why it was skipped or failed."""
    rows = latest(rows)
    out = []
    for op in dict.fromkeys(r["op"] for r in rows):     # in the order the ops ran
        op_rows = [r for r in rows if r["op"] == op]
        groups: dict[tuple, dict] = {}
        errors: dict[tuple, float] = {}
        for r in op_rows:
            if r["metric"].startswith("err_"):
                key = (r["shape"], r["dtype"], r["provider"])
                errors[key] = max(errors.get(key, 0.0), r["p50"] or 0.0)
                continue
            g = groups.setdefault((r["shape"], r["dtype"], r["mode"], r["provider"]), {"_base": r["baseline"]})
            g[r["metric"]] = r
        present = {m for g in groups.values() for m in g}
        metrics = [m for m in TABLE_METRICS if m in present]
        metrics += sorted(m for m in present - set(metrics) - {"status", "_base"})
        header = ["shape", "dtype", "mode", "provider"] + [f"{m} [{_unit(op_rows, m)}]" for m in metrics]
        header += ["max_err"] if errors else []
        header += ["notes"]
        table = []
        ordered = sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], not kv[1]["_base"], kv[0][3]))
        for (shape, dtype, mode, prov), g in ordered:
            line = [shape, dtype, mode, prov + (" *" if g["_base"] else "")]
            line += [_num(g[m]["p50"], g[m]["unit"]) if m in g else "" for m in metrics]
            if errors:
                e = errors.get((shape, dtype, prov))
                line.append(f"{e:.2g}" if e is not None and mode != "-" else "")
            line.append(g["status"]["notes"][:100] if "status" in g else "")
            table.append(line)
        widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
        out.append(f"== {op} (p50; * = baseline; speedup = baseline time / provider time)")
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
        for line in table:
            out.append("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
        out.append("")
    return "\n".join(out)


def _unit(rows, metric):
    return next((r["unit"] for r in rows if r["metric"] == metric), "")
