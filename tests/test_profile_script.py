"""scripts/profile_train.py: a short CPU run under the profiler leaves a trace whose analysis finds the
recorded steps and the labelled loader parts; bad arguments and traces are refused with a message."""
import json

import pytest

from script_helpers import load_script
from test_train_helpers import make_data, tiny_args


def _script():
    return load_script("profile_train")


def test_profile_then_analyze(tmp_path, capsys):
    pt = _script()
    from tokenlabel import train as T
    from tokenlabel.dataloading import loader as L

    before = (T.Trainer.step, T.compute_loss, L.Loader.__iter__, L.finish_batch)
    data = make_data(tmp_path / "data")
    args = tiny_args(data, tmp_path / "run", "--max-steps", 7)[1:]   # without the "train" word
    assert pt.main(["--out", str(tmp_path / "prof"), "--start", "1", "--steps", "2", "--", *args]) == 0
    # the labels are gone again
    assert (T.Trainer.step, T.compute_loss, L.Loader.__iter__, L.finish_batch) == before
    trace = tmp_path / "prof" / "trace.json.gz"
    assert trace.is_file() and (tmp_path / "prof" / "prof_table.txt").is_file()
    r = pt.analyze(trace)
    assert r["labels"]["TL::step"]["n"] == 2            # steps 4 and 5 of 7 (1 skipped, 3 warm-up)
    assert r["labels"]["TL::loss"]["n"] == 2
    assert r["labels"]["TL::next"]["n"] >= 2 and r["labels"]["TL::finish_batch"]["n"] >= 2
    assert r["step_children"] and r["gaps"] == []       # no GPU streams on the CPU
    capsys.readouterr()
    assert pt.main(["--analyze", str(trace)]) == 0
    assert "TL::step" in capsys.readouterr().out
    kept = trace.read_bytes()
    with pytest.raises(SystemExit):  # the same --out again: refused, the earlier trace stays
        pt.main(["--out", str(tmp_path / "prof"), "--start", "1", "--steps", "2", "--", *args])
    assert "is not an empty folder" in capsys.readouterr().err and trace.read_bytes() == kept


def test_profile_refusals(tmp_path, capsys):
    pt = _script()
    with pytest.raises(SystemExit):
        pt.main(["--out", str(tmp_path)])                 # no train arguments
    with pytest.raises(SystemExit):
        pt.main(["--out", str(tmp_path), "--steps", "0", "--", "--epochs", "1"])
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"traceEvents": [{"ph": "X", "name": "x", "tid": 1, "ts": 0, "dur": 1}]}))
    with pytest.raises(ValueError, match="no TL::step events"):
        pt.analyze(bad)
    # a run shorter than the recording window: no trace, a message, a failing status
    data = make_data(tmp_path / "data")
    args = tiny_args(data, tmp_path / "run", "--max-steps", 2)[1:]
    assert pt.main(["--out", str(tmp_path / "p2"), "--start", "5", "--steps", "2", "--", *args]) != 0
    assert "no trace" in capsys.readouterr().err
    assert not (tmp_path / "p2" / "trace.json.gz").exists()
