"""tokenlabel.models: LV-ViT (T/S/M/L) with MixToken and pluggable attention, and the CNN teacher.

    from tokenlabel.models import create_model
    model = create_model("lvvit_s", num_classes=1000, attn="auto")   # "auto" | "xformers" | "sdpa" | "math"
    cls_logits, aux_logits, mix_box = model(images)     # model.train(): MixToken on, aux un-mixed
    logits = model(images)                              # model.eval(): cls + 0.5 * max over tokens of aux

Module map: lvvit.py (LV-ViT, MixToken), attention.py (backends, "auto"), resnet.py (resnet_tiny),
registry.py (create_model, list_models), checkpoint.py (save/load, reference checkpoints,
resize_pos_embed), timm_compat.py (registration with timm when it is installed).
"""
import os as _os
import warnings as _warnings

from .attention import BACKENDS, available_backends, select_backend, xformers_status
from .checkpoint import (load_checkpoint, load_reference_checkpoint, load_state_dict_into, resize_pos_embed,
                         save_checkpoint, unwrap_model)
from .lvvit import LVViT, mix_box_mask, rand_mix_box
from .registry import MODELS, create_model, list_models
from .resnet import ResNetTiny
from .timm_compat import register_with_timm


def param_groups(model, weight_decay: float):
    """Two AdamW parameter groups: with ``weight_decay``, and without it for ``model.no_weight_decay()``."""
    model = unwrap_model(model)
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


if _os.environ.get("TOKENLABEL_NO_TIMM") != "1":
    try:
        register_with_timm()
    except Exception as _exc:  # never let timm break this import
        _warnings.warn(f"registering tokenlabel models with timm failed: {_exc}", stacklevel=2)

__all__ = [
    "BACKENDS", "LVViT", "MODELS", "ResNetTiny", "available_backends", "create_model", "list_models",
    "load_checkpoint", "load_reference_checkpoint", "load_state_dict_into", "mix_box_mask", "param_groups",
    "rand_mix_box", "register_with_timm", "resize_pos_embed", "save_checkpoint", "select_backend",
    "unwrap_model", "xformers_status",
]
