"""tokenlabel train on a CUDA GPU (run with `pytest -m gpu`): DALI loader, bf16, fused loss, compile,
exact resume, and the out-of-memory message."""
import pytest
import torch

from test_train_helpers import make_data, make_store, read_csv, tiny_args, train_relpaths
from tokenlabel.cli import main

pytestmark = pytest.mark.gpu


def _gpu_args(data, out, *extra, loader="dali"):
    a = tiny_args(data, out, *extra)
    a[a.index("--loader") + 1] = loader
    a[a.index("--workers") + 1] = "2"
    a[a.index("--attn") + 1] = "auto"
    return a


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_gpu_token_label_run_bf16(tmp_path, loader):
    data = make_data(tmp_path / "data")
    store = make_store(tmp_path / "store", train_relpaths(data), num_classes=4)
    out = tmp_path / "run"
    torch.backends.cudnn.benchmark = False
    assert main(_gpu_args(data, out, "--labels", store, "--amp", "bf16", loader=loader)) == 0
    rows = read_csv(out / "summary.csv")
    assert len(rows) == 2 and all(float(r["train_loss"]) > 0 for r in rows)
    assert torch.backends.cudnn.benchmark is False  # on during the run (the default), the caller's value after


@pytest.mark.parametrize("mode", [None, "reduce-overhead", "max-autotune"])
def test_gpu_compile_run(tmp_path, mode):
    data = make_data(tmp_path / "data")
    store = make_store(tmp_path / "store", train_relpaths(data), num_classes=4)
    extra = ("--compile-mode", mode) if mode else ()
    out = tmp_path / "run"
    assert main(_gpu_args(data, out, "--labels", store, "--compile", "--epochs", 2, *extra, loader="torch")) == 0
    rows = read_csv(out / "summary.csv")
    assert len(rows) == 2 and all(float(r["train_loss"]) > 0 for r in rows)


def test_gpu_combo_kernels_match_plain_compile_fp32(tmp_path):
    """--combo-kernels launches inductor's independent kernels together: the same steps, the same losses as the
    compiled run without it (CUDA graphs both, fp32)."""
    data = make_data(tmp_path / "data")
    store = make_store(tmp_path / "store", train_relpaths(data), num_classes=4)
    common = ("--labels", store, "--amp", "fp32", "--compile", "--compile-mode", "reduce-overhead")
    plain, combo = tmp_path / "plain", tmp_path / "combo"
    assert main(_gpu_args(data, plain, *common, loader="torch")) == 0
    assert main(_gpu_args(data, combo, *common, "--combo-kernels", loader="torch")) == 0
    la, lb = read_csv(plain / "steps.csv"), read_csv(combo / "steps.csv")
    assert len(la) > 0 and [r["step"] for r in la] == [r["step"] for r in lb]
    assert [float(r["loss"]) for r in lb] == pytest.approx([float(r["loss"]) for r in la], rel=1e-3, abs=1e-4)


def test_gpu_resume_matches_uninterrupted_fp32(tmp_path):
    data = make_data(tmp_path / "data")
    store = make_store(tmp_path / "store", train_relpaths(data), num_classes=4)
    full, split = tmp_path / "full", tmp_path / "split"
    common = ("--labels", store, "--amp", "fp32")
    assert main(_gpu_args(data, full, *common)) == 0
    assert main(_gpu_args(data, split, *common, "--max-steps", 5)) == 0
    assert main(_gpu_args(data, split, *common, "--resume", "auto")) == 0
    la, lb = read_csv(full / "steps.csv"), read_csv(split / "steps.csv")
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    assert [float(r["loss"]) for r in la] == pytest.approx([float(r["loss"]) for r in lb], rel=1e-3, abs=1e-4)


def test_gpu_out_of_memory_message(tmp_path):
    """LV-ViT-L at 1024 px (4096 tokens): about 2 GB of activations per image, so 128 images per batch
    cannot fit on an 80 or 141 GB GPU; the run must say so and name a batch size that fits."""
    data = make_data(tmp_path / "data", per_class=32)  # 128 training images: one batch of 128
    args = ["train", "--data", str(data), "--output", str(tmp_path / "o"), "--model", "lvvit_l", "--img-size", "1024",
            "--batch-size", "128", "--epochs", "1", "--loader", "torch", "--workers", "2", "--amp", "bf16",
            "--attn", "sdpa"]
    with pytest.raises(SystemExit) as ei:
        main(args)
    msg = str(ei.value)
    assert "out of memory" in msg and "--batch-size 128" in msg and "fits in a probe step" in msg, msg
    assert not (tmp_path / "o" / "last.pt").exists()


def test_gpu_torchrun_one_process_takes_the_ddp_path(tmp_path):
    import os
    import subprocess
    import sys

    data = make_data(tmp_path / "data")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "tokenlabel",
           *_gpu_args(data, out, "--epochs", 1)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "DDP" in res.stdout and len(read_csv(out / "summary.csv")) == 1


def test_gpu_cuda_sync_blocking_run(tmp_path):
    """--cuda-sync blocking (a fresh process: the flag is set before CUDA starts): the run completes and records
    the mode."""
    import subprocess
    import sys

    import yaml

    data = make_data(tmp_path / "data")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tokenlabel", *_gpu_args(data, out, "--epochs", 1, "--cuda-sync", "blocking",
                                                         loader="torch")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["cuda_sync"] == "blocking"
    assert len(read_csv(out / "summary.csv")) == 1


KERNELS = ("--attn", "triton", "--stem-bn", "auto", "--residual-norm", "auto", "--gelu", "auto")


def test_gpu_our_kernels_resume_matches_uninterrupted_fp32(tmp_path):
    """Our four kernels (attention, stem BatchNorm, residual + LayerNorm, bias + GELU; "auto" resolves to them on
    CUDA and the run records that): an interrupted and resumed run repeats the uninterrupted one's losses."""
    import yaml

    data = make_data(tmp_path / "data")
    store = make_store(tmp_path / "store", train_relpaths(data), num_classes=4)
    full, split = tmp_path / "full", tmp_path / "split"
    common = ("--labels", store, "--amp", "fp32", *KERNELS)
    assert main(_gpu_args(data, full, *common, loader="torch")) == 0
    cfg = yaml.safe_load((full / "config.yaml").read_text())
    assert (cfg["attn"], cfg["stem_bn"], cfg["residual_norm"], cfg["gelu"]) == ("triton",) * 4
    assert main(_gpu_args(data, split, *common, "--max-steps", 5, loader="torch")) == 0
    assert main(_gpu_args(data, split, *common, "--resume", "auto", loader="torch")) == 0
    la, lb = read_csv(full / "steps.csv"), read_csv(split / "steps.csv")
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    assert [float(r["loss"]) for r in la] == pytest.approx([float(r["loss"]) for r in lb], rel=1e-3, abs=1e-4)


def test_gpu_our_kernels_compiled_cuda_graphs_bf16(tmp_path):
    """The measured-fastest setting (our kernels, torch.compile reduce-overhead, bf16) trains two epochs with token
    labels: finite, positive losses."""
    data = make_data(tmp_path / "data")
    store = make_store(tmp_path / "store", train_relpaths(data), num_classes=4)
    out = tmp_path / "run"
    args = _gpu_args(data, out, "--labels", store, "--amp", "bf16", "--compile", "--compile-mode", "reduce-overhead",
                     *KERNELS, loader="torch")
    assert main(args) == 0
    rows = read_csv(out / "summary.csv")
    assert len(rows) == 2 and all(0 < float(r["train_loss"]) < float("inf") for r in rows)
