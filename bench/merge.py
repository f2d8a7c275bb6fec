"""Bring the rows a GPU run added back into the committed results CSV.

    python -m tokenlabel.bench.merge FETCHED.csv bench/results/step.csv [--partial FETCHED.partial.csv]

A device run starts from a copy of the committed ``bench/results/<op>.csv`` and appends to it, so the fetched
file is the committed one plus new rows. This appends exactly those new rows (field for field) to the local file,
after checking that the local rows are a prefix of the fetched ones (otherwise the device did not start from
this file, and guessing which rows are new could duplicate or drop some). ``--partial``: the hidden
``.<op>.partial.csv`` of a run that a time limit killed (``tokenlabel bench`` writes each provider's rows there
as soon as it has run); its rows are appended too, except those whose (date, provider, mode, shape, dtype,
metric) a completed run already wrote. Replot afterwards: ``python -m tokenlabel.bench.plot LOCAL --out X.png``.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from .results import COLUMNS

_KEY = ("date", "op", "provider", "mode", "shape", "dtype", "metric")


def _records(path: Path, what: str) -> list[list[str]]:
    """The data records of a results CSV, as lists of strings (exactly as written)."""
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.reader(f, strict=True))
    if not rows or tuple(rows[0]) != COLUMNS:
        raise ValueError(f"{what} {str(path)!r} is not a results CSV (its header is "
                         f"{','.join(rows[0]) if rows else 'missing'!r})")
    bad = next((i for i, r in enumerate(rows[1:], 2) if len(r) != len(COLUMNS)), None)
    if bad is not None:
        raise ValueError(f"{what} {str(path)!r}: record {bad} has {len(rows[bad - 1])} columns, not {len(COLUMNS)}")
    return rows[1:]


def _key(record: list[str]) -> tuple:
    row = dict(zip(COLUMNS, record))
    return tuple(row[c] for c in _KEY)


def new_records(fetched: Path, local: Path, partial: Path | None = None) -> list[list[str]]:
    """The records to append to ``local``: those of ``fetched`` after local's, then ``partial``'s not in them. A
    ``local`` that does not exist yet (an op's first device run) has no records."""
    have = _records(local, "local file") if local.exists() else []
    got = _records(fetched, "fetched file")
    if got[:len(have)] != have:
        same = next((i for i, (a, b) in enumerate(zip(have, got)) if a != b), min(len(have), len(got)))
        raise ValueError(f"{local} is not a prefix of {fetched}: they differ from record {same + 1} on ({len(have)} "
                         f"local records, {len(got)} fetched); the device run did not start from this file")
    new = got[len(have):]
    if partial is not None:
        part = _records(partial, "partial file")
        done = {_key(r) for r in have + new}
        new += [r for r in part if _key(r) not in done]
    return new


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fetched", type=Path, help="the results CSV the device run left (committed rows + new ones)")
    ap.add_argument("local", type=Path, help="the committed results CSV to append the new rows to")
    ap.add_argument("--partial", type=Path, default=None, help="a killed run's .<op>.partial.csv")
    a = ap.parse_args(argv)
    try:
        new = new_records(a.fetched, a.local, a.partial)
    except ValueError as e:
        print(f"merge: {e}", file=sys.stderr)
        return 2
    if new:
        fresh = not a.local.exists()
        with open(a.local, "a", newline="") as f:  # the writer results.append_rows uses: the same bytes
            if fresh:
                csv.writer(f).writerow(COLUMNS)
            csv.writer(f).writerows(new)
    providers = sorted({_key(r)[2] for r in new})
    print(f"merge: {len(new)} rows appended to {a.local}" + (f" (providers: {', '.join(providers)})" if new else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
