"""`tokenlabel bench ... --quick` end to end on the CPU (Triton interpreted), into a tmp --out."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tokenlabel.bench import results
from tokenlabel.cli import main


def test_bench_loss_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "res"
    status = main(["bench", "loss", "--quick", "--out", str(out), "--reps", "1", "--warmup", "0",
                   "--providers", "reference_eager,fused"])
    assert status == 0
    rows = results.read_rows(out / "loss.csv")
    by = {(r["provider"], r["metric"]): r for r in rows}
    # both providers were checked against the float64 reference and timed
    for prov in ("reference_eager", "fused"):
        assert ("status", prov) not in {(r["metric"], r["provider"]) for r in rows}, rows
        assert by[(prov, "ms")]["p50"] > 0
        assert by[(prov, "err_loss")]["p50"] <= 1e-4
        assert by[(prov, "err_grad_aux_logits")]["p50"] <= 1e-4
    assert by[("reference_eager", "speedup")]["p50"] == pytest.approx(1.0)
    assert by[("fused", "speedup")]["p50"] > 0
    assert by[("copy", "GB/s")]["p50"] > 0
    assert all(r["gpu"] == "cpu" and r["torch"] for r in rows)
    assert (out / "loss.png").stat().st_size > 0
    assert not (out / ".loss.partial.csv").exists()  # a completed run leaves no partial file
    text = capsys.readouterr().out
    assert "== loss" in text and "reference_eager *" in text

    # a second run compared against the first
    assert main(["bench", "loss", "--quick", "--out", str(tmp_path / "b"), "--reps", "1", "--warmup", "0",
                 "--providers", "reference_eager", "--no-plot", "--compare", str(out / "loss.csv")]) == 0
    text = capsys.readouterr().out
    assert "== compare" in text and "reference_eager" in text
    assert not (tmp_path / "b" / "loss.png").exists()


def test_bench_blocks_quick_end_to_end(tmp_path):
    """bench blocks: every provider checked against float64 (both kernels' outputs and gradients) and timed in
    all four modes, with GB/s from the bytes each mode must move."""
    out = tmp_path / "res"
    assert main(["bench", "blocks", "--quick", "--out", str(out), "--reps", "1", "--warmup", "0", "--no-plot",
                 "--providers", "eager,triton"]) == 0
    rows = results.read_rows(out / "blocks.csv")
    assert not [r for r in rows if r["metric"] == "status"], rows
    by = {(r["provider"], r["mode"], r["metric"]): r["p50"] for r in rows}
    for prov in ("eager", "triton"):
        for mode in ("add_ln fwd", "add_ln fwd+bwd", "gelu fwd", "gelu fwd+bwd"):
            assert by[(prov, mode, "ms")] > 0 and by[(prov, mode, "GB/s")] > 0, (prov, mode)
        errs = [r["p50"] for r in rows if r["provider"] == prov and r["metric"].startswith("err_")]
        assert len(errs) >= 10 and max(errs) <= 1e-4, errs


def test_bench_mlp_quick_end_to_end(tmp_path):
    """bench mlp: every provider checked against float64 (output and the four gradients) and timed forward and
    forward + backward, with TFLOP/s from the three Linears' GEMMs."""
    out = tmp_path / "res"
    assert main(["bench", "mlp", "--quick", "--out", str(out), "--reps", "1", "--warmup", "0", "--no-plot"]) == 0
    rows = results.read_rows(out / "mlp.csv")
    assert not [r for r in rows if r["metric"] == "status"], rows
    by = {(r["provider"], r["mode"], r["metric"]): r["p50"] for r in rows}
    for prov in ("ours", "fused", "fused_tma", "eager"):
        for mode in ("fwd", "fwd+bwd"):
            assert by[(prov, mode, "ms")] > 0 and by[(prov, mode, "TFLOP/s")] > 0, (prov, mode)
        errs = [r["p50"] for r in rows if r["provider"] == prov and r["metric"].startswith("err_")]
        assert len(errs) == 5 and max(errs) <= 1e-4, errs


def test_bench_run_cut_short_keeps_the_providers_that_ran(tmp_path, monkeypatch):
    """A run stopped during its second provider (as a device call's time limit stops it) leaves the first
    provider's rows in the hidden partial file, and no half-written results CSV."""
    from tokenlabel.bench import runner

    real, calls = runner.run_provider, []

    def run_provider(prov, *args, **kwargs):
        calls.append(prov.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("time limit")
        return real(prov, *args, **kwargs)

    monkeypatch.setattr(runner, "run_provider", run_provider)
    out = tmp_path / "res"
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "loss", "--quick", "--out", str(out), "--reps", "1", "--warmup", "0", "--no-plot",
              "--providers", "reference_eager,fused"])
    rows = results.read_rows(out / ".loss.partial.csv")
    assert {r["provider"] for r in rows} == {calls[0]}
    assert any(r["metric"] == "ms" and r["p50"] > 0 for r in rows)
    assert not (out / "loss.csv").exists()


def test_bench_bad_arguments(tmp_path, capsys):
    assert main(["bench", "loss", "--quick", "--out", str(tmp_path), "--providers", "nope"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert main(["bench", "loss", "--quick", "--out", str(tmp_path), "--shapes", "XL"]) == 2
    assert "--shapes" in capsys.readouterr().err
    assert main(["bench", "loss", "--quick", "--out", str(tmp_path), "--compare", str(tmp_path / "none.csv")]) == 2
    assert main(["bench", "all", "--list"]) == 0
    assert "(baseline)" in capsys.readouterr().out


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "tokenlabel", "bench", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--compare" in r.stdout and "--cudnn-benchmark" in r.stdout


def test_bench_step_loader_fed_quick_on_cpu(tmp_path):
    """bench step's loader_fed on the CPU (the PIL loader feeds the tiny step: a smoke run of the fed timing) writes
    the fed rows: the block means, the whole run's ms per step, and both data-wait shares."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "jpg" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "jpg" / c / f"{i}.jpg")
    out = tmp_path / "res"
    assert main(["bench", "step", "--quick", "--device", "cpu", "--out", str(out), "--reps", "3", "--warmup", "1",
                 "--no-plot", "--providers", "loader_fed", "--data", str(tmp_path / "jpg")]) == 0
    rows = results.read_rows(out / "step.csv")
    assert not [r for r in rows if r["metric"] == "status"], rows
    by = {r["metric"]: r for r in rows if r["provider"] == "loader_fed"}
    assert by["ms"]["p50"] > 0 and by["img/s"]["p50"] > 0
    # the whole run's rate: 3 timed steps (or more: at least one epoch) after the untimed ones
    assert by["ms_run"]["p50"] > 0 and "steps after" in by["ms_run"]["notes"]
    for metric in ("data_wait", "data_wait_gpu"):
        assert 0 <= by[metric]["p50"] <= 100, by[metric]
