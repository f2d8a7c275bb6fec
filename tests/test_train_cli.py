"""tokenlabel train: config precedence, the loss pieces, token-label and teacher runs, fine-tuning, bad input."""
import json
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from test_train_helpers import make_data, make_store, read_csv, tiny_args, train_relpaths
from tokenlabel import train as T
from tokenlabel.cli import build_parser, main


def _cfg(argv):
    return T.resolve_config(build_parser(argv).parse_args(argv))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


# ------------------------------------------------------------------ config
def test_config_file_then_cli_precedence(tmp_path):
    (tmp_path / "c.yaml").write_text("model: lvvit_s\nepochs: 7\nlr: 0.01\nmodel_kwargs: {depth: 3}\nmix_token: false\n")
    cfg = _cfg(["train", "--data", "d", "--config", str(tmp_path / "c.yaml"), "--epochs", "9",
                "--model-kwargs", "embed_dim=48", "--model-kwargs", "num_heads=2"])
    assert cfg["epochs"] == 9 and cfg["lr"] == 0.01 and cfg["model"] == "lvvit_s" and cfg["mix_token"] is False
    assert cfg["model_kwargs"] == {"depth": 3, "embed_dim": 48, "num_heads": 2}
    assert cfg["weight_decay"] == 0.05 and cfg["smoothing"] == 0.1  # defaults
    (tmp_path / "c.json").write_text(json.dumps({"batch-size": 12, "mix_token": True}))
    cfg = _cfg(["train", "--data", "d", "--config", str(tmp_path / "c.json"), "--no-mix-token"])
    assert cfg["batch_size"] == 12 and cfg["mix_token"] is False
    # cuDNN's algorithm timing: on by default (as the reference's script sets it), off from a file or the line
    assert cfg["cudnn_benchmark"] is True
    (tmp_path / "n.yaml").write_text("cudnn_benchmark: false\n")
    assert _cfg(["train", "--data", "d", "--config", str(tmp_path / "n.yaml")])["cudnn_benchmark"] is False
    assert _cfg(["train", "--data", "d", "--config", str(tmp_path / "n.yaml"),
                 "--cudnn-benchmark"])["cudnn_benchmark"] is True
    assert _cfg(["train", "--data", "d", "--no-cudnn-benchmark"])["cudnn_benchmark"] is False
    assert cfg["cuda_sync"] == "auto" and _cfg(["train", "--data", "d", "--cuda-sync", "blocking"])["cuda_sync"] == \
        "blocking"


