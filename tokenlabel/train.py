"""``tokenlabel train``: train an LV-ViT with token labeling (or on class labels: the baseline), or a CNN teacher.

One process::

    tokenlabel train                                   # no --data: a tiny demo on generated images (CPU ok)
    tokenlabel train --data DIR --labels STORE --model lvvit_s --batch-size 128 --output runs/s
    tokenlabel train --config tokenlabel/configs/cifar_student.yaml --data cifar10 --labels stores/cifar

Several GPUs of one host (DDP, NCCL; gloo on CPU), ``--batch-size`` is per process::

    torchrun --nproc_per_node=8 -m tokenlabel train --config tokenlabel/configs/lvvit_s.yaml --data DIR --labels STORE

Resumable pieces: ``--time-limit 9 --resume auto`` stops after the step running when 9 minutes are
up (or on SIGTERM/SIGINT), writes ``last.pt`` with the exact position in the epoch, and exits 0; the
same command continues where it stopped, with no sample lost or repeated and the same losses as an
uninterrupted run.

Outputs in ``--output``: ``config.yaml`` (the resolved config), ``summary.csv`` (one row per epoch),
``steps.csv`` (loss and lr of every step), ``last.pt``, ``best.pt`` (by EMA top-1 when EMA is on).
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tokenlabel.bench.timing import StepGaps

# ----------------------------------------------------------------------------------------- config

# Every option with its default. The CLI parser uses default=None for all of them so that the
# precedence stays simple: DEFAULTS < --config file < options given on the command line.
DEFAULTS: dict = {
    "data": None,
    "labels": None,
    "model": "lvvit_s",
    "model_kwargs": {},
    "attn": "auto",
    # LV-ViT's fused kernels, each torch | triton | auto (triton for an LV-ViT model on CUDA, else torch). The train
    # CLI's GPU tests pass with them (H100, 2026-12-05), and the step is faster (bench/results/step.csv).
    "stem_bn": "auto",          # the stem's BatchNorm + ReLU (kernels/batchnorm.py)
    "residual_norm": "auto",    # the blocks' residual add + LayerNorm (kernels/add_layernorm.py)
    "gelu": "auto",             # the MLPs' fc1 bias + GELU (kernels/bias_gelu.py)
    "conv1_wgrad": "auto",      # the stem conv1's weight gradient (kernels/conv_wgrad.py; torch: cuDNN's)
    "img_size": 224,
    "token_label_size": None,   # img_size // 16; must equal the model's patch grid
    "epochs": 300,
    "batch_size": 128,          # per process
    "accum_steps": 1,
    "lr": None,                 # 1.6e-3 * global_batch / 1024
    "min_lr": 1e-5,
    "warmup_lr": 1e-6,
    "warmup_epochs": 5.0,
    "weight_decay": 0.05,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "ema_decay": 0.99992,       # 0 turns the EMA off
    "drop_path": None,          # None: the model's default
    "mix_token": True,
    "smoothing": 0.1,
    "dense_weight": 1.0,
    "cls_weight": 1.0,
    "ground_truth": False,
    "box_order": "hw",
    "clip_grad": None,
    "compile": False,
    "compile_mode": None,
    "combo_kernels": False,     # inductor's combo kernels (independent small kernels launched as one); needs compile
    "cudnn_benchmark": True,    # cuDNN times its algorithms per conv shape on first use (CUDA), as the reference does
    "cuda_sync": "auto",        # how threads wait for the GPU: auto (CUDA's default: spin) | spin | yield | blocking
    "amp": None,                # bf16 on CUDA, fp32 on CPU; fp16 uses a GradScaler
    "loader": None,             # dali when importable and on CUDA, else torch
    "workers": None,
    "prefetch": None,           # DALI: batches prepared ahead (None: the loader's default, 4 or 2)
    "hw_decoder_load": None,    # DALI: share of JPEGs on nvJPEG's hardware decoder (None: the loader's default)
    "decode_device": None,      # DALI: "gpu" | "cpu" decoding and resizing (None: the loader's "gpu" on CUDA)
    "resize_device": None,      # DALI: "gpu" | "cpu" resizing (None: where the images were decoded)
    "randaugment": "rand-m9-mstd0.5-inc1",
    "random_erasing": 0.25,
    "crop_pct": None,
    "missing_labels": "error",
    "seed": 42,
    "output": None,
    "log_every": 50,
    "save_every_steps": 0,
    "time_limit": None,         # minutes
    "max_steps": None,          # stop (resumable) after this many optimizer steps in this invocation
    "resume": None,
    "finetune": None,
    "synthetic_classes": 10,
    "synthetic_per_class": 32,
    "synthetic_size": 40,
}

# Without --data the run trains on images it generates; these defaults keep it to about a minute on
# a CPU (applied only to options that neither the config file nor the command line set).
DEMO_DEFAULTS: dict = {
    "model": "lvvit_t",
    "model_kwargs": {"depth": 4, "embed_dim": 96, "num_heads": 2},
    "img_size": 32,
    "epochs": 5,
    "batch_size": 32,
    "lr": 2e-3,
    "warmup_epochs": 1.0,
    "ema_decay": 0.9,
    "synthetic_per_class": 64,
    "drop_path": 0.0,
    "log_every": 5,
    "randaugment": None,
}

CHECKPOINT_FORMAT = "tokenlabel-train"


def _parse_loads(text: str):
    """--hw-decoder-load: one number, comma-separated numbers (one DALI pipeline each) or "auto" -> float, list or
    "auto"."""
    if text.strip() == "auto":
        return "auto"
    try:
        loads = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number or comma-separated numbers in [0, 1], or 'auto', got "
                                         f"{text!r}") \
            from None
    return loads[0] if len(loads) == 1 else loads


def _parse_kv(text: str) -> dict:
    """``depth=2,embed_dim=48,widths=[16,32]`` -> dict; values read as YAML scalars/lists (int, float, bool)."""
    import yaml

    items, depth, cur = [], 0, ""
    for ch in text:  # split on commas outside brackets
        depth += (ch in "[(") - (ch in "])")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    out = {}
    for item in filter(None, (p.strip() for p in items)):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"--model-kwargs expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v.strip().replace("(", "[").replace(")", "]"))
        except yaml.YAMLError:
            out[k.strip()] = v.strip()
    return out


KERNEL_KEYS = ("stem_bn", "residual_norm", "gelu", "conv1_wgrad")
KERNEL_CHOICES = ("torch", "triton", "auto")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (__doc__ or "").splitlines()[0]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "\n".join((__doc__ or "").splitlines()[2:])
    g = parser.add_argument_group("data")
    g.add_argument("--data", help="ImageFolder root with train/ and val/ (omit: generate a small synthetic set)")
    g.add_argument("--labels", help="label-map store for token labeling (omit: class labels only, the baseline)")
    g.add_argument("--loader", choices=["dali", "torch"], help="default: dali if importable and on CUDA, else torch")
    g.add_argument("--workers", type=int, help="loader worker processes/threads per process")
    g.add_argument("--prefetch", type=int, help="DALI loader: batches prepared ahead per pipeline (default 4 for "
                   "one pipeline decoding on the GPU and for auto's hybrid pipeline, else 2)")
    g.add_argument("--hw-decoder-load", type=_parse_loads,
                   help="DALI loader: share of JPEGs on nvJPEG's hardware decoder, in [0, 1]; several loads, "
                        "comma-separated (e.g. 1,0), run one DALI pipeline each, sharing the batches by what each "
                        "delivers; auto (the default on CUDA): 1,0 with the hardware engines' pipeline paused "
                        "while it delivers few batches, as beside a training step, where one pipeline on the hybrid "
                        "path (0) feeds it best; 1,0 is the fastest alone; see dataloading/NOTES.md)")
    g.add_argument("--decode-device", choices=["gpu", "cpu"],
                   help="DALI loader: decode and resize on the GPU (nvJPEG, default) or in DALI's CPU threads (small "
                        "images such as CIFAR's: keeps the loader's kernels off the GPU the step runs on)")
    g.add_argument("--resize-device", choices=["gpu", "cpu"],
                   help="DALI loader: resize on the GPU or in DALI's CPU threads (default: where the images were "
                        "decoded); --decode-device cpu --resize-device gpu decodes small JPEGs on the CPU and resizes "
                        "each batch on the GPU in one launch (the CIFAR configs' setting)")
    g.add_argument("--img-size", type=int)
    g.add_argument("--token-label-size", type=int, help="token grid L of the targets (default img-size/16)")
    g.add_argument("--randaugment", help="RandAugment spec, or 'none'")
    g.add_argument("--random-erasing", type=float)
    g.add_argument("--crop-pct", type=float)
    g.add_argument("--missing-labels", choices=["error", "class"],
                   help="images without a label map: stop (error) or train them on their class label")
    g = parser.add_argument_group("model")
    g.add_argument("--model", help="lvvit_t/s/m/l (+_384/_448) or resnet_tiny (a CNN teacher, plain CE)")
    g.add_argument("--model-kwargs", type=_parse_kv, action="append",
                   help="model overrides as key=value[,key=value], e.g. depth=4,embed_dim=96")
    g.add_argument("--attn", help="attention backend: auto | xformers | sdpa | triton | math")
    g.add_argument("--stem-bn", choices=KERNEL_CHOICES,
                   help="LV-ViT's stem BatchNorm + ReLU in training: torch, our Triton kernels (CUDA), or "
                        "auto (the default: triton for an LV-ViT model on CUDA, else torch)")
    g.add_argument("--residual-norm", choices=KERNEL_CHOICES,
                   help="LV-ViT's residual adds + the LayerNorms after them: torch, one Triton kernel "
                        "each way (CUDA), or auto (the default)")
    g.add_argument("--gelu", choices=KERNEL_CHOICES,
                   help="LV-ViT's MLP bias + GELU: torch, one Triton kernel each way (CUDA), or auto (the default)")
    g.add_argument("--conv1-wgrad", choices=KERNEL_CHOICES,
                   help="the weight gradient of LV-ViT's first stem conv (space-to-depth form): torch (cuDNN), our "
                        "Triton kernel (CUDA), or auto (the default)")
    g.add_argument("--drop-path", type=float)
    g.add_argument("--mix-token", dest="mix_token", action="store_true", default=None)
    g.add_argument("--no-mix-token", dest="mix_token", action="store_false")
    g.add_argument("--finetune", help="checkpoint to start from (pos-embed resized to --img-size)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="per process (GPU)")
    g.add_argument("--accum-steps", type=int, help="gradient accumulation steps per optimizer step")
    g.add_argument("--lr", type=float, help="peak lr (default 1.6e-3 * global batch / 1024)")
    g.add_argument("--min-lr", type=float)
    g.add_argument("--warmup-lr", type=float)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--ema-decay", type=float, help="EMA of the weights (0: off)")
    g.add_argument("--clip-grad", type=float, help="clip the global grad norm to this value")
    g.add_argument("--amp", choices=["bf16", "fp16", "fp32"])
    g.add_argument("--compile", dest="compile", action="store_true", default=None)
    g.add_argument("--no-compile", dest="compile", action="store_false")
    g.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile mode; reduce-overhead replays the compiled forward and backward as CUDA "
                        "graphs (the host no longer paces the GPU: LV-ViT-S/224 B=128 on an H100 3,734 -> 4,931 img/s)")
    g.add_argument("--combo-kernels", dest="combo_kernels", action="store_true", default=None,
                   help="with --compile: inductor launches independent small kernels (the weights' bf16 casts, "
                        "the bias sums) as one, choosing by timing at compile. LV-ViT-S/224 B=128 with CUDA graphs "
                        "and our kernels on an H100: 21.51 -> 21.31 ms per step (bench step, 2026-12-06)")
    g.add_argument("--no-combo-kernels", dest="combo_kernels", action="store_false")
    g.add_argument("--cudnn-benchmark", dest="cudnn_benchmark", action="store_true", default=None,
                   help="let cuDNN time its convolution algorithms per shape on first use and keep the fastest "
                        "(torch.backends.cudnn.benchmark; CUDA only)")
    g.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false",
                   help="cuDNN's heuristic choice instead")
    g.add_argument("--cuda-sync", choices=("auto", "spin", "yield", "blocking"),
                   help="how the process's threads wait for the GPU (CUDA only): CUDA's default (auto) spins a core "
                        "per waiting thread; blocking sleeps them, leaving the cores to the loader's CPU decoding")
    g = parser.add_argument_group("loss")
    g.add_argument("--smoothing", type=float)
    g.add_argument("--dense-weight", type=float)
    g.add_argument("--cls-weight", type=float)
    g.add_argument("--ground-truth", dest="ground_truth", action="store_true", default=None)
    g.add_argument("--box-order", choices=["hw", "original"])
    g = parser.add_argument_group("run")
    g.add_argument("--config", help="YAML or JSON file of options (command-line options win)")
    g.add_argument("--output", help="run directory (default runs/<date>-<model>)")
    g.add_argument("--seed", type=int)
    g.add_argument("--log-every", type=int, help="progress line every N steps")
    g.add_argument("--save-every-steps", type=int, help="also write last.pt every N steps")
    g.add_argument("--time-limit", type=float, help="minutes; then save and exit 0 (continue with --resume auto)")
    g.add_argument("--max-steps", type=int, help="stop (resumably) after N optimizer steps in this invocation")
    g.add_argument("--resume", help="checkpoint path, or 'auto' = OUTPUT/last.pt if it exists")
    g.add_argument("--synthetic-classes", type=int)
    g.add_argument("--synthetic-per-class", type=int)
    g.add_argument("--synthetic-size", type=int)
    # Defaults live in DEFAULTS (argparse's are None so that a config file can sit between): show them.
    for action in parser._actions:
        if action.dest in DEFAULTS and DEFAULTS[action.dest] not in (None, {}) and action.const is None:
            action.help = (action.help + " " if action.help else "") + f"(default {DEFAULTS[action.dest]})"


def _load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"--config {path}: no such file")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            cfg = json.loads(text)
        else:
            import yaml

            cfg = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes one clear message
        raise SystemExit(f"--config {path}: cannot parse: {e}") from None
    cfg = cfg or {}
    if not isinstance(cfg, dict):
        raise SystemExit(f"--config {path}: expected a mapping of options, got {type(cfg).__name__}")
    cfg = {k.replace("-", "_"): v for k, v in cfg.items()}
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise SystemExit(f"--config {path}: unknown options {unknown}; valid: {sorted(DEFAULTS)}")
    return cfg


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _mode_options(cfg: dict) -> dict:
    """The inductor options that the run's compile mode stands for ({} for the default mode)."""
    from torch._inductor import list_mode_options

    return list_mode_options(cfg.get("compile_mode") or "default")


