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
