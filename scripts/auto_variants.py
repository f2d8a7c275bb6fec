"""Diagnose what "auto" costs beside the step while its engines' pipeline is paused (a GPU experiment).

Registers two extra fed-step providers and runs ``tokenlabel bench step`` with the given arguments:

- ``x_auto_off_ours``: hw_decoder_load="auto" with the engines' pipeline switched off from the start and never
  tried: the lanes' dispatch (pump threads, the copy out synchronised in the pump) with the hybrid pipeline alone
  delivering, the engines' pipeline built and idle;
- ``x_dispatch_hybrid_ours``: the same with lane 0 built on the hybrid path too (no hardware-decoder instance):
  the dispatch alone.

Beside ``loader_fed_ours_deep`` (one pipeline, the consumer runs it) and ``loader_fed_auto_ours`` in one call they
say whether the cost is the dispatch, the idle engines' pipeline, or the engines' tries.

    python scripts/auto_variants.py --providers loader_fed_ours_deep,x_auto_off_ours --data D --out DIR
"""
from __future__ import annotations

import sys

from tokenlabel.bench import loader as bench_loader
from tokenlabel.bench import step as bench_step
from tokenlabel.bench.registry import register
from tokenlabel.dataloading import dali_pipeline

VARIANT = {"name": None}
_init = dali_pipeline.DaliBackend.__init__


def _patched_init(self, *args, **kw):
    _init(self, *args, **kw)
    if VARIANT["name"] is None or self.assist is None:
        return
    a = self.assist
    a.on = False
    a.probe = a.probe_first = a.probe_max = 10 ** 12
    if VARIANT["name"] == "hybrid":
        self.lanes_spec = ((0.0, self.lanes_spec[0][1]), self.lanes_spec[1])


dali_pipeline.DaliBackend.__init__ = _patched_init


def _variant(name, doc):
    def fn(case):
        VARIANT["name"] = name
        try:
            return bench_step._loader_fed(case, kernels=True, **bench_loader.HW_AUTO)
        finally:
            VARIANT["name"] = None
    fn.__doc__ = doc
    return fn


register("step", "x_auto_off_ours")(_variant("off", "auto, the engines' pipeline off from the start"))
register("step", "x_dispatch_hybrid_ours")(_variant("hybrid", "auto's dispatch with two hybrid lanes, lane 0 off"))

if __name__ == "__main__":
    from tokenlabel.cli import main

    sys.exit(main(["bench", "step", *sys.argv[1:]]))