def compile_kwargs(cfg: dict) -> dict:
    """torch.compile's arguments for the run: the mode, or (it takes one or the other) the mode's inductor options
    plus the combo kernels."""
    if cfg.get("combo_kernels"):
        return {"options": {**_mode_options(cfg), "combo_kernels": True, "benchmark_combo_kernel": True}}
    return {"mode": None if cfg.get("compile_mode") in (None, "default") else cfg["compile_mode"]}


def uses_cuda_graphs(cfg: dict) -> bool:
    """The compiled model replays CUDA graphs (modes reduce-overhead and max-autotune): every step (and eval batch)
    must start a new graph iteration."""
    return bool(cfg.get("compile")) and bool(_mode_options(cfg).get("triton.cudagraphs"))


def resolve_config(args: argparse.Namespace) -> dict:
    """DEFAULTS < DEMO_DEFAULTS (only without data) < config file < command line."""
    file_cfg = _load_config_file(args.config) if getattr(args, "config", None) else {}
    cli = {}
    for key in DEFAULTS:
        v = getattr(args, key, None)
        if v is None:
            continue
        if key == "model_kwargs":
            merged = {}
            for d in v:
                merged.update(d)
            v = merged
        cli[key] = v
    cfg = dict(DEFAULTS)
    data_given = cli.get("data", file_cfg.get("data")) is not None
    if not data_given:
        cfg.update(copy.deepcopy(DEMO_DEFAULTS))
    model_kwargs = dict(cfg["model_kwargs"])
    if "model" in file_cfg or "model" in cli:
        model_kwargs = {}  # demo overrides belong to the demo model only
    cfg.update(file_cfg)
    cfg.update(cli)
    model_kwargs.update(file_cfg.get("model_kwargs") or {})
    model_kwargs.update(cli.get("model_kwargs") or {})
    cfg["model_kwargs"] = model_kwargs
    if isinstance(cfg.get("randaugment"), str) and cfg["randaugment"].lower() in ("none", "off", ""):
        cfg["randaugment"] = None
    for key in ("epochs", "batch_size", "img_size", "accum_steps"):
        if int(cfg[key]) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if cfg.get("compile_mode") is not None:
        if cfg["compile_mode"] not in COMPILE_MODES:
            raise SystemExit(f"--compile-mode {cfg['compile_mode']!r}: valid modes are {', '.join(COMPILE_MODES)}")
        if not cfg["compile"]:
            raise SystemExit(f"--compile-mode {cfg['compile_mode']} needs --compile")
    if cfg.get("combo_kernels") and not cfg["compile"]:
        raise SystemExit("--combo-kernels needs --compile (it is an option of torch.compile's inductor)")
    from tokenlabel.models.attention import cannot_run_here

    reason = cannot_run_here(cfg["attn"])
    if reason:
        raise SystemExit(f"--attn {cfg['attn']} {reason}; use --attn auto (sdpa on the CPU) or --attn sdpa")
    for key in KERNEL_KEYS:
        flag = "--" + key.replace("_", "-")
        if cfg.get(key) not in KERNEL_CHOICES:
            raise SystemExit(f"{flag} {cfg.get(key)!r}: valid values are {', '.join(KERNEL_CHOICES)}")
        reason = cannot_run_here("triton") if cfg[key] == "triton" else None
        if reason:
            raise SystemExit(f"{flag} triton {reason}; use {flag} torch")
    return cfg


