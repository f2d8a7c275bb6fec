"""scripts/sweep_rowkernels.py's search on the CPU (interpreted, small shapes, a stand-in timer): every candidate is
checked against torch before it counts, the search keeps what is faster, the dicts the kernels read end on the best
tiling, and a tiling that computes something else is never chosen."""
import csv
import io

import torch

from script_helpers import load_script
from tokenlabel.kernels import batchnorm as bn

TIMES = {  # the stand-in timer's ms for a config: acc2d and peel "faster", a 4-warp statistics kernel "fastest"
    "bn_fwd": lambda c: 1.0 - 0.3 * c["acc2d"] - 0.2 * c["peel"] - 0.5 * (c["stats_warps"] == 4),
    "bn_bwd": lambda c: 1.0 - 0.3 * c["acc2d"] - 0.1 * (c["sums_elems"] == 256),
}


def test_bn_sweeps_check_every_candidate_and_keep_the_fastest(monkeypatch):
    sw = load_script("sweep_rowkernels")
    monkeypatch.setattr(sw, "DEVICE", "cpu")
    monkeypatch.setattr(sw, "STEM", (2, 16, 6, 5))
    saved = {name: dict(getattr(bn, name)) for name in ("STATS", "APPLY", "BWD_SUMS", "BWD_APPLY")}
    monkeypatch.setitem(sw.SPACES, "bn_fwd", (None, dict(acc2d=[False, True], peel=[False, True], stats_warps=[4, 8])))
    monkeypatch.setitem(sw.SPACES, "bn_bwd", (None, dict(acc2d=[False, True], sums_elems=[256, 8192])))
    monkeypatch.setitem(sw.SEEDS, "bn_fwd", [])
    monkeypatch.setitem(sw.SEEDS, "bn_bwd", [])
    real_fwd = bn.bn_relu_forward

    def fwd(*args):  # the 4-warp statistics kernel computes something else: it must never be chosen
        out, mean, invstd = real_fwd(*args)
        return (out * 1.5 if bn.STATS["warps"] == 4 else out), mean, invstd

    monkeypatch.setattr(bn, "bn_relu_forward", fwd)
    current = []

    def timer(call, **kw):
        call()
        return TIMES[current[-1]](sw._get(current[-1]))

    monkeypatch.setattr(sw.triton.testing, "do_bench_cudagraph", timer)
    out = io.StringIO()
    w = csv.writer(out)
    gen = torch.Generator().manual_seed(0)
    try:
        current.append("bn_fwd")
        cfg_f, ms_f = sw.sweep("bn_fwd", 0, 0, 0, 1, w, gen)
        current.append("bn_bwd")
        cfg_b, ms_b = sw.sweep("bn_bwd", 0, 0, 0, 1, w, gen)
        tiled = dict(stats=dict(bn.STATS), apply=dict(bn.APPLY), sums=dict(bn.BWD_SUMS))
    finally:
        for name, d in saved.items():  # the sweep writes the kernels' own dicts: put them back
            getattr(bn, name).clear()
            getattr(bn, name).update(d)
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert (cfg_f["acc2d"], cfg_f["peel"], cfg_f["stats_warps"]) == (True, True, 8), cfg_f
    assert abs(ms_f - 0.5) < 1e-9
    assert (tiled["stats"]["acc2d"], tiled["apply"]["peel"], tiled["stats"]["warps"]) == (True, True, 8), tiled
    assert any(r[-1] == "disagrees with torch" for r in rows if '"stats_warps": 4' in r[4]), rows
    assert (cfg_b["acc2d"], cfg_b["sums_elems"]) == (True, 256) and tiled["sums"]["elems"] == 256, cfg_b
    assert abs(ms_b - 0.6) < 1e-9 and all(r[-1] == "" for r in rows if r[0] == "bn_bwd"), rows


