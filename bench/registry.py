"""Providers registered per op by decorator, exactly one of them the op's baseline.

A provider is a function ``fn(case: Case) -> Prepared``: it builds its inputs for one shape and
dtype, and hands back the callables to time (one per mode) and a correctness check that the runner
calls before any timing. It raises :class:`Skip` when it cannot run here (a missing package, no
GPU), with the reason that goes into the results row.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

# op -> module that registers its providers (imported on first use)
OP_MODULES = {
    "loss": "tokenlabel.bench.loss",
    "attention": "tokenlabel.bench.attention",
    "blocks": "tokenlabel.bench.blocks",
    "mlp": "tokenlabel.bench.mlp",
    "step": "tokenlabel.bench.step",
    "loader": "tokenlabel.bench.loader",
}
OPS = tuple(OP_MODULES)

_PROVIDERS: dict[str, dict[str, "Provider"]] = {}


class Skip(Exception):
    """The provider cannot run here; the message is the reason written into the row."""


class CheckFailed(Exception):
    """The provider's output disagrees with the reference: it is reported as failed and not timed."""


@dataclass(frozen=True)
class Provider:
    op: str
    name: str
    fn: Callable[["Case"], "Prepared"]
    baseline: bool = False
    doc: str = ""


@dataclass
class Case:
    """One point of a sweep: an op at a named shape and dtype, on a device."""
    op: str
    shape: str                 # shape name, e.g. "S224"
    params: dict               # B, N, C, ... (the runner may halve B after an OOM)
    dtype: Any                 # torch dtype, or None where it does not apply (loader)
    device: Any                # torch.device
    quick: bool = False
    options: dict = field(default_factory=dict)   # CLI extras: data, labels, ...

    def describe(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.params.items())


@dataclass
class Prepared:
    """What a provider hands the runner for one case.

    modes        mode name -> callable doing the timed work once (e.g. {"fwd+bwd": fn})
    check        called once before timing; raises CheckFailed; may return {name: error} to record
    bytes        bytes moved per call (for GB/s), per mode or one int for all modes
    flops        floating-point operations per call (TFLOP/s, MFU), per mode or one number
    items        images per call (images/s)
    memory       measure peak memory of one call beyond what is allocated before it
    memory_exclude  bytes of the call's own outputs to leave out of that (e.g. the logits' grads)
    memory_ref   bytes to compare the peak extra memory against (e.g. the logits a fused op replaces)
    compare_to   provider whose time the speedup is computed against (default: the op's baseline)
    timer        custom timer ``timer(fn, warmup, reps) -> list[ms per call]`` (loaders)
    extra_rows   callable returning more metric rows [(mode, metric, p50, p20, p80, unit, notes)]
    mfu          also report MFU from ``flops``: vs a measured bf16 matmul peak and vs the datasheet
    notes        free text copied into every row of this provider
    """
    modes: dict[str, Callable[[], Any]]
    check: Callable[[], Any] | None = None
    bytes: Any = None
    flops: Any = None
    items: int | None = None
    memory: bool = False
    memory_exclude: int = 0
    memory_ref: int | None = None
    compare_to: str | None = None
    timer: Callable | None = None
    extra_rows: Callable[[], list] | None = None
    mfu: bool = False
    notes: str = ""
    cleanup: Callable[[], None] | None = None

    def per_mode(self, attr: str, mode: str):
        value = getattr(self, attr)
        return value.get(mode) if isinstance(value, dict) else value


def within(prep: Prepared, context, note: str) -> Prepared:
    """``prep`` with its timed modes and its check each run inside ``context()`` (a context manager factory, e.g.
    a kernel variant switched on for this provider only), and ``note`` added to its notes."""
    def wrap(fn):
        def run(*args, **kwargs):
            with context():
                return fn(*args, **kwargs)
        return run

    prep.modes = {mode: wrap(fn) for mode, fn in prep.modes.items()}
    if prep.check is not None:
        prep.check = wrap(prep.check)
    prep.notes = f"{prep.notes}; {note}" if prep.notes else note
    return prep


def register(op: str, name: str, *, baseline: bool = False):
    """Decorator: ``@register("loss", "fused")`` adds ``fn`` as provider ``name`` of ``op``."""
    if op not in OP_MODULES:
        raise ValueError(f"op must be one of {sorted(OP_MODULES)}, got {op!r}")

    def wrap(fn):
        table = _PROVIDERS.setdefault(op, {})
        if name in table and table[name].fn is not fn:
            raise ValueError(f"provider {name!r} of op {op!r} is registered twice")
        if baseline and any(p.baseline for p in table.values() if p.name != name):
            other = next(p.name for p in table.values() if p.baseline)
            raise ValueError(f"op {op!r} already has baseline {other!r}; cannot also make {name!r} one")
        table[name] = Provider(op, name, fn, baseline, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return wrap


def load(op: str) -> None:
    if op not in OP_MODULES:
        raise ValueError(f"op must be one of {sorted(OP_MODULES)}, got {op!r}")
    importlib.import_module(OP_MODULES[op])


def providers(op: str) -> list[Provider]:
    """All providers of ``op`` (baseline first, then in registration order)."""
    load(op)
    table = list(_PROVIDERS.get(op, {}).values())
    return sorted(table, key=lambda p: not p.baseline)


def baseline(op: str) -> Provider:
    found = [p for p in providers(op) if p.baseline]
    if len(found) != 1:
        raise RuntimeError(f"op {op!r} must have exactly one baseline provider, has {[p.name for p in found]}")
    return found[0]