# ----------------------------------------------------------------------------------- distributed

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False  # under torchrun (even with one process: the DDP path is taken)

    @property
    def main(self) -> bool:
        return self.rank == 0


def apply_multicast_defaults() -> None:
    """NVLink multicast (NVLS) off unless the user set these: it fails on the lent multi-GPU hosts."""
    for k, v in MULTICAST_OFF.items():
        os.environ.setdefault(k, v)


def apply_cuda_sync(mode: str) -> None:
    """--cuda-sync: the scheduling flag of this process's GPU (LOCAL_RANK's under torchrun), or a clear exit."""
    from tokenlabel.env import CUDA_SYNC, set_cuda_sync

    if mode not in CUDA_SYNC:
        raise SystemExit(f"--cuda-sync {mode!r}: valid values are {', '.join(CUDA_SYNC)}")
    if not torch.cuda.is_available():
        raise SystemExit(f"--cuda-sync {mode} needs CUDA (no GPU here)")
    try:
        set_cuda_sync(mode, int(os.environ.get("LOCAL_RANK", "0")))
    except RuntimeError as e:
        raise SystemExit(f"--cuda-sync {mode}: {e}") from None


def setup_distributed() -> Dist:
    """Join the torchrun process group when torchrun started us (NCCL on CUDA, gloo on CPU).

    Under ``torchrun --nproc_per_node=1`` the model is still wrapped in DDP, so the distributed path
    can be proven on a one-GPU machine."""
    distributed = "WORLD_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ or \
        int(os.environ.get("WORLD_SIZE", "1")) > 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if distributed:
        import torch.distributed as dist

        apply_multicast_defaults()
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            kw = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend=backend, **kw)
    return Dist(rank, world, local_rank, device, distributed)


def _all_reduce(t: torch.Tensor, d: Dist, op="sum") -> torch.Tensor:
    if d.distributed:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def _barrier(d: Dist) -> None:
    if d.distributed:
        import torch.distributed as dist

        dist.barrier()


# ------------------------------------------------------------------------------ data preparation

def _image_files(folder: Path) -> int:
    n = 0
    for _, _, files in os.walk(folder):
        n += sum(1 for f in files if not f.startswith("."))
        if n:
            return n
    return n


def check_data_dir(root: str) -> tuple[Path, Path]:
    """train/ and val/ exist, hold images, and have the same class folders."""
    r = Path(root)
    if not r.is_dir():
        raise SystemExit(f"--data {root}: no such directory")
    train, val = r / "train", r / "val"
    if not val.is_dir() and (r / "test").is_dir():
        val = r / "test"  # e.g. the CIFAR-10 JPEG tree: train/ and test/
    for part in (train, val):
        if not part.is_dir():
            raise SystemExit(f"--data {root}: expected an ImageFolder with train/ and val/ (or test/); "
                             f"{part} is missing")
        classes = [p for p in part.iterdir() if p.is_dir()]
        if not classes:
            raise SystemExit(f"--data {root}: {part} holds no class folders")
        if _image_files(part) == 0:
            raise SystemExit(f"--data {root}: {part} holds no images")
    tc = sorted(p.name for p in train.iterdir() if p.is_dir())
    vc = sorted(p.name for p in val.iterdir() if p.is_dir())
    if tc != vc:
        only_t, only_v = sorted(set(tc) - set(vc)), sorted(set(vc) - set(tc))
        raise SystemExit(f"--data {root}: class folders differ between train/ ({len(tc)}) and {val.name}/ ({len(vc)}): "
                         f"only in train: {only_t[:10]}, only in val: {only_v[:10]}")
    return train, val