def test_cuda_sync_refused_without_cuda_or_with_a_bad_value(monkeypatch):
    """--cuda-sync must be set before CUDA starts, on a GPU; without one, or with a value no mode has (from a
    config file), the run stops at once and says why."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--cuda-sync blocking needs CUDA"):
        T.apply_cuda_sync("blocking")
    with pytest.raises(SystemExit, match="--cuda-sync 'sleepy': valid values are auto, spin, yield, blocking"):
        T.apply_cuda_sync("sleepy")
    with pytest.raises(SystemExit, match="needs CUDA"):
        main(["train", "--data", "d", "--cuda-sync", "yield"])


def test_config_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    with pytest.raises(SystemExit, match="unknown options.*epochz"):
        _cfg(["train", "--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(SystemExit, match="no such file"):
        _cfg(["train", "--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):  # argparse: not key=value
        _cfg(["train", "--model-kwargs", "depth"])
    with pytest.raises(SystemExit, match="--compile-mode reduce-overhead needs --compile"):
        _cfg(["train", "--data", "d", "--compile-mode", "reduce-overhead"])
    (tmp_path / "m.yaml").write_text("compile: true\ncompile_mode: fast\n")
    with pytest.raises(SystemExit, match="valid modes are default, reduce-overhead"):
        _cfg(["train", "--data", "d", "--config", str(tmp_path / "m.yaml")])
    cfg = _cfg(["train", "--data", "d", "--compile", "--compile-mode", "reduce-overhead"])
    assert cfg["compile"] is True and cfg["compile_mode"] == "reduce-overhead"
    with pytest.raises(SystemExit, match="--combo-kernels needs --compile"):
        _cfg(["train", "--data", "d", "--combo-kernels"])


def test_compile_kwargs_mode_or_options_with_combo_kernels():
    """torch.compile takes a mode or options, not both: with --combo-kernels the mode's own inductor options travel
    with the combo kernels' (reduce-overhead's CUDA graphs stay on), without it the mode alone."""
    cfg = _cfg(["train", "--data", "d", "--compile", "--compile-mode", "reduce-overhead"])
    assert cfg["combo_kernels"] is False and T.compile_kwargs(cfg) == {"mode": "reduce-overhead"}
    cfg = _cfg(["train", "--data", "d", "--compile", "--compile-mode", "reduce-overhead", "--combo-kernels"])
    assert T.compile_kwargs(cfg) == {"options": {"triton.cudagraphs": True, "combo_kernels": True,
                                                 "benchmark_combo_kernel": True}}
    assert T.uses_cuda_graphs(cfg)
    cfg = _cfg(["train", "--data", "d", "--compile", "--combo-kernels"])
    assert T.compile_kwargs(cfg) == {"options": {"combo_kernels": True, "benchmark_combo_kernel": True}}
    assert T.compile_kwargs(_cfg(["train", "--data", "d", "--compile"])) == {"mode": None}


@pytest.mark.parametrize("mode,graphs", [(None, False), ("default", False), ("reduce-overhead", True),
                                         ("max-autotune", True), ("max-autotune-no-cudagraphs", False)])
def test_uses_cuda_graphs_follows_the_compile_mode(mode, graphs):
    """Every mode whose inductor options replay CUDA graphs makes each step start a new graph iteration."""
    args = ["train", "--data", "d", "--compile"] + (["--compile-mode", mode] if mode else [])
    assert T.uses_cuda_graphs(_cfg(args)) is graphs
    assert T.uses_cuda_graphs(_cfg(["train", "--data", "d"])) is False


def test_gpu_only_attention_refused_without_cuda(monkeypatch):
    """--attn triton / xformers on a machine without CUDA: refused at start-up, naming what runs instead (the
    interpreter lets triton through, for tests)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for attn in ("triton", "xformers"):
        with pytest.raises(SystemExit, match=f"--attn {attn} runs on CUDA GPUs only.*--attn sdpa"):
            _cfg(["train", "--data", "d", "--attn", attn])
    assert _cfg(["train", "--data", "d", "--attn", "sdpa"])["attn"] == "sdpa"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _cfg(["train", "--data", "d", "--attn", "triton"])["attn"] == "triton"


