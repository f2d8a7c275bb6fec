"""An interrupted run continues exactly: same per-step losses and final weights as an uninterrupted one."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_train_helpers import make_data, make_store, read_csv, tiny_args, train_relpaths
from tokenlabel.cli import main


def _weights(path):
    ck = torch.load(path, map_location="cpu", weights_only=True)
    return ck["state_dict"], ck["state_dict_ema"], ck["train_state"]


def _assert_same_run(a, b):
    la, lb = read_csv(a / "steps.csv"), read_csv(b / "steps.csv")
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-5, abs=1e-6), (ra, rb)
        assert float(ra["lr"]) == pytest.approx(float(rb["lr"]), rel=1e-6)
    wa, ea, sa = _weights(a / "last.pt")
    wb, eb, sb = _weights(b / "last.pt")
    assert sa["global_step"] == sb["global_step"] and sa["epoch"] == sb["epoch"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
        torch.testing.assert_close(ea[k], eb[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"ema {k}: {m}")
    sa_rows, sb_rows = read_csv(a / "summary.csv"), read_csv(b / "summary.csv")
    assert [(r["epoch"], r["top1"], r["ema_top1"]) for r in sa_rows] == \
        [(r["epoch"], r["top1"], r["ema_top1"]) for r in sb_rows]
    assert [float(r["train_loss"]) for r in sa_rows] == pytest.approx([float(r["train_loss"]) for r in sb_rows],
                                                                      rel=1e-5)


@pytest.mark.parametrize("with_labels", [False, True], ids=["class-labels", "token-labels"])
def test_resume_mid_epoch_matches_uninterrupted(tmp_path, with_labels, monkeypatch):
    data = make_data(tmp_path / "data")
    extra = []
    if with_labels:
        # The loss's eager path (the Triton kernel under the interpreter is tested by the kernel tests and
        # by test_train_cli's token-label run; here it would only slow the 32 steps down).
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        extra = ["--labels", make_store(tmp_path / "store", train_relpaths(data), num_classes=4)]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(tiny_args(data, full, *extra)) == 0
    # 8 steps per epoch: stop inside epoch 1, then inside epoch 2, then finish.
    # periodic saves (--save-every-steps) along the way must not disturb anything either
    assert main(tiny_args(data, split, *extra, "--max-steps", 5, "--save-every-steps", 2)) == 0
    st = _weights(split / "last.pt")[2]
    assert (st["epoch"], st["samples_in_epoch"], st["global_step"]) == (0, 20, 5)
    assert main(tiny_args(data, split, *extra, "--max-steps", 6, "--resume", "auto")) == 0
    assert _weights(split / "last.pt")[2]["global_step"] == 11
    assert main(tiny_args(data, split, *extra, "--resume", "auto")) == 0
    _assert_same_run(full, split)
    # a finished run given --resume auto again has nothing to do and leaves the checkpoint alone
    before = (split / "last.pt").stat().st_mtime_ns
    assert main(tiny_args(data, split, *extra, "--resume", "auto")) == 0
    assert (split / "last.pt").stat().st_mtime_ns == before


def test_sigterm_saves_position_and_exits_zero(tmp_path):
    data = make_data(tmp_path / "data")
    out = tmp_path / "run"
    args = tiny_args(data, out, "--log-every", 1, epochs=2)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "tokenlabel", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        lines.append(line)
        if " step 2/" in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(lines)
    rest, _ = proc.communicate(timeout=120)
    text = "".join(lines) + rest
    assert proc.returncode == 0, text
    assert "stopped (SIGTERM)" in text and "--resume auto" in text, text
    st = _weights(out / "last.pt")[2]
    assert st["samples_in_epoch"] > 0 and not st["finished_epoch"]
    steps_done = st["global_step"]
    assert main(args + ["--resume", "auto"]) == 0
    rows = read_csv(out / "steps.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 2 * 8 + 1)), "a step was lost or repeated"
    assert steps_done < 2 * 8
    assert len(read_csv(out / "summary.csv")) == 2


def test_time_limit_stops_after_the_running_step(tmp_path):
    data = make_data(tmp_path / "data")
    out = tmp_path / "run"
    assert main(tiny_args(data, out, "--time-limit", 1e-6)) == 0
    st = _weights(out / "last.pt")[2]
    assert (st["global_step"], st["samples_in_epoch"], st["epoch"]) == (1, 4, 0)
    assert len(read_csv(out / "steps.csv")) == 1 and not (out / "summary.csv").exists()


def test_resume_with_our_kernels_matches_uninterrupted(tmp_path, monkeypatch):
    """Our four kernels (attention, stem BatchNorm, residual + LayerNorm, bias + GELU; interpreted here, on CUDA on
    the GPU): a run interrupted mid-epoch and resumed repeats the uninterrupted one, losses and weights."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    data = make_data(tmp_path / "data")
    kernels = ("--attn", "triton", "--stem-bn", "triton", "--residual-norm", "triton", "--gelu", "triton",
               "--amp", "fp32")
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(tiny_args(data, full, *kernels, epochs=1)) == 0
    assert main(tiny_args(data, split, *kernels, "--max-steps", 3, epochs=1)) == 0
    assert main(tiny_args(data, split, *kernels, "--resume", "auto", epochs=1)) == 0
    _assert_same_run(full, split)