def make_demo_data(cfg: dict, out: Path, d: Dist) -> str:
    from tokenlabel.dataloading import make_synthetic_imagefolder

    root = out / "synthetic-data"
    if d.main and not (root / "train").is_dir():
        make_synthetic_imagefolder(root, num_classes=cfg["synthetic_classes"], per_class=cfg["synthetic_per_class"],
                                   size=cfg["synthetic_size"], seed=cfg["seed"],
                                   val_per_class=max(2, cfg["synthetic_per_class"] // 4))
        print(f"[train] no --data: generated {cfg['synthetic_classes']} classes x {cfg['synthetic_per_class']} "
              f"synthetic JPEGs ({cfg['synthetic_size']}px) in {root}")
    _barrier(d)
    return str(root)


def default_backend(device: torch.device) -> str:
    if device.type != "cuda":
        return "torch"
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: use the PIL loader
        return "torch"
    return "dali"


DALI_KNOBS = ("hw_decoder_load", "prefetch", "decode_device", "resize_device")


def build_loaders(cfg: dict, d: Dist, cli_keys: frozenset = frozenset(), log=print):
    """The train and val loaders. The DALI-only options: given on the command line (``cli_keys``) they are the
    user's explicit request, refused here on the PIL loader and validated by the DALI loader; from a config file
    (e.g. the CIFAR configs' CPU decoding with the resize on the GPU) the ones that cannot apply here (the PIL
    loader, a GPU resize without CUDA) are dropped with a note, so the same config runs on any machine."""
    from tokenlabel.dataloading import build_loader

    train_dir, val_dir = check_data_dir(cfg["data"])
    common = dict(backend=cfg["loader"], device=d.device.type, shard_id=d.rank, num_shards=d.world, seed=cfg["seed"])
    if cfg["workers"] is not None:
        common["num_workers"] = cfg["workers"]
    for key in DALI_KNOBS:
        v = cfg[key]
        if v is not None and key not in cli_keys and (
                cfg["loader"] != "dali" or (v == "gpu" and d.device.type != "cuda")):
            log(f"[train] {key}: {v} (from the config file) does not apply to the {cfg['loader']} loader on "
                f"{d.device.type}; ignored")
            cfg[key] = v = None
        if v is not None:
            if cfg["loader"] != "dali":
                raise SystemExit(f"--{key.replace('_', '-')} applies to the DALI loader only "
                                 f"(the loader is {cfg['loader']})")
            common[key] = cfg[key]
    if cfg["labels"]:
        _check_store(cfg)
    try:
        train = build_loader(str(train_dir), labels=cfg["labels"], batch_size=cfg["batch_size"],
                             image_size=cfg["img_size"], train=True, randaugment=cfg["randaugment"],
                             random_erasing=cfg["random_erasing"], missing_labels=cfg["missing_labels"], **common)
        val = build_loader(str(val_dir), labels=None, batch_size=cfg["batch_size"], image_size=cfg["img_size"],
                           train=False, crop_pct=cfg["crop_pct"], **common)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise SystemExit(f"[train] cannot build the data loaders for --data {cfg['data']}"
                         f"{' --labels ' + cfg['labels'] if cfg['labels'] else ''}: {e}") from None
    if list(train.classes) != list(val.classes):
        raise SystemExit(f"--data {cfg['data']}: train and val classes differ")
    if len(train) // cfg["accum_steps"] < 1:
        raise SystemExit(f"--data {cfg['data']}: the train set gives {len(train)} batches of {cfg['batch_size']} "
                         f"per process; lower --batch-size")
    return train, val


def _check_store(cfg: dict) -> None:
    from tokenlabel.dataloading import LabelStore

    p = Path(cfg["labels"])
    if not p.exists():
        raise SystemExit(f"--labels {cfg['labels']}: no such label store")
    try:
        store = LabelStore.open(p)
    except Exception as e:  # noqa: BLE001
        raise SystemExit(f"--labels {cfg['labels']}: cannot open the label store: {e}") from None
    n_classes = len([c for c in (Path(cfg["data"]) / "train").iterdir() if c.is_dir()])
    try:
        store.check_compatible(num_classes=n_classes)
    except ValueError as e:
        raise SystemExit(f"--labels {cfg['labels']}: {e}") from None


# ------------------------------------------------------------------------------------ the model

def is_token_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "aux_head") and hasattr(model, "patch_grid")


def build_model(cfg: dict, num_classes: int) -> torch.nn.Module:
    from tokenlabel.models import create_model

    kwargs = dict(cfg["model_kwargs"])
    kwargs.update(attn=cfg["attn"], img_size=cfg["img_size"], mix_token=cfg["mix_token"])
    if cfg["drop_path"] is not None:
        kwargs["drop_path_rate"] = cfg["drop_path"]
    try:
        model = create_model(cfg["model"], num_classes=num_classes, **kwargs)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise SystemExit(f"--model {cfg['model']} {kwargs}: {e}") from None
    for key in KERNEL_KEYS:  # "auto": our kernels where they run (an LV-ViT model on CUDA), the modules elsewhere
        if cfg[key] == "auto":
            cfg[key] = "triton" if is_token_model(model) and torch.cuda.is_available() else "torch"
    if any(cfg[k] != "torch" for k in KERNEL_KEYS):
        if not is_token_model(model):
            raise SystemExit(f"--stem-bn / --residual-norm / --gelu / --conv1-wgrad apply to LV-ViT models, not "
                             f"--model {cfg['model']}")
        wgrad = "cudnn" if cfg["conv1_wgrad"] == "torch" else "triton"  # torch's: cuDNN's convolution backward
        model.patch_embed.set_impl(bn=cfg["stem_bn"], conv1_wgrad=wgrad)
        model.set_impl(residual_norm=cfg["residual_norm"], gelu=cfg["gelu"])
    if is_token_model(model):
        L = int(model.patch_grid)
        want = cfg["token_label_size"] or cfg["img_size"] // 16
        if want != L:
            raise SystemExit(f"--token-label-size {want} does not match the model's token grid {L}x{L} at "
                             f"--img-size {cfg['img_size']} (use --token-label-size {L})")
        cfg["token_label_size"] = L
    return model


def finetune_from(model: torch.nn.Module, path: str) -> None:
    """Start from the weights of ``path`` (ours: its EMA when it has one; or a reference-repo file):
    the position embedding is resized to this model's grid, and heads of another class count are
    left freshly initialised."""
    from tokenlabel import models as M

    raw = _read_checkpoint(path, "--finetune")
    if isinstance(raw, dict) and raw.get("format") == "tokenlabel":
        sd = raw.get("state_dict_ema") or raw["state_dict"]
    elif isinstance(raw, dict):
        sd = next((raw[k] for k in ("state_dict_ema", "state_dict", "model") if isinstance(raw.get(k), dict)), raw)
        sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
    else:
        raise SystemExit(f"--finetune {path}: no state dict inside ({type(raw).__name__})")
    own = model.state_dict()
    heads = [k for k in sd if k.split(".")[0] in ("head", "aux_head") and k in own and sd[k].shape != own[k].shape]
    sd = {k: v for k, v in sd.items() if k not in heads}
    try:
        if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
            sd["pos_embed"] = M.resize_pos_embed(sd["pos_embed"], int(round((own["pos_embed"].shape[1] - 1) ** 0.5)))
            print(f"[train] position embedding resized to the {model.patch_grid}x{model.patch_grid} token grid")
        rep = M.load_state_dict_into(model, sd, strict=False, source=f"--finetune {path}")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    missing = [k for k in rep["missing_keys"] if k not in heads]
    if missing or rep["unexpected_keys"]:
        raise SystemExit(f"--finetune {path}: missing keys {missing[:8]}, unexpected keys {rep['unexpected_keys'][:8]}")
    print(f"[train] fine-tuning from {path}" + (f" (new heads for {len(heads)} tensors of another class count)"
                                                if heads else ""))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on model.no_weight_decay() names and on every 1-D parameter (biases, norms)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class CosineSchedule:
    """Per-step lr: linear warm-up from warmup_lr, then a cosine from lr to min_lr at the last step.

    Its argument is the position in epochs (fractional), so the schedule stays the same when a run
    resumes on a different number of processes (a different number of steps per epoch)."""

    def __init__(self, lr: float, min_lr: float, warmup_lr: float, warmup_epochs: float, epochs: int):
        self.lr, self.min_lr, self.warmup_lr = lr, min_lr, warmup_lr
        self.warmup_epochs, self.epochs = warmup_epochs, epochs

    def __call__(self, epoch_pos: float) -> float:
        if epoch_pos < self.warmup_epochs:
            return self.warmup_lr + (self.lr - self.warmup_lr) * epoch_pos / self.warmup_epochs
        span = max(self.epochs - self.warmup_epochs, 1e-12)
        t = min(max((epoch_pos - self.warmup_epochs) / span, 0.0), 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * t))

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, sd: dict) -> None:
        vars(self).update(sd)