def test_kernel_switches_refused_without_cuda(monkeypatch):
    """--stem-bn / --residual-norm / --gelu / --conv1-wgrad triton without CUDA: refused at start-up, naming the torch
    path."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for flag in ("--stem-bn", "--residual-norm", "--gelu", "--conv1-wgrad"):
        with pytest.raises(SystemExit, match=f"{flag} triton runs on CUDA GPUs only.*{flag} torch"):
            _cfg(["train", "--data", "d", flag, "triton"])
    cfg = _cfg(["train", "--data", "d", "--model", "lvvit_t"])
    assert cfg["stem_bn"] == cfg["residual_norm"] == cfg["gelu"] == cfg["conv1_wgrad"] == "auto"  # torch here, at build
    stem = T.build_model(cfg, 3).patch_embed
    assert (stem.bn_impl, stem.conv1_wgrad_impl) == ("torch", "cudnn")
    assert cfg["stem_bn"] == cfg["conv1_wgrad"] == "torch"


def test_kernel_switches_reach_the_model(tmp_path, data):
    """--stem-bn triton --residual-norm triton --gelu triton --conv1-wgrad triton (interpreted here): one training
    step runs with all four, and a non-LV-ViT model refuses them."""
    out = tmp_path / "k"
    args = tiny_args(data, out, "--max-steps", 1, "--stem-bn", "triton", "--residual-norm", "triton", "--gelu",
                     "triton", "--conv1-wgrad", "triton")
    cfg = _cfg(args)
    model = T.build_model(cfg, 3)
    assert model.patch_embed.bn_impl == model.residual_norm_impl == model.gelu_impl == "triton"
    assert model.patch_embed.conv1_wgrad_impl == "triton"
    assert main(args) == 0
    with pytest.raises(SystemExit, match="apply to LV-ViT models"):
        T.build_model(_cfg(["train", "--data", "d", "--model", "resnet_tiny", "--img-size", "32",
                            "--residual-norm", "triton"]), 3)


def test_kernel_switches_auto_resolve_per_model_and_device(monkeypatch):
    """"auto": our kernels for an LV-ViT model on CUDA, the torch modules without CUDA (never the interpreter) and
    for other models, which then train as they would with torch; the resolved choice is what the run records."""
    argv = ["train", "--data", "d", "--img-size", "32", "--stem-bn", "auto", "--residual-norm", "auto", "--gelu",
            "auto", "--conv1-wgrad", "auto"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for cuda, model, want in ((False, "lvvit_t", "torch"), (True, "resnet_tiny", "torch"), (True, "lvvit_t", "triton")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        cfg = _cfg(argv + ["--model", model])
        built = T.build_model(cfg, 3)
        assert cfg["stem_bn"] == cfg["residual_norm"] == cfg["gelu"] == cfg["conv1_wgrad"] == want, (cuda, model)
        if model == "lvvit_t":
            assert built.patch_embed.bn_impl == built.residual_norm_impl == built.gelu_impl == want
            assert built.patch_embed.conv1_wgrad_impl == {"torch": "cudnn", "triton": "triton"}[want]
    ns = build_parser(["train", "--data", "d"]).parse_args(["train", "--data", "d"])
    ns.gelu = "fast"  # as a config file could have it
    with pytest.raises(SystemExit, match="--gelu 'fast': valid values are torch, triton, auto"):
        T.resolve_config(ns)


def test_demo_defaults_only_without_data():
    cfg = _cfg(["train"])
    assert cfg["model"] == "lvvit_t" and cfg["img_size"] == 32 and cfg["model_kwargs"]
    cfg = _cfg(["train", "--model", "lvvit_s"])  # the demo's architecture overrides belong to its model
    assert cfg["model_kwargs"] == {}
    cfg = _cfg(["train", "--data", "somewhere"])
    assert cfg["model"] == "lvvit_s" and cfg["img_size"] == 224 and cfg["epochs"] == 300


def test_shipped_configs_parse():
    from pathlib import Path

    folder = Path(T.__file__).parent / "configs"
    names = sorted(p.name for p in folder.glob("*.yaml"))
    assert {"lvvit_s.yaml", "cifar_teacher.yaml", "cifar_student.yaml"} <= set(names)
    for n in names:
        cfg = _cfg(["train", "--data", "d", "--config", str(folder / n)])
        assert cfg["model"] and cfg["epochs"] >= 1


# ------------------------------------------------------------------ schedule, groups, EMA, baseline loss
def test_cosine_schedule_warmup_and_end(gen):
    lr, lo, w = 1e-3, 1e-5, 2.0
    s = T.CosineSchedule(lr, lo, 1e-6, w, 10)
    assert s(0.0) == pytest.approx(1e-6)
    assert s(1.0) == pytest.approx((1e-6 + lr) / 2)
    assert s(w) == pytest.approx(lr)
    assert s(6.0) == pytest.approx(lo + 0.5 * (lr - lo))
    assert s(10.0) == pytest.approx(lo)
    pts = torch.rand(20, generator=gen).sort().values * 8 + 2
    vals = [s(float(p)) for p in pts]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone after the warm-up


def test_param_groups_no_decay():
    from tokenlabel.models import create_model

    m = create_model("lvvit_t", num_classes=5, depth=1, embed_dim=32, num_heads=2, img_size=32)
    decay, no_decay = T.param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "head.bias", "norm.weight"} <= nd
    assert all(p.ndim >= 2 for p in decay["params"]) and "head.weight" not in nd
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_ema_update(gen):
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = T.ModelEma(m, 0.75)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    m(torch.randn(5, 3, generator=gen))  # moves the BN running stats and num_batches_tracked
    ema.update(m)
    for k, v in ema.module.state_dict().items():
        src = m.state_dict()[k]
        want = src if not v.dtype.is_floating_point else 0.75 * before[k] + 0.25 * src
        torch.testing.assert_close(v, want)


def test_class_label_loss_matches_dense_soft_targets(gen):
    """The baseline's loss equals soft CE against explicit targets: the cls target mixed by lam', every
    token the one-hot class, both smoothed."""
    B, L, C, s = 3, 4, 7, 0.1
    N = L * L
    cls = torch.randn(B, C, generator=gen, dtype=torch.float64)
    aux = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=gen)
    box = (1, 0, 3, 3)
    cfg = {"smoothing": s, "cls_weight": 0.7, "dense_weight": 1.3}
    got = T.class_label_loss((cls, aux, box), y, cfg)
    onehot = F.one_hot(y, C).double() * (1 - s) + s / C
    lam = 1 - (3 - 1) * (3 - 0) / N
    t_cls = lam * onehot + (1 - lam) * onehot.flip(0)
    ce = lambda x, t: -(t * x.log_softmax(-1)).sum(-1).mean()  # noqa: E731
    want = 0.7 * ce(cls, t_cls) + 1.3 * ce(aux.reshape(B * N, C), onehot.repeat_interleave(N, 0))
    torch.testing.assert_close(got.double(), want)
    # no MixToken: lam' = 1; a CNN's logits: plain smoothed CE
    torch.testing.assert_close(T.class_label_loss((cls, aux, None), y, {**cfg, "dense_weight": 0.0}).double(),
                               0.7 * ce(cls, onehot))
    torch.testing.assert_close(T.class_label_loss(cls, y, cfg).double(), ce(cls, onehot))


# ------------------------------------------------------------------ end-to-end runs
def test_token_label_run_with_fused_loss(tmp_path, data, capsys):
    """Two steps on label maps through the fused kernel (Triton interpreter on the CPU), eval, files; the epoch
    line names the idle share after the device it was measured on."""
    store = make_store(tmp_path / "store", train_relpaths(data), num_classes=4)
    out = tmp_path / "run"
    assert main(tiny_args(data, out, "--labels", store, "--epochs", 1, "--batch-size", 16, "--log-every", 1)) == 0
    epoch_line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[train] epoch 1/1:")]
    assert len(epoch_line) == 1 and "between steps" in epoch_line[0]
    assert ("GPU idle" in epoch_line[0]) == torch.cuda.is_available()
    rows = read_csv(out / "summary.csv")
    assert len(rows) == 1 and set(T.SUMMARY_FIELDS) == set(rows[0])
    r = rows[0]
    assert math.isfinite(float(r["train_loss"])) and 0 <= float(r["top1"]) <= float(r["top5"]) <= 100
    assert 0 <= float(r["data_wait_frac"]) <= 1 and float(r["images_per_s"]) > 0
    assert 0 <= float(r["gpu_data_wait_frac"]) <= 1
    steps = read_csv(out / "steps.csv")
    assert len(steps) == 2 and all(math.isfinite(float(s["loss"])) for s in steps)
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["labels"] == str(store) and saved["token_label_size"] == 2 and saved["lr"] == 1e-3
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()


def test_teacher_run_and_checkpoint_rebuilds_model(tmp_path, data):
    from tokenlabel.models import load_checkpoint

    out = tmp_path / "teacher"
    args = tiny_args(data, out, "--model", "resnet_tiny", "--model-kwargs", "widths=[8],depths=[1],strides=[1]",
                     "--epochs", 1, "--batch-size", 8)
    args[args.index("depth=1,embed_dim=32,num_heads=2")] = "widths=8"
    assert main(args) == 0
    ck = load_checkpoint(out / "best.pt")  # what `annotate --teacher` does
    model = ck["model"]
    assert type(model).__name__ == "ResNetTiny" and ck["classes"] == ["class_00", "class_01", "class_02", "class_03"]
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_finetune_at_higher_resolution(tmp_path, data):
    base = tmp_path / "base"
    assert main(tiny_args(data, base, "--max-steps", 1)) == 0
    out = tmp_path / "ft"
    assert main(tiny_args(data, out, "--img-size", 48, "--finetune", base / "last.pt", "--max-steps", 1)) == 0
    ck = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ck["state_dict"]["pos_embed"].shape[1] == 1 + 3 * 3 and ck["config"]["token_label_size"] == 3


# ------------------------------------------------------------------ bad input
def _fails(argv, pattern):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code not in (0, None)
    assert re.search(pattern, str(ei.value)), str(ei.value)


def test_bad_data_folders(tmp_path, data):
    _fails(tiny_args(tmp_path / "nope", tmp_path / "o1"), "no such directory")
    (tmp_path / "empty").mkdir()
    _fails(tiny_args(tmp_path / "empty", tmp_path / "o2"), "train/ and val/")
    (tmp_path / "hollow" / "train" / "a").mkdir(parents=True)
    (tmp_path / "hollow" / "val" / "a").mkdir(parents=True)
    _fails(tiny_args(tmp_path / "hollow", tmp_path / "o3"), "holds no images")
    odd = tmp_path / "odd"
    shutil.copytree(data, odd)
    shutil.move(str(odd / "val" / "class_03"), str(odd / "val" / "class_99"))
    _fails(tiny_args(odd, tmp_path / "o4"), r"class folders differ.*class_03.*class_99")


def test_label_store_for_other_images(tmp_path, data):
    other = make_store(tmp_path / "other", [f"x/{i}.JPEG" for i in range(5)], num_classes=4)
    _fails(tiny_args(data, tmp_path / "o1", "--labels", other), r"no label map.*class_0")
    wrong_c = make_store(tmp_path / "c7", train_relpaths(data), num_classes=7)
    _fails(tiny_args(data, tmp_path / "o2", "--labels", wrong_c), "num_classes")
    _fails(tiny_args(data, tmp_path / "o3", "--labels", tmp_path / "missing"), "no such label store")


def test_token_label_size_must_match_model(tmp_path, data):
    _fails(tiny_args(data, tmp_path / "o", "--token-label-size", 3), r"token grid 2x2")


def test_corrupt_checkpoint_and_no_overwrite(tmp_path, data):
    out = tmp_path / "run"
    assert main(tiny_args(data, out, "--max-steps", 2)) == 0
    good = (out / "last.pt").read_bytes()
    _fails(tiny_args(data, out), "already holds a checkpoint")  # no --resume: refuse, keep last.pt
    assert (out / "last.pt").read_bytes() == good
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good[: len(good) // 2])
    _fails(tiny_args(data, tmp_path / "o2", "--resume", bad), "cannot read the checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.randn(3)}, foreign)
    _fails(tiny_args(data, tmp_path / "o3", "--resume", foreign), "not a tokenlabel training checkpoint")
    _fails(tiny_args(data, tmp_path / "o4", "--resume", tmp_path / "none.pt"), "no such file")
    _fails(tiny_args(data, out, "--resume", "auto", "--model-kwargs", "embed_dim=48"), "does not fit")
    assert (out / "last.pt").read_bytes() == good
    assert not list(out.glob(".*tmp*"))


def test_out_of_memory_suggests_a_batch_size(tmp_path, data, monkeypatch):
    """A first step that runs out of memory ends with a message naming a batch size that fits a probe."""
    import tokenlabel.models as M

    real = M.create_model

    def fake(*a, **k):
        model = real(*a, **k)
        fwd = model.forward

        def forward(images, *args, **kw):
            if images.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return fwd(images, *args, **kw)

        model.forward = forward
        return model

    monkeypatch.setattr(M, "create_model", fake)
    _fails(tiny_args(data, tmp_path / "o", "--batch-size", 8), r"out of memory.*--batch-size 8.*--batch-size 2 fits")


def test_loaders_closed_on_every_way_out(tmp_path, data, monkeypatch):
    """run() closes both loaders when training finishes and when it fails after they were built (their
    threads and DALI pipelines left to interpreter teardown aborted a DALI run at exit, rc 134)."""
    import tokenlabel.models as M

    closed = []
    real_build = T.build_loaders

    def build(*a, **k):
        loaders = real_build(*a, **k)
        for name, loader in zip(("train", "val"), loaders):
            close = loader.close
            loader.close = lambda close=close, name=name: (closed.append(name), close())
        return loaders

    monkeypatch.setattr(T, "build_loaders", build)
    assert main(tiny_args(data, tmp_path / "ok", "--max-steps", 1)) == 0
    assert sorted(closed) == ["train", "val"]
    closed.clear()

    def broken(*a, **k):
        raise RuntimeError("model construction failed (simulated)")

    monkeypatch.setattr(M, "create_model", broken)
    _fails(tiny_args(data, tmp_path / "bad"), "model construction failed")
    assert sorted(closed) == ["train", "val"]


def test_teacher_annotate_student_pipeline(tmp_path, data):
    """The full-run recipe on tiny data with our CLIs only: teacher -> annotate -> student with token labels."""
    teacher = tmp_path / "teacher"
    args = tiny_args(data, teacher, "--model", "resnet_tiny", "--epochs", 1, "--batch-size", 8, "--max-steps", 2)
    args[args.index("depth=1,embed_dim=32,num_heads=2")] = "widths=[8,16],depths=[1,1],strides=[1,2]"
    assert main(args) == 0
    store = tmp_path / "store"
    assert main(["annotate", "--teacher", str(teacher / "last.pt"), "--ema", "--data", str(data / "train"),
                 "--out", str(store), "--size", "4", "--topk", "2", "--img-size", "32", "--device", "cpu",
                 "--workers", "0", "--no-progress"]) in (0, None)
    out = tmp_path / "student"
    assert main(tiny_args(data, out, "--labels", store, "--batch-size", 16, "--max-steps", 1)) == 0
    steps = read_csv(out / "steps.csv")
    assert len(steps) == 1 and math.isfinite(float(steps[0]["loss"]))


# (flag, a valid value, a value the DALI loader refuses here or None, the words its error names)
DALI_ONLY_FLAGS = [
    ("--hw-decoder-load", 0.5, 1.5, "hw_decoder_load"),
    ("--hw-decoder-load", "1,0", "1,1.5", r"hw_decoder_load must be a number in \[0, 1\]"),
    ("--prefetch", 4, 0, "prefetch must be an integer"),
    ("--decode-device", "cpu", None if torch.cuda.is_available() else "gpu", "decode_device='gpu' needs a CUDA device"),
    ("--resize-device", "cpu", None if torch.cuda.is_available() else "gpu", "resize_device='gpu' needs a CUDA device"),
]


@pytest.mark.parametrize("flag,good,bad,words", DALI_ONLY_FLAGS, ids=[f[0] for f in DALI_ONLY_FLAGS])
def test_dali_only_flags(tmp_path, data, flag, good, bad, words):
    """The DALI loader's knobs: on the PIL loader each is refused before anything runs (no checkpoint
    written); a value the DALI loader cannot take is refused with the loader's ValueError, which names it."""
    _fails(tiny_args(data, tmp_path / "o1", "--loader", "torch", flag, good), f"{flag} applies to the DALI loader only")
    assert not (tmp_path / "o1" / "last.pt").exists()
    pytest.importorskip("nvidia.dali")
    if bad is not None:
        _fails(tiny_args(data, tmp_path / "o2", "--loader", "dali", flag, bad), words)


