"""scripts/gpu_jobs: the GPU job scripts parse, and their shared `step` runner keeps to the job's time budget."""
import re
import subprocess
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parents[1] / "scripts" / "gpu_jobs"


@pytest.mark.parametrize("script", sorted(p.name for p in JOBS.glob("*.sh")))
def test_job_script_parses(script):
    subprocess.run(["bash", "-n", str(JOBS / script)], check=True)


def _steps(tmp_path, budget, body):
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "BUDGET": str(budget)}
    return subprocess.run(["bash", "-c", f"source {JOBS / 'common.sh'}; {body}"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def test_step_runs_logs_and_cuts_at_its_limit(tmp_path):
    r = _steps(tmp_path, 60, "step 5 a.txt echo hello; step 1 a.txt sleep 5")
    log = (tmp_path / "out" / "a.txt").read_text()
    assert "hello" in log and "rc=0" in log
    assert "rc=124" in log  # the sleep was stopped at its own 1 s limit
    assert (tmp_path / "out" / "machine.txt").exists()
    assert r.returncode == 0, r.stderr


def test_step_skips_when_the_budget_is_spent(tmp_path):
    _steps(tmp_path, 20, "step 5 b.txt echo never")  # under 25 s left: nothing starts
    log = (tmp_path / "out" / "b.txt").read_text()
    assert "SKIPPED" in log and "never" in log and "rc=" not in log


def test_jobs_need_an_output_folder(tmp_path):
    r = subprocess.run(["bash", "-c", f"source {JOBS / 'common.sh'}"], env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "OUT must name the output folder" in r.stderr


def test_jobs_name_registered_providers():
    """Every bench provider a job script names (`bench OP ... --providers a,b` / `--provider a` / FED="a b" /
    `fed_b a`, the latter three step providers) is registered for that op: a renamed provider would otherwise
    surface only on the GPU, as a lost call."""
    from tokenlabel.bench.registry import providers

    named = set()  # (op, provider)
    for script in JOBS.glob("*.sh"):
        text = script.read_text().replace("\\\n", " ")  # one line per command
        # the names a ${VAR:+,a,b} or ${VAR:-a,b} expansion may give (the job scripts' optional providers)
        text = re.sub(r"\$\{\w+:[+-]([\w,]+)\}", r"\1", text)
        for line in text.splitlines():
            op = re.search(r"\bbench\s+(\w+)", line)
            for m in re.finditer(r"--providers?\s+\"?([\w,$]+)", line):
                named.update((op.group(1) if op else "step", n) for n in m.group(1).split(",")
                             if not n.startswith("$"))
        for m in re.finditer(r"\$\{FED:-([^}]+)\}", text):
            named.update(("step", n) for n in m.group(1).split())
        named.update(("step", n) for n in re.findall(r"(?m)^\s*fed_b\s+(\w+)", text))  # common.sh's fed_b PROVIDER
    assert named, "no provider found in the job scripts"
    known = {(op, p.name) for op in {op for op, _ in named} for p in providers(op)}
    assert named <= known, sorted(named - known)
    assert ("attention", "triton_tma") in named and ("step", "compile_graphs_ours") in named
    assert ("step", "loader_fed_auto_ours") in named