def test_conv1_wgrad_sweep_times_cudnn_and_keeps_the_fastest_correct_tiling(monkeypatch):
    """The conv1_wgrad kind: cuDNN's weight gradient timed first (a row of its own), then the tilings, each checked
    against torch; one that computes something else (per_sm 2 here) is recorded and never chosen."""
    from tokenlabel.kernels import conv_wgrad as cw

    sw = load_script("sweep_rowkernels")
    monkeypatch.setattr(sw, "DEVICE", "cpu")
    monkeypatch.setattr(sw, "CONV1", (2, 3, 7, 9, 2))
    monkeypatch.setitem(sw.SPACES, "conv1_wgrad", (cw.TILING, dict(block_x=[16, 32], per_sm=[1, 2], warps=[4])))
    monkeypatch.setitem(sw.SEEDS, "conv1_wgrad", [])
    saved = dict(cw.TILING)
    cw.TILING.update(block_x=32, per_sm=1, warps=4)  # the start: inside the space, not the answer (the defaults may be)
    real = cw.conv_weight_grad
    monkeypatch.setattr(cw, "conv_weight_grad",
                        lambda *a: real(*a) * (1.5 if cw.TILING["per_sm"] == 2 else 1.0))
    timer = lambda call, **kw: (call(), 1.0 - 0.2 * (cw.TILING["block_x"] == 16)  # noqa: E731
                                - 0.5 * (cw.TILING["per_sm"] == 2))[1]
    monkeypatch.setattr(sw.triton.testing, "do_bench_cudagraph", timer)
    out = io.StringIO()
    try:
        cfg, ms = sw.sweep("conv1_wgrad", 0, 0, 0, 1, csv.writer(out), torch.Generator().manual_seed(0))
        tiled = dict(cw.TILING)
    finally:
        cw.TILING.clear()
        cw.TILING.update(saved)
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert rows[0][4].startswith("cuDNN (benchmark "), rows
    assert (cfg["block_x"], cfg["per_sm"]) == (16, 1) == (tiled["block_x"], tiled["per_sm"]), cfg
    assert abs(ms - 0.8) < 1e-9
    assert any(r[-1] == "disagrees with torch" for r in rows if '"per_sm": 2' in r[4]), rows


def test_apply_sets_an_earlier_runs_best_tilings(tmp_path, monkeypatch):
    """--apply best.json sets the measured kinds' tilings (a kind that measured nothing keeps its own) and then runs
    the command after --; a file from another version (unknown keys) or an unreadable one is refused by name."""
    import json

    import pytest

    from tokenlabel.kernels import bias_gelu as bg
    from tokenlabel.kernels import conv_wgrad as cw

    sw = load_script("sweep_rowkernels")
    saved = dict(cw.TILING), dict(bg.BWD), dict(bn.STATS)
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"gpu": "H200", "conv1_wgrad": {"config": {**cw.TILING, "block_x": 64}, "us": 120.0},
                                "gelu_bwd": {"config": {**bg.BWD, "cdf": "erfcx"}, "us": 41.0},
                                "bn_fwd": {"config": {**sw._get("bn_fwd"), "acc2d": True}, "us": float("inf")}}))
    ran = []
    monkeypatch.setattr("tokenlabel.cli.main", lambda argv: ran.append(argv) or 0)
    try:
        assert sw.main(["--apply", str(path), "--", "env", "--no-probe"]) == 0
        assert cw.TILING["block_x"] == 64 and bg.BWD["cdf"] == "erfcx"
        assert bn.STATS["acc2d"] is saved[2]["acc2d"]  # nothing measured for bn_fwd: left as it was
        assert ran == [["env", "--no-probe"]]
        path.write_text(json.dumps({"gelu_fwd": {"config": {"tile": 3}, "us": 1.0}}))
        with pytest.raises(SystemExit, match=r"gelu_fwd has keys this version does not know: \['tile'\]"):
            sw.main(["--apply", str(path)])
        with pytest.raises(SystemExit, match="--apply .*nope.json"):
            sw.main(["--apply", str(tmp_path / "nope.json")])
    finally:
        for d, old in zip((cw.TILING, bg.BWD, bn.STATS), saved):
            d.clear()
            d.update(old)
