"""Model names -> constructors: ``create_model`` and ``list_models``.

LV-ViT configurations are the reference's (§5 of reference/token_labeling.md); the suffixed names
are the same architectures at the resolutions the reference released (pos_embed sized to match).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .attention import check_backend, xformers_status
from .lvvit import IMAGENET_MEAN, IMAGENET_STD, LVViT
from .resnet import ResNetTiny


@dataclass(frozen=True)
class ModelSpec:
    family: str                     # "lvvit" | "resnet"
    args: dict = field(default_factory=dict)
    img_size: int = 224
    crop_pct: float = 0.9
    drop_path_rate: float = 0.0     # the reference recipe's value (T .1, S .1, M .2, L .3)


_LVVIT = {
    "t": dict(depth=12, embed_dim=240, num_heads=4, mlp_ratio=3.0, skip_lam=1.0, stem_channels=64),
    "s": dict(depth=16, embed_dim=384, num_heads=6, mlp_ratio=3.0, skip_lam=2.0, stem_channels=64),
    "m": dict(depth=20, embed_dim=512, num_heads=8, mlp_ratio=3.0, skip_lam=2.0, stem_channels=64),
    "l": dict(depth=24, embed_dim=768, num_heads=12, mlp_ratio=3.0, skip_lam=3.0, stem_channels=128),
}
_DPR = {"t": 0.1, "s": 0.1, "m": 0.2, "l": 0.3}

MODELS: dict[str, ModelSpec] = {}
for _size, _res in (("t", (224,)), ("s", (224, 384)), ("m", (224, 384, 448)), ("l", (224, 288, 448, 512))):
    for _r in _res:
        _name = f"lvvit_{_size}" + ("" if _r == 224 else f"_{_r}")
        _crop = (0.9 if _size in "ts" else 1.0) if _r == 224 else 1.0
        MODELS[_name] = ModelSpec("lvvit", _LVVIT[_size], _r, _crop, _DPR[_size])
MODELS["resnet_tiny"] = ModelSpec("resnet", {}, 32, 1.0, 0.0)

_LVVIT_OVERRIDES = ("depth", "embed_dim", "num_heads", "mlp_ratio", "skip_lam", "stem_channels", "patch_size",
                    "in_chans", "qkv_bias", "mix_token_seed")
_RESNET_OVERRIDES = ("widths", "depths", "strides", "in_chans")


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names (optionally those containing ``pattern``), sorted."""
    return sorted(n for n in MODELS if pattern is None or pattern in n)


def create_model(name: str, num_classes: int = 1000, attn: str = "auto", drop_path_rate: float | None = None,
                 img_size: int | None = None, mix_token: bool = True, pretrained: str | os.PathLike | None = None,
                 **overrides):
    """Build model ``name`` (see ``list_models()``).

    ``drop_path_rate=None`` takes the reference recipe's rate for that size; ``img_size=None`` the
    name's resolution. ``overrides`` change the architecture (LV-ViT: depth, embed_dim, num_heads,
    mlp_ratio, skip_lam, stem_channels, patch_size, in_chans, qkv_bias, mix_token_seed; resnet_tiny:
    widths, depths, strides, in_chans). ``pretrained``: a checkpoint path (ours, or the reference
    repo's ``.pth.tar``); its position embedding is resized when ``img_size`` differs from it.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_models())}")
    spec = MODELS[name]
    check_backend(attn)
    if spec.family == "resnet":
        bad = sorted(set(overrides) - set(_RESNET_OVERRIDES))
        if bad:
            raise ValueError(f"unknown override(s) {bad} for {name}; valid: {', '.join(_RESNET_OVERRIDES)}")
        args = dict(num_classes=num_classes, img_size=img_size or spec.img_size, **overrides)
        model = ResNetTiny(**args)
    else:
        bad = sorted(set(overrides) - set(_LVVIT_OVERRIDES))
        if bad:
            raise ValueError(f"unknown override(s) {bad} for {name}; valid: {', '.join(_LVVIT_OVERRIDES)}")
        if attn == "xformers":
            ok, reason = xformers_status()
            if not ok:
                raise RuntimeError(f"attn='xformers' is not available: {reason}")
        args = {**spec.args, **overrides, "num_classes": num_classes, "img_size": img_size or spec.img_size,
                "drop_path_rate": spec.drop_path_rate if drop_path_rate is None else float(drop_path_rate),
                "attn": attn, "mix_token": mix_token}
        model = LVViT(**args)
    model.model_name = name
    model.model_args = dict(args)  # what save_checkpoint stores to rebuild the model
    size = args["img_size"]
    model.default_cfg = {
        "architecture": name, "num_classes": num_classes, "input_size": (args.get("in_chans", 3), size, size),
        "crop_pct": spec.crop_pct, "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        "token_label_size": model.patch_grid, "classifier": "head",
    }
    if pretrained is not None:
        from .checkpoint import load_checkpoint  # noqa: PLC0415 (checkpoint imports this module)

        load_checkpoint(pretrained, model, strict=True, resize_pos_embed=True)
    return model
