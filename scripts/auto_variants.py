"""Diagnose what "auto" costs beside the step while its engines' pipeline is paused (a GPU experiment).

Registers two extra fed-step providers and runs ``tokenlabel bench step`` with the given arguments:

- ``x_auto_off_ours``: hw_decoder_load="auto" with the engines' pipeline switched off from the start and never
  tried: the lanes' dispatch (pump threads, the copy out synchronised in the pump) with the hybrid pipeline alone
  delivering, the engines' pipeline built and idle;
- ``x_dispatch_hybrid_ours``: the same with lane 0 built on the hybrid path too (no hardware-decoder instance):
  the dispatch alone.

Both keep the pump threads in between as the loader had them when this was measured (H100, 2026-12-06 06:08 UTC,
dataloading/NOTES.md): since then the consumer runs the hybrid pipeline itself while the engines are off
(``_Dispatch.direct``), which the variants' loaders do not do. Beside ``loader_fed_ours_deep`` (one pipeline, the
consumer runs it) and ``loader_fed_auto_ours`` in one call they say whether the cost is the dispatch, the idle
engines' pipeline, or the engines' tries.

    python scripts/auto_variants.py --providers loader_fed_ours_deep,x_auto_off_ours --data D --out DIR
"""
from __future__ import annotations

import contextlib
import sys

from tokenlabel.bench import loader as bench_loader
from tokenlabel.bench import step as bench_step
from tokenlabel.bench.registry import register
from tokenlabel.dataloading import dali_pipeline


@contextlib.contextmanager
def variant(name):
    """Within: every "auto" DALI loader built has its engines' lane off for good ("off"), and with "hybrid" lane 0
    built on the hybrid path too; the lanes' pump threads deliver (the consumer never runs a pipeline itself)."""
    init = dali_pipeline.DaliBackend.__init__

    def patched(self, *args, **kw):
        init(self, *args, **kw)
        if self.assist is None:
            return
        a = self.assist
        a.on = False
        a.probe = a.probe_first = a.probe_max = 10 ** 12
        if name == "hybrid":
            self.lanes_spec = ((0.0, self.lanes_spec[0][1]), self.lanes_spec[1])
        start = self._start_stream

        def pumps_only(*a):  # this loader's streams: no lane for the consumer to run (_Dispatch.direct)
            st = start(*a)
            st.dispatch.lanes = None
            return st
        self._start_stream = pumps_only

    dali_pipeline.DaliBackend.__init__ = patched
    try:
        yield
    finally:
        dali_pipeline.DaliBackend.__init__ = init


def _provider(name, doc):
    def fn(case):
        with variant(name):
            return bench_step._loader_fed(case, kernels=True, **bench_loader.HW_AUTO)
    fn.__doc__ = doc
    return fn


register("step", "x_auto_off_ours")(_provider("off", "auto, the engines' pipeline off from the start"))
register("step", "x_dispatch_hybrid_ours")(_provider("hybrid", "auto's dispatch with two hybrid lanes, lane 0 off"))

if __name__ == "__main__":
    from tokenlabel.cli import main

    sys.exit(main(["bench", "step", *sys.argv[1:]]))