def test_hw_decoder_lanes_from_the_command_line(tmp_path, data):
    """--hw-decoder-load 1,0: two DALI pipelines sharing the batches; the run trains and records the loads; a
    value that is not a list of numbers is refused by the parser, naming it."""
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "o"
    assert main(tiny_args(data, out, "--loader", "dali", "--hw-decoder-load", "1,0", "--max-steps", 2)) == 0
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["hw_decoder_load"] == [1.0, 0.0]
    with pytest.raises(SystemExit):
        main(tiny_args(data, tmp_path / "o2", "--loader", "dali", "--hw-decoder-load", "1,x"))
    assert not (tmp_path / "o2").exists()
    # "auto": the same two pipelines with the engines' one switched by its share; refused on the PIL loader
    assert main(tiny_args(data, tmp_path / "o3", "--loader", "dali", "--hw-decoder-load", "auto",
                          "--max-steps", 2)) == 0
    assert yaml.safe_load((tmp_path / "o3" / "config.yaml").read_text())["hw_decoder_load"] == "auto"
    _fails(tiny_args(data, tmp_path / "o4", "--loader", "torch", "--hw-decoder-load", "auto"),
           "--hw-decoder-load applies to the DALI loader only")


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_config_file_dali_knobs_dropped_where_they_cannot_apply(tmp_path, data, capsys, loader):
    """The CIFAR configs' DALI settings (CPU decoding, the resize on the GPU) come from the config file: where
    they cannot apply (the PIL loader; the GPU resize without CUDA) the run drops them with a note and trains;
    what applies stays. The same options on the command line are refused instead (test_dali_only_flags)."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("decode_device: cpu\nresize_device: gpu\nprefetch: 3\n")
    out = tmp_path / "o"
    assert main(tiny_args(data, out, "--config", cfg, "--loader", loader, "--max-steps", 1)) == 0
    said = capsys.readouterr().out
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    cuda = torch.cuda.is_available()
    if loader == "torch":
        for key in ("decode_device", "resize_device", "prefetch"):
            assert f"[train] {key}: " in said and "does not apply to the torch loader" in said
            assert saved[key] is None
    else:
        assert saved["decode_device"] == "cpu" and saved["prefetch"] == 3
        assert saved["resize_device"] == ("gpu" if cuda else None)
        assert ("[train] resize_device: gpu (from the config file) does not apply" in said) == (not cuda)
        assert "[train] decode_device" not in said and "[train] prefetch" not in said

