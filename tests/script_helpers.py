"""Helpers for the tests: scripts/ loaded as modules, and the kernels' ahead-of-time sm_90 builds."""
import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """scripts/<name>.py as a fresh module named ``name``."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sm90_builds(expr: str):
    """``expr`` evaluated in a subprocess without TRITON_INTERPRET (interpreted kernels do not compile), with
    ``add_layernorm``, ``batchnorm``, ``bias_gelu``, ``conv_wgrad`` and ``linear_gelu`` of tokenlabel.kernels
    imported: for their ``sm90_resources`` (ahead-of-time sm_90 builds by Triton's bundled ptxas, no GPU needed).
    Returns the value through JSON (dict keys become strings; each build is [registers, spilled stack bytes, shared
    bytes, cp.async copies])."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json\n"
            "from tokenlabel.kernels import add_layernorm, batchnorm, bias_gelu, conv_wgrad, linear_gelu\n"
            f"print(json.dumps({expr}))\n")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def within_sum_bound(got, want, terms, rel: float = 1e-5) -> bool:
    """fp32 ``got`` against float64 ``want`` for a sum over many rows (a bias or weight gradient), elementwise: within
    ``rel`` of the largest |want| (at least 1e-6), plus 4 fp32 units of ``terms``, the sum of the summed terms'
    magnitudes. A column whose terms cancel has an exact value far below that scale, where a bound relative to the
    largest exact value alone fails on correct fp32 rounding."""
    want = want.detach().double()
    err = (got.detach().double() - want).abs()
    return bool((err <= rel * want.abs().max().clamp_min(1e-6) + 4 * 2.0 ** -24 * terms).all())