class ModelEma:
    """Exponential moving average of the weights and float buffers, kept in fp32 beside the model."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        if getattr(self, "_pairs", None) is None or self._pairs[0] is not model:
            # state_dict() tensors share storage with the live parameters/buffers: collect them once.
            ema_f, src_f, copies = [], [], []
            for (_, e), (_, s) in zip(self.module.state_dict().items(), model.state_dict().items()):
                if e.dtype.is_floating_point:
                    ema_f.append(e)
                    src_f.append(s)
                else:
                    copies.append((e, s))
            self._pairs = (model, ema_f, src_f, copies)
        _, ema_f, src_f, copies = self._pairs
        if ema_f:
            torch._foreach_lerp_(ema_f, src_f, 1.0 - self.decay)
        for e, s in copies:
            e.copy_(s)


# ----------------------------------------------------------------------------------------- loss

def class_label_loss(out, classes: torch.Tensor, cfg: dict) -> torch.Tensor:
    """The baseline without label maps: the class label for the cls token and for every token.

    MixToken mixes only the cls target, by lam' = 1 - box area / N with the reversed batch as partner;
    the aux logits come back un-mixed, so every token keeps its own image's class (as in the
    reference, where only the cls target is mixed)."""
    s = cfg["smoothing"]

    def f32(x):  # at least fp32 for the log-softmax (bf16/fp16 logits under autocast)
        return x if x.dtype == torch.float64 else x.float()

    if not isinstance(out, (tuple, list)):
        return F.cross_entropy(f32(out), classes, label_smoothing=s)
    cls_logits, aux_logits, mix_box = out
    cls_logits = f32(cls_logits)
    if mix_box is None:
        cls_loss = F.cross_entropy(cls_logits, classes, label_smoothing=s)
    else:
        r0, c0, r1, c1 = (int(v) for v in (mix_box.tolist() if torch.is_tensor(mix_box) else mix_box))
        lam = 1.0 - (r1 - r0) * (c1 - c0) / aux_logits.shape[1]
        cls_loss = lam * F.cross_entropy(cls_logits, classes, label_smoothing=s) + \
            (1.0 - lam) * F.cross_entropy(cls_logits, classes.flip(0), label_smoothing=s)
    B, N, C = aux_logits.shape
    dense = F.cross_entropy(f32(aux_logits).reshape(B * N, C), classes.repeat_interleave(N), label_smoothing=s)
    return cfg["cls_weight"] * cls_loss + cfg["dense_weight"] * dense


def compute_loss(out, batch: dict, cfg: dict) -> torch.Tensor:
    if isinstance(out, (tuple, list)) and batch.get("label_values") is not None:
        from tokenlabel.kernels import token_label_cross_entropy

        cls_logits, aux_logits, mix_box = out
        return token_label_cross_entropy(
            cls_logits, aux_logits, batch["label_values"], batch["label_indices"], batch["boxes"], batch["flips"],
            mix_box=mix_box, gt_classes=batch["classes"], smoothing=cfg["smoothing"],
            dense_weight=cfg["dense_weight"], cls_weight=cfg["cls_weight"], ground_truth=cfg["ground_truth"],
            box_order=cfg["box_order"])
    return class_label_loss(out, batch["classes"], cfg)


# ----------------------------------------------------------------------------- training state

def _amp_dtype(cfg: dict):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[cfg["amp"]]


def autocast(cfg: dict, device: torch.device):
    dt = _amp_dtype(cfg)
    return torch.autocast(device.type, dtype=dt) if dt is not None else nullcontext()


class Trainer:
    """Model, optimizer, EMA, scaler and the step function; no data loading, no files (see run())."""

    def __init__(self, cfg: dict, model: torch.nn.Module, d: Dist, steps_per_epoch: int, global_batch: int):
        self.cfg, self.d = cfg, d
        self.model = model.to(d.device)
        self.steps_per_epoch = steps_per_epoch
        lr = cfg["lr"] if cfg["lr"] is not None else 1.6e-3 * global_batch / 1024
        cfg["lr"] = lr
        fused = {"fused": True} if d.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"]), lr=lr,
                                           betas=tuple(cfg["betas"]), eps=cfg["eps"], **fused)
        self.schedule = CosineSchedule(lr, cfg["min_lr"], cfg["warmup_lr"], cfg["warmup_epochs"], cfg["epochs"])
        self.ema = ModelEma(model, cfg["ema_decay"]) if cfg["ema_decay"] and cfg["ema_decay"] > 0 else None
        self.scaler = torch.amp.GradScaler(d.device.type) if cfg["amp"] == "fp16" else None
        net = model
        # CUDA-graph replay (compile modes reduce-overhead, max-autotune): each step starts a new graph iteration
        self.graphs = uses_cuda_graphs(cfg)
        if cfg["compile"]:
            if d.device.type == "cuda" and hasattr(model, "measure_attention"):
                # attn "auto" inside the compiled graph takes what was measured eagerly for the shape (else sdpa):
                # measure the training batch (with gradients) and the eval batch now
                for grad in (True, False):
                    model.measure_attention(cfg["batch_size"], _amp_dtype(cfg) or torch.float32, d.device, grad)
            # In place: LV-ViT compiles its tensor core and draws the MixToken box outside it (no recompiles).
            model.compile(**compile_kwargs(cfg))
        if d.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(net, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        self.net = net
        self.epoch_loss_sum, self.epoch_steps = 0.0, 0  # carried through a mid-epoch resume

    def set_lr(self, epoch_pos: float) -> float:
        lr = self.schedule(epoch_pos)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def step(self, micro_batches: list[dict]) -> torch.Tensor:
        """One optimizer step over ``accum_steps`` micro-batches; returns the mean loss (a device tensor, no sync)."""
        if not self.model.training:  # evaluate() restores the mode it found; train() walks every module
            self.net.train()         # (~1-2 ms of host time per step for LV-ViT, on a host-bound step)
        n = len(micro_batches)
        total = None
        for i, batch in enumerate(micro_batches):
            sync = (i == n - 1) or not self.d.distributed
            ctx = self.net.no_sync() if (not sync and hasattr(self.net, "no_sync")) else nullcontext()
            if self.graphs:  # the previous micro-batch's graph outputs are no longer needed
                torch.compiler.cudagraph_mark_step_begin()
            with ctx:
                with autocast(self.cfg, self.d.device):
                    out = self.net(batch["images"])
                loss = compute_loss(out, batch, self.cfg)
                scaled = loss / n
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total = loss.detach() if total is None else total + loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg["clip_grad"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["clip_grad"])
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return total / n


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, cfg: dict, d: Dist) -> tuple[float, float]:
    """top-1 / top-5 (percent) over the whole val set, summed across processes."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=d.device)
    for batch in loader:
        images = batch["images"].to(d.device, non_blocking=True)
        target = batch["classes"].to(d.device, non_blocking=True)
        if uses_cuda_graphs(cfg):
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(cfg, d.device):
            logits = model(images)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        k = min(5, logits.shape[1])
        top = logits.float().topk(k, dim=1).indices
        hit = top.eq(target[:, None])
        counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(target.numel(), device=d.device)]).double()
    model.train(was_training)
    _all_reduce(counts, d)
    n = max(counts[2].item(), 1.0)
    return 100.0 * counts[0].item() / n, 100.0 * counts[1].item() / n


