"""tokenlabel env: versions and the backend probes report what works, with reasons for what does not."""
import json
import subprocess
import sys

import pytest
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


def _libcuda():
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def test_set_cuda_sync_refuses_clearly():
    """An unknown mode names the valid ones; without a CUDA driver the error says that is what is missing."""
    with pytest.raises(ValueError, match="one of auto, spin, yield, blocking, got 'sleepy'"):
        E.set_cuda_sync("sleepy")
    if not _libcuda():
        with pytest.raises(RuntimeError, match=r"needs the CUDA driver \(libcuda.so.1\)"):
            E.set_cuda_sync("blocking")


@pytest.mark.gpu
def test_gpu_cuda_sync_blocking_takes_effect():
    """In a fresh process (the flag is per process): --cuda-sync blocking leaves the primary context on blocking
    sync (flag 4) once torch has used the GPU, and a GPU op still runs."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    code = ("import ctypes, torch\nfrom tokenlabel.env import set_cuda_sync\nset_cuda_sync('blocking')\n"
            "x = torch.ones(1000, device='cuda').sum().item()\n"
            "lib = ctypes.CDLL('libcuda.so.1'); dev = ctypes.c_int(); lib.cuDeviceGet(ctypes.byref(dev), 0)\n"
            "f, a = ctypes.c_uint(), ctypes.c_int(); lib.cuDevicePrimaryCtxGetState(dev, ctypes.byref(f), "
            "ctypes.byref(a))\nprint(int(x), f.value & 7, a.value)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1000", "4", "1"], r.stdout

