"""The sweep: for every case and provider, prepare, check correctness, time, derive metrics.

A provider that raises :class:`~.registry.Skip` gets a ``status`` row saying why; one whose check
fails, or that raises, gets a ``failed`` row and is not timed. On CUDA out-of-memory the batch is
halved and the case retried, and the rows say so (timm benchmark.py's habit).
"""
from __future__ import annotations

import gc
import sys
import traceback
from dataclasses import dataclass, field, replace

import torch

from . import timing
from .registry import Case, CheckFailed, Prepared, Provider, Skip

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype) -> str:
    return "-" if dtype is None else DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


@dataclass
class Outcome:
    provider: Provider
    case: Case
    status: str = "ok"                              # ok | skipped | failed
    reason: str = ""
    times: dict = field(default_factory=dict)       # mode -> list of ms per call
    prepared: Prepared | None = None
    errors: dict = field(default_factory=dict)
    memory: int | None = None
    extra: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_provider(provider: Provider, case: Case, warmup: int, reps: int, verbose: bool = False) -> Outcome:
    """Prepare, check, then time ``provider`` on ``case``; halves B on OOM."""
    out = Outcome(provider, case)
    params = dict(case.params)
    while True:
        current = replace(case, params=dict(params))
        out.case = current
        prep = None
        try:
            prep = provider.fn(current)
            if prep.check is not None:
                errors = prep.check()
                out.errors = dict(errors or {})
            for mode, fn in prep.modes.items():
                timer = prep.timer or (lambda f, w, r: timing.time_calls(f, current.device, w, r))
                out.times[mode] = timer(fn, warmup, reps)
            if prep.memory and prep.modes:
                fn = next(iter(prep.modes.values()))
                out.memory = timing.peak_extra_bytes(fn, current.device, prep.memory_exclude)
            if prep.extra_rows is not None:
                out.extra = list(prep.extra_rows())
            out.prepared = replace(prep, modes={}, check=None, timer=None, extra_rows=None, cleanup=None)
            if prep.cleanup is not None:
                prep.cleanup()
            return out
        except Skip as e:
            out.status, out.reason = "skipped", str(e)
            return out
        except CheckFailed as e:
            out.status, out.reason = "failed", f"correctness check failed, not timed: {e}"
            return out
        except Exception as e:  # noqa: BLE001 - any failure of one provider is reported, the sweep goes on
            if _is_oom(e) and params.get("B", 1) > 1:
                out.notes.append(f"OOM at B={params['B']}, retried at B={params['B'] // 2}")
                params["B"] //= 2
                out.times.clear()
                del prep
                _free(case.device)
                continue
            out.status = "failed"
            out.reason = f"{type(e).__name__}: {e}".replace("\n", " ")[:400]
            if verbose:
                traceback.print_exc(file=sys.stderr)
            return out
        finally:
            prep = None
            _free(case.device)


def _rate(amount, ms_triplet, scale):
    """(p50, p20, p80) of amount/time: the p20 of a rate is the rate at the p80 of the time."""
    p50, p20, p80 = ms_triplet
    return amount / p50 * scale, amount / p80 * scale, amount / p20 * scale


