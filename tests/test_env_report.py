"""tokenlabel env: versions and the backend probes report what works, with reasons for what does not."""
import json

import torch

from tokenlabel import env as E
from tokenlabel.cli import main


def test_env_json_report(capsys):
    assert main(["env", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    v = rep["versions"]
    assert v["torch"] == torch.__version__ and v["cuda_available"] == torch.cuda.is_available()
    works = rep["works"]
    # the Triton probe really compiles and runs a kernel: on the GPU, or here under the interpreter
    assert works["triton"]["ok"] is True, works["triton"]
    assert works["triton"]["mode"] == ("gpu" if torch.cuda.is_available() else "interpreter")
    for name in ("dali", "xformers"):
        assert works[name]["ok"] or works[name]["error"]  # a failure always says why
    assert works["sdpa"]["math"] == "ok"
    assert all(st == "ok" for st in works["imports"].values()), works["imports"]


def test_env_text_report(capsys):
    assert main(["env", "--no-probe"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and torch.__version__ in out and "what works" not in out


def test_xformers_probe_reports_a_reason():
    r = E.probe_xformers()
    assert set(r) <= {"ok", "error"} and (r["ok"] or len(r["error"]) > 5)
