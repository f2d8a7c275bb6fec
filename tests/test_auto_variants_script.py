"""scripts/auto_variants.py (a GPU diagnosis of "auto"): its two step providers are registered, and its loaders are
"auto" with the engines' lane off for good, lane 0 on the hybrid path in the dispatch-only variant, only within
the variant's block."""
import contextlib
import importlib
import sys

import numpy as np
import pytest
from script_helpers import SCRIPTS
from test_loader_util import dali_or_skip, make_folder


def _script():
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module("auto_variants")


def test_variants(tmp_path, monkeypatch):
    dali_or_skip()
    av = _script()
    from tokenlabel.dataloading import dali_pipeline as dp

    direct = []
    real = dp._run_direct
    monkeypatch.setattr(dp, "_run_direct", lambda *a: direct.append(1) or real(*a))
    from tokenlabel.bench.registry import providers
    from tokenlabel.dataloading import build_loader

    names = {p.name for p in providers("step")}
    assert {"x_auto_off_ours", "x_dispatch_hybrid_ours"} <= names
    make_folder(str(tmp_path), np.random.default_rng(1))
    got = {}
    for variant in (None, "off", "hybrid"):
        with av.variant(variant) if variant else contextlib.nullcontext():
            loader = build_loader(str(tmp_path), backend="dali", device="cpu", num_workers=2, batch_size=3,
                                  image_size=24, hw_decoder_load="auto", dali_threads=(1, 2))
        loader.set_epoch(0)
        n = len(list(loader))
        be = loader.backend
        got[variant] = (be.assist.on, be.lanes_spec, be.lane_batches[0], n)
        loader.close()
    assert got[None][0] and got[None][1] == ((1.0, 1), (0.0, 2))
    assert not got["off"][0] and got["off"][1] == ((1.0, 1), (0.0, 2)) and got["off"][2] == 0
    assert not got["hybrid"][0] and got["hybrid"][1] == ((0.0, 1), (0.0, 2)) and got["hybrid"][2] == 0
    assert got[None][3] == got["off"][3] == got["hybrid"][3] > 0
    assert not direct  # the pumps delivered, as when the variants were measured


def test_variant_ends_with_its_block():
    av = _script()
    from tokenlabel.dataloading.dali_pipeline import DaliBackend

    before = DaliBackend.__init__
    with pytest.raises(RuntimeError, match="inside"):
        with av.variant("off"):
            assert DaliBackend.__init__ is not before
            raise RuntimeError("inside")
    assert DaliBackend.__init__ is before