# ----------------------------------------------------------------------------------- checkpoints

def _generators(model: torch.nn.Module) -> dict:
    """Random generators held by the model's modules (MixToken's numpy RandomState, torch Generators), by path."""
    out = {}
    for mname, m in model.named_modules():
        for aname, v in vars(m).items():
            if isinstance(v, (torch.Generator, np.random.RandomState)):
                out[f"{mname}.{aname}" if mname else aname] = v
    return out


def _np_state(rs) -> list:
    name, keys, pos, has_gauss, cached = rs.get_state(legacy=True)
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _set_np_state(rs, st) -> None:
    name, keys, pos, has_gauss, cached = st
    rs.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def rng_state(model: torch.nn.Module) -> dict:
    """Every random stream a step draws from, in checkpointable (weights_only) types."""
    gens = {}
    for k, g in _generators(model).items():
        gens[k] = g.get_state() if isinstance(g, torch.Generator) else _np_state(g)
    st = {"python": random.getstate(), "numpy": _np_state(np.random.mtrand._rand),
          "torch": torch.get_rng_state(), "generators": gens}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict, model: torch.nn.Module) -> None:
    random.setstate(_tuplify(st["python"]))
    _set_np_state(np.random.mtrand._rand, st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])
    gens = _generators(model)
    for k, s in st.get("generators", {}).items():
        if k in gens:
            if isinstance(gens[k], torch.Generator):
                gens[k].set_state(s)
            else:
                _set_np_state(gens[k], s)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _read_checkpoint(path: str, what: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"{what} {path}: no such file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or foreign files all end here
        raise SystemExit(f"{what} {path}: cannot read the checkpoint (corrupt or truncated?): "
                         f"{type(e).__name__}: {str(e)[:200]}") from None


def _unwrap(model):
    return getattr(model, "_orig_mod", model)


def save_training_checkpoint(path: Path, tr: "Trainer", cfg: dict, epoch: int, batches_done: int, global_step: int,
                             best: float, classes: list[str], finished_epoch: bool) -> None:
    """last.pt: models' checkpoint format (so ``load_checkpoint``/``annotate --teacher`` rebuild the model)
    plus everything a resume needs; written atomically by ``save_checkpoint``."""
    from tokenlabel.models import save_checkpoint

    save_checkpoint(
        path, _unwrap(tr.model),
        state_dict_ema=tr.ema.module.state_dict() if tr.ema is not None else None,
        optimizer=tr.optimizer.state_dict(),
        scheduler=tr.schedule.state_dict(),
        scaler=tr.scaler.state_dict() if tr.scaler is not None else None,
        rng=rng_state(tr.model),
        train_state={
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,                     # the epoch in progress (== epochs when finished)
            "samples_in_epoch": batches_done * cfg["batch_size"] * tr.d.world,  # global position: any N
            "global_step": global_step,
            "epoch_loss": [tr.epoch_loss_sum, tr.epoch_steps],  # running train loss of that epoch
            "best_metric": best,
            "world_size": tr.d.world,
            "finished_epoch": finished_epoch,
        },
        config=_plain(cfg),
        classes=list(classes),
        num_classes=len(classes),
    )


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def restore(tr: Trainer, raw: dict, path: str, cfg: dict) -> tuple[int, int, int, float]:
    ck = raw.get("train_state") if isinstance(raw, dict) else None
    need = ("epoch", "samples_in_epoch", "global_step")
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or any(k not in ck for k in need) \
            or not all(k in raw for k in ("state_dict", "optimizer", "rng")):
        raise SystemExit(f"--resume {path}: not a tokenlabel training checkpoint "
                         f"(keys: {sorted(raw)[:12] if isinstance(raw, dict) else type(raw).__name__})")
    try:
        _unwrap(tr.model).load_state_dict(raw["state_dict"])
        if tr.ema is not None and raw.get("state_dict_ema") is not None:
            tr.ema.module.load_state_dict(raw["state_dict_ema"])
        tr.optimizer.load_state_dict(raw["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise SystemExit(f"--resume {path}: the checkpoint does not fit this model/optimizer "
                         f"(it holds {raw.get('model_name')} {raw.get('model_args')}): {str(e)[:300]}") from None
    if tr.scaler is not None and raw.get("scaler"):
        tr.scaler.load_state_dict(raw["scaler"])
    global_batch = cfg["batch_size"] * tr.d.world
    samples = int(ck["samples_in_epoch"])
    if samples % global_batch:
        raise SystemExit(f"--resume {path}: the checkpoint stopped after {samples} samples of epoch {ck['epoch']}, "
                         f"not a multiple of the global batch {cfg['batch_size']} x {tr.d.world} processes; "
                         f"choose --batch-size so that it divides {samples}")
    batches_done = samples // global_batch
    if not ck.get("finished_epoch") and ck.get("epoch_loss"):
        tr.epoch_loss_sum, tr.epoch_steps = float(ck["epoch_loss"][0]), int(ck["epoch_loss"][1])
    if ck.get("world_size", tr.d.world) == tr.d.world:
        set_rng_state(raw["rng"], tr.model)  # RNG streams are per process: exact only on the same N
    else:
        print(f"[train] resuming on {tr.d.world} processes (checkpoint: {ck.get('world_size')}): "
              f"position translated to batch {batches_done} of epoch {ck['epoch']}")
    return int(ck["epoch"]), batches_done, int(ck["global_step"]), float(ck.get("best_metric", -1.0))


# ---------------------------------------------------------------------------------------- OOM

def suggest_batch_size(tr: Trainer, batch: dict, cfg: dict) -> int | None:
    """Halve the batch until a probe step (forward + backward, no optimizer update) fits."""
    bs = batch["images"].shape[0] // 2
    while bs >= 1:
        tr.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache() if tr.d.device.type == "cuda" else None
        try:
            probe = {k: (v[:bs] if torch.is_tensor(v) and v.ndim and v.shape[0] == batch["images"].shape[0] else v)
                     for k, v in batch.items()}
            with autocast(cfg, tr.d.device):
                out = _unwrap(tr.model)(probe["images"])
            compute_loss(out, probe, cfg).backward()
            tr.optimizer.zero_grad(set_to_none=True)
            return bs
        except torch.OutOfMemoryError:
            bs //= 2
    return None


# ------------------------------------------------------------------------------------------ run

class StopFlag:
    """SIGTERM/SIGINT/--time-limit/--max-steps: finish the current step, save, exit 0."""

    def __init__(self, time_limit_min: float | None, max_steps: int | None):
        self.reason = None
        self.t0 = time.monotonic()
        self.deadline = self.t0 + time_limit_min * 60 if time_limit_min else None
        self.max_steps = max_steps
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum, frame):
        self.reason = signal.Signals(signum).name

    def check(self, steps_this_run: int) -> bool:
        if self.reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.reason = "time limit"
        if self.reason is None and self.max_steps is not None and steps_this_run >= self.max_steps:
            self.reason = "max steps"
        return self.reason is not None

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _default_output(cfg: dict) -> str:
    return os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{cfg['model']}")


SUMMARY_FIELDS = ["epoch", "train_loss", "lr", "top1", "top5", "ema_top1", "ema_top5", "epoch_time_s",
                  "images_per_s", "data_wait_frac", "gpu_data_wait_frac"]


def _append_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Append rows under the file's own header. A file written by an older version that lacks some of
    ``fields`` is first rewritten (atomically) with those columns added, its rows kept, the new cells empty."""
    if path.exists():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            missing = [c for c in fields if c not in header]
            old = list(reader) if header and missing else None
        if old is not None:
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=header + missing, restval="")
                w.writeheader()
                w.writerows(old)
            os.replace(tmp, path)
        if header:
            fields = header + missing
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        if new:
            w.writeheader()
        w.writerows(rows)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    # options given on the command line (the rest of cfg comes from the config file or the defaults)
    cli_keys = frozenset(k for k in DEFAULTS if getattr(args, k, None) is not None)
    if cfg["cuda_sync"] != "auto":  # before anything touches CUDA: the primary context takes the flag at creation
        apply_cuda_sync(cfg["cuda_sync"])
    d = setup_distributed()
    loaders = []  # _run's data loaders: closed here, on every way out
    cudnn_benchmark = torch.backends.cudnn.benchmark  # set for the run (_run), restored after: no leak to a caller
    try:
        status = _run(cfg, d, loaders, cli_keys)
        # every rank returns from _run at the same point; leaving together keeps a rank from tearing
        # the process group down while its peer is still in it (seen to abort gloo at exit)
        _barrier(d)
        return status
    finally:
        # Stop the loaders' producer threads and drop their DALI pipelines while the interpreter is
        # whole: left to exit-time teardown, a CPU DALI run aborted at exit in 3 of 6 runs (SIGABRT,
        # "terminate called without an active exception") after its last epoch was written.
        for loader in loaders:
            loader.close()
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if d.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _run(cfg: dict, d: Dist, loaders: list, cli_keys: frozenset = frozenset()) -> int:
    log = print if d.main else (lambda *a, **k: None)
    if cfg["output"] is None:
        cfg["output"] = _default_output(cfg)
        if d.distributed:  # every rank must agree on the folder
            import torch.distributed as dist

            obj = [cfg["output"]]
            dist.broadcast_object_list(obj, src=0)
            cfg["output"] = obj[0]
    out = Path(cfg["output"])
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    _barrier(d)
    if cfg["data"] is None:
        cfg["data"] = make_demo_data(cfg, out, d)
        log(f"[train] demo run: {cfg['model']} {cfg['model_kwargs']} at {cfg['img_size']}px, {cfg['epochs']} epochs, "
            f"class labels{' + label maps' if cfg['labels'] else ''}")
    if cfg["loader"] is None:
        cfg["loader"] = default_backend(d.device)
    if cfg["amp"] is None:
        cfg["amp"] = "bf16" if d.device.type == "cuda" else "fp32"
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg["cudnn_benchmark"])

    # Resume target, found before anything is written so a good checkpoint is never replaced early.
    resume_path = None
    if cfg["resume"] == "auto":
        if (out / "last.pt").is_file():
            resume_path = str(out / "last.pt")
        else:
            log(f"[train] --resume auto: no {out / 'last.pt'} yet, starting from scratch")
    elif cfg["resume"]:
        resume_path = cfg["resume"]
    if resume_path is None and (out / "last.pt").is_file():
        raise SystemExit(f"--output {out} already holds a checkpoint (last.pt): pass --resume auto to continue it, "
                         f"or choose another --output")
    ck = _read_checkpoint(resume_path, "--resume") if resume_path else None

    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    train_loader, val_loader = build_loaders(cfg, d, cli_keys, log)
    loaders += [train_loader, val_loader]
    classes = list(train_loader.classes)
    model = build_model(cfg, len(classes))
    if cfg["finetune"] and ck is None:
        finetune_from(model, cfg["finetune"])
    steps_per_epoch = len(train_loader) // cfg["accum_steps"]
    global_batch = cfg["batch_size"] * cfg["accum_steps"] * d.world
    tr = Trainer(cfg, model, d, steps_per_epoch, global_batch)
    # Per-process random streams (drop path, MixToken) differ between ranks; weights start equal.
    if hasattr(model, "seed_mix_token"):
        model.seed_mix_token(cfg["seed"] + d.rank)
    torch.manual_seed(cfg["seed"] + 1000 * d.rank)
    random.seed(cfg["seed"] + 1000 * d.rank)
    np.random.seed(cfg["seed"] + 1000 * d.rank)

    start_epoch, batches_done, global_step, best = 0, 0, 0, -1.0
    if ck is not None:
        start_epoch, batches_done, global_step, best = restore(tr, ck, resume_path, cfg)
        log(f"[train] resumed from {resume_path}: epoch {start_epoch + 1}, batch {batches_done}/{len(train_loader)}, "
            f"step {global_step}")
        del ck
    if start_epoch >= cfg["epochs"]:
        log(f"[train] {out} already finished {cfg['epochs']} epochs; nothing to do")
        return 0

    if d.main:
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(_plain(cfg), sort_keys=True))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[train] {cfg['model']} ({n_params / 1e6:.2f}M params) {len(classes)} classes, "
        f"{'token labels ' + cfg['labels'] if cfg['labels'] else 'class labels only'}, loader {cfg['loader']}, "
        f"amp {cfg['amp']}, {d.world} process(es){' (DDP)' if d.distributed else ''} x batch {cfg['batch_size']}"
        f"{' x accum ' + str(cfg['accum_steps']) if cfg['accum_steps'] > 1 else ''} = {global_batch}, "
        f"lr {cfg['lr']:.3g}, {steps_per_epoch} steps/epoch, output {out}")

    stop = StopFlag(cfg["time_limit"], cfg["max_steps"])
    check_every = 10  # under torchrun: all-reduce the stop flag every 10 steps
    steps_this_run = 0
    first_step = True

    def fold_loss(acc):
        """Move the device-side running loss of the epoch into tr (so a checkpoint carries it)."""
        tr.epoch_loss_sum += (_all_reduce(acc[0].clone(), d) / d.world).item()
        tr.epoch_steps += acc[1]
        acc[0].zero_()
        acc[1] = 0

    def save_last(epoch, bdone, finished_epoch):
        if d.main:
            save_training_checkpoint(out / "last.pt", tr, cfg, epoch, bdone, global_step, best, classes,
                                     finished_epoch)
        _barrier(d)

    try:
        for epoch in range(start_epoch, cfg["epochs"]):
            train_loader.set_epoch(epoch, start_batch=batches_done)
            it = iter(train_loader)
            t_epoch = time.perf_counter()
            data_wait = 0.0
            gaps = StepGaps(d.device)  # the GPU's view of the data wait: its idle time between steps
            # on the CPU there are no events: StepGaps then times the host between steps, not a GPU
            idle_name = "GPU idle between steps" if gaps.cuda else "between steps"
            loss_acc = [torch.zeros((), device=d.device), 0]  # running loss sum and its step count
            pending = []  # (step, loss tensor, lr) not yet written to steps.csv
            n_steps = 0
            t_log, n_log = time.perf_counter(), 0
            stopped = False
            while batches_done + cfg["accum_steps"] <= steps_per_epoch * cfg["accum_steps"]:
                t0 = time.perf_counter()
                micro = [_to_device(next(it), d.device) for _ in range(cfg["accum_steps"])]
                data_wait += time.perf_counter() - t0
                gaps.begin()
                step_in_epoch = batches_done // cfg["accum_steps"]
                lr = tr.set_lr(epoch + step_in_epoch / steps_per_epoch)
                oom = False
                try:
                    loss = tr.step(micro)
                except torch.OutOfMemoryError:
                    if not first_step:
                        raise
                    oom = True  # probe outside the except block: its traceback still holds the activations
                if oom:
                    import gc

                    tr.optimizer.zero_grad(set_to_none=True)
                    gc.collect()
                    bs = suggest_batch_size(tr, micro[0], cfg)
                    hint = f"--batch-size {bs} fits in a probe step" if bs else "not even a batch of 1 fits"
                    raise SystemExit(f"[train] out of memory in the first step at --batch-size {cfg['batch_size']} "
                                     f"per process on {d.device}; {hint} (try it, or use --accum-steps to keep "
                                     f"the global batch)") from None
                first_step = False
                gaps.end()
                batches_done += cfg["accum_steps"]
                global_step += 1
                steps_this_run += 1
                n_steps += 1
                n_log += 1
                loss_acc[0] += loss
                loss_acc[1] += 1
                pending.append((global_step, epoch, loss, lr))
                last_of_epoch = batches_done >= steps_per_epoch * cfg["accum_steps"]
                if n_log >= cfg["log_every"] or last_of_epoch:
                    losses = torch.stack([p[2] for p in pending]).float()
                    _all_reduce(losses, d)
                    losses = (losses / d.world).tolist()
                    dt = time.perf_counter() - t_log
                    if d.main:
                        _append_csv(out / "steps.csv", ["step", "epoch", "loss", "lr"],
                                    [{"step": s, "epoch": e, "loss": f"{l:.6f}", "lr": f"{r:.6e}"}
                                     for (s, e, _, r), l in zip(pending, losses)])
                    log(f"[train] epoch {epoch + 1}/{cfg['epochs']} step {step_in_epoch + 1}/{steps_per_epoch} "
                        f"loss {losses[-1]:.4f} lr {lr:.3e} {n_log * global_batch / max(dt, 1e-9):.0f} img/s")
                    pending.clear()
                    t_log, n_log = time.perf_counter(), 0
                    if not all(math.isfinite(x) for x in losses):
                        raise SystemExit(f"[train] the loss became non-finite at step {global_step}; last good "
                                         f"checkpoint: {out / 'last.pt'}")
                # --max-steps is the same on every rank (no collective); signals and the clock need all ranks
                # to agree on the step, so they are all-reduced every check_every steps.
                want_stop = stop.max_steps is not None and steps_this_run >= stop.max_steps
                if want_stop:
                    stop.reason = stop.reason or "max steps"
                elif not d.distributed:
                    want_stop = stop.check(steps_this_run)  # host-only: no device sync
                elif global_step % check_every == 0 or last_of_epoch:
                    flag = torch.tensor([1.0 if stop.check(steps_this_run) else 0.0], device=d.device)
                    want_stop = _all_reduce(flag, d, op="max").item() > 0
                if want_stop and not last_of_epoch:
                    if pending:
                        losses = torch.stack([p[2] for p in pending]).float()
                        _all_reduce(losses, d)
                        if d.main:
                            _append_csv(out / "steps.csv", ["step", "epoch", "loss", "lr"],
                                        [{"step": s, "epoch": e, "loss": f"{l:.6f}", "lr": f"{r:.6e}"}
                                         for (s, e, _, r), l in zip(pending, (losses / d.world).tolist())])
                        pending.clear()
                    fold_loss(loss_acc)
                    save_last(epoch, batches_done, False)
                    stopped = True
                    break
                if cfg["save_every_steps"] and global_step % cfg["save_every_steps"] == 0 and not last_of_epoch:
                    fold_loss(loss_acc)
                    save_last(epoch, batches_done, False)
            if stopped:
                log(f"[train] stopped ({stop.reason or 'signal'}) after step {global_step} (epoch {epoch + 1}, "
                    f"batch {batches_done}/{len(train_loader)}); saved {out / 'last.pt'}. Continue with the same "
                    f"command plus --resume auto.")
                return 0
            gap_ms, span_ms = gaps.result()
            train_time = time.perf_counter() - t_epoch
            fold_loss(loss_acc)
            mean_loss = tr.epoch_loss_sum / max(tr.epoch_steps, 1)
            tr.epoch_loss_sum, tr.epoch_steps = 0.0, 0
            top1, top5 = evaluate(_unwrap(tr.model), val_loader, cfg, d)
            ema1 = ema5 = float("nan")
            if tr.ema is not None:
                ema1, ema5 = evaluate(tr.ema.module, val_loader, cfg, d)
            epoch_time = time.perf_counter() - t_epoch
            metric = ema1 if tr.ema is not None else top1
            is_best = metric > best
            best = max(best, metric)
            batches_done = 0
            row = {"epoch": epoch + 1, "train_loss": f"{mean_loss:.5f}", "lr": f"{lr:.4e}", "top1": f"{top1:.3f}",
                   "top5": f"{top5:.3f}", "ema_top1": f"{ema1:.3f}", "ema_top5": f"{ema5:.3f}",
                   "epoch_time_s": f"{epoch_time:.2f}",
                   "images_per_s": f"{n_steps * global_batch / max(train_time, 1e-9):.1f}",
                   "data_wait_frac": f"{data_wait / max(train_time, 1e-9):.4f}",
                   "gpu_data_wait_frac": f"{gap_ms / max(span_ms, 1e-9):.4f}"}
            if d.main:
                _append_csv(out / "summary.csv", SUMMARY_FIELDS, [row])
            log(f"[train] epoch {epoch + 1}/{cfg['epochs']}: loss {mean_loss:.4f} top1 {top1:.2f} top5 {top5:.2f}"
                + (f" ema top1 {ema1:.2f} top5 {ema5:.2f}" if tr.ema is not None else "")
                + f" ({epoch_time:.1f}s, {row['images_per_s']} img/s, data wait {float(row['data_wait_frac']):.1%}, "
                   f"{idle_name} {float(row['gpu_data_wait_frac']):.1%})")
            save_last(epoch + 1, 0, True)
            if is_best and d.main:
                tmp = out / f".best.pt.tmp-{os.getpid()}"  # same atomic pattern as last.pt
                with open(tmp, "wb") as f:
                    f.write((out / "last.pt").read_bytes())
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, out / "best.pt")
            if stop.check(steps_this_run) and epoch + 1 < cfg["epochs"]:
                flag = torch.tensor([1.0], device=d.device)
            else:
                flag = torch.tensor([0.0], device=d.device)
            if _all_reduce(flag, d, op="max").item() > 0:
                log(f"[train] stopped ({stop.reason}) at the end of epoch {epoch + 1}; saved {out / 'last.pt'}. "
                    f"Continue with the same command plus --resume auto.")
                return 0
        log(f"[train] done: {cfg['epochs']} epochs, best {'EMA ' if tr.ema is not None else ''}top-1 {best:.2f}; "
            f"{out / 'summary.csv'}, {out / 'best.pt'}")
        return 0
    finally:
        stop.restore()
