"""scripts/lanes_sim.py: the loader's lane dispatch (the real _Dispatch / _pump code) with stand-in pipelines that
keep DALI's ordering rules. Checked here: every batch arrives once and in order whatever the lanes' speeds and the
reorder limit (1 included), both lanes take part when the window allows, the window stays within its limit, and
bad arguments are refused. (No timing is asserted: the script's numbers are its output.)"""
import importlib
import random
import sys
from pathlib import Path

import pytest


def _script():
    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module("lanes_sim")


@pytest.mark.parametrize("limit,prefetch", [(1, 2), (3, 1), (6, 2)])
def test_every_batch_once_in_order(limit, prefetch):
    sim = _script()
    slow = random.uniform(2.0, 4.0)
    r = sim.simulate(0.3, [(slow, 0.5), (1.0, 0.5)], limit, prefetch=prefetch, steps=40, warmup=4,
                     seed=random.randrange(1000))
    assert r["in_order"]
    assert sum(r["shares"]) == pytest.approx(100.0)
    assert r["deepest"] <= limit + 1
    if limit >= 2 * prefetch + 2:  # room for both lanes' prefetch: both deliver
        assert min(r["shares"]) > 0, r["shares"]


def test_bad_arguments(capsys):
    sim = _script()
    with pytest.raises(SystemExit):
        sim.main(["--step-ms", "5"])
    assert "--step-ms needs at least one --lane" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sim.main(["--step-ms", "5", "--lane", "fast"])
    assert "--lane expects MS[,JITTER], got 'fast'" in capsys.readouterr().err


def test_custom_scenario_prints_a_row(capsys):
    assert _script().main(["--step-ms", "0.2", "--lane", "1", "--lane", "2,0.2", "--limit", "4", "--steps", "20"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["scenario", "limit", "wait"] and out[1].startswith("custom") and len(out) == 2


def test_auto_switches_and_the_consumer_runs_the_hybrid_lane(monkeypatch):
    """--auto with the engines' lane slow beside a fast consumer: it is switched off and tried again, the consumer
    runs the other lane itself while it is off (the loader's _run_direct), and every batch still arrives once and in
    order across the hand-overs."""
    sim = _script()
    from tokenlabel.dataloading import dali_pipeline as dp

    monkeypatch.setattr(dp, "AUTO_SETTLE", 1)
    monkeypatch.setattr(dp, "AUTO_WINDOW", 4)
    monkeypatch.setattr(dp, "AUTO_MIN_SHARE", 0.9)
    monkeypatch.setattr(dp, "AUTO_PROBE", (6, 12))
    ran = []
    real = dp._run_direct

    def counted(lane, dispatch, position):
        ran.append(lane.index)
        return real(lane, dispatch, position)

    monkeypatch.setattr(dp, "_run_direct", counted)
    r = sim.simulate(0.2, [(3.0, 0.5), (0.5, 0.5)], 16, steps=120, warmup=4, seed=random.randrange(1000), auto=True)
    assert r["in_order"]
    on_share, switches = r["on"]
    assert switches >= 2 and 0 < on_share < 100, r["on"]
    assert ran and set(ran) == {1}, ran