def outcome_rows(out: Outcome, baseline_ms: dict | None, gpu_name: str) -> list[dict]:
    """Result fields (without env/date) for one outcome. ``baseline_ms``: mode -> p50 of the
    provider it is compared with (None: no speedup rows)."""
    case, prov = out.case, out.provider
    common = dict(op=case.op, provider=prov.name, baseline=prov.baseline, shape=case.shape,
                  dtype=dtype_name(case.dtype))
    size_note = case.describe()
    notes = "; ".join([size_note] + out.notes + ([out.prepared.notes] if out.prepared and out.prepared.notes else []))
    if out.status != "ok":
        return [dict(common, mode="-", metric="status", unit="", notes=f"{out.status}: {out.reason}; {notes}")]
    prep = out.prepared
    rows = []

    def add(mode, metric, trip, unit, extra_note=""):
        p50, p20, p80 = trip if isinstance(trip, tuple) else (trip, None, None)
        rows.append(dict(common, mode=mode, metric=metric, p50=p50, p20=p20, p80=p80, unit=unit,
                         notes="; ".join(x for x in (notes, extra_note) if x)))

    for name, err in out.errors.items():
        add("check", f"err_{name}", float(err), "rel", "max |out - float64 ref| / max |ref| before timing")
    for mode, ms in out.times.items():
        trip = timing.quantiles(ms)
        add(mode, "ms", trip, "ms", f"n={len(ms)}")
        nbytes = prep.per_mode("bytes", mode)
        if nbytes:
            add(mode, "GB/s", _rate(nbytes, trip, 1e-6), "GB/s", f"bytes/call={int(nbytes)}")
        items = prep.per_mode("items", mode)
        if items:
            add(mode, "img/s", _rate(items, trip, 1e3), "img/s")
        flops = prep.per_mode("flops", mode)
        if flops:
            tf = _rate(flops, trip, 1e-9)
            add(mode, "TFLOP/s", tf, "TFLOP/s", f"FLOP/call={flops:.4g}")
            if prep.mfu:
                peak = timing.matmul_peak_tflops(case.device, 8192 if case.device.type == "cuda" else 256)
                add(mode, "MFU", tuple(100 * v / peak[0] for v in tf), "%",
                    f"vs measured matmul peak {peak[0]:.0f} TFLOP/s")
                sheet = timing.datasheet_bf16_tflops(gpu_name)
                if sheet:
                    add(mode, "MFU_datasheet", tuple(100 * v / sheet for v in tf), "%",
                        f"vs datasheet dense bf16 {sheet:.0f} TFLOP/s ({gpu_name})")
        if baseline_ms and mode in baseline_ms:
            ref_name, ref = baseline_ms[mode]
            add(mode, "speedup", (ref / trip[0], ref / trip[2], ref / trip[1]), "x", f"vs {ref_name}")
    if out.memory is not None:
        note = "peak allocated during one call minus memory before it minus its output grads"
        if prep.memory_ref:
            note += f"; the logits it replaces are {prep.memory_ref / 2**20:.1f} MiB"
        add(next(iter(out.times), "-"), "peak_extra_MiB", out.memory / 2**20, "MiB", note)
        if prep.memory_ref:
            add(next(iter(out.times), "-"), "replaced_logits_MiB", prep.memory_ref / 2**20, "MiB",
                "size of the [B,N,C] logits that are never materialised")
    for mode, metric, p50, p20, p80, unit, note in out.extra:
        add(mode, metric, (p50, p20, p80), unit, note)
    return rows


def sweep(op: str, cases: list[Case], provs: list[Provider], *, warmup: int, reps: int, gpu_name: str,
          progress=None, verbose: bool = False, on_outcome=None) -> list[dict]:
    """Run every provider on every case; returns result fields (no env/date) in order. ``on_outcome(fields)``, if
    given, receives each provider's fields as soon as it has run (without speedups, which need the baseline)."""
    rows = []
    names = {p.name for p in provs}
    for case in cases:
        outcomes = {}
        for prov in provs:
            if progress is not None:
                progress(f"{op} {case.shape} {dtype_name(case.dtype)} {prov.name}")
            outcomes[prov.name] = run_provider(prov, case, warmup, reps, verbose)
            if on_outcome is not None:
                on_outcome(outcome_rows(outcomes[prov.name], None, gpu_name))
        base = next((p.name for p in provs if p.baseline), None)
        for name, out in outcomes.items():
            ref_name = (out.prepared.compare_to if out.prepared and out.prepared.compare_to else base)
            ref = outcomes.get(ref_name) if ref_name in names else None
            ref_ms = None
            if ref is not None and ref.status == "ok" and ref.times:
                ref_ms = {m: (ref_name, timing.quantiles(t)[0]) for m, t in ref.times.items()}
            rows += outcome_rows(out, ref_ms, gpu_name)
    return rows
