"""Registers our model names in timm's registry (when timm is installed), so
``timm.create_model("lvvit_s", num_classes=...)`` builds the same model as ``create_model``.

timm stays optional: nothing here runs at import unless timm can be found, and a failure only
warns. timm's own keyword arguments that do not apply (pretrained_cfg, cache_dir, ...) are dropped;
``pretrained=True`` is refused (nothing can be downloaded: pass a checkpoint path instead).
"""
from __future__ import annotations

import importlib.util
import sys
import warnings

from .registry import create_model, list_models

_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_strict")
__all__: list[str] = []
_registered = False


def _entrypoint(name: str):
    def build(pretrained=False, **kwargs):
        for key in _TIMM_ONLY_KWARGS:
            kwargs.pop(key, None)
        if pretrained is True:
            raise ValueError(f"{name}: no pretrained weights can be downloaded; pass pretrained=<checkpoint path>")
        return create_model(name, pretrained=pretrained or None, **{k: v for k, v in kwargs.items() if v is not None})

    build.__name__ = build.__qualname__ = name
    build.__module__ = __name__
    build.__doc__ = f"tokenlabel's {name} (see tokenlabel.models.create_model)."
    return build


def register_with_timm() -> bool:
    """Add every name of ``list_models()`` that timm does not already have to its registry."""
    global _registered
    if _registered:
        return True
    if importlib.util.find_spec("timm") is None:
        return False
    try:
        from timm.models import is_model, register_model  # noqa: PLC0415
    except Exception as exc:  # a broken timm install must not break tokenlabel
        warnings.warn(f"timm is installed but cannot be imported ({type(exc).__name__}: {exc}); "
                      f"tokenlabel models are not registered with timm", stacklevel=2)
        return False
    module = sys.modules[__name__]
    for name in list_models():
        if is_model(name):
            continue
        fn = _entrypoint(name)
        setattr(module, name, fn)  # timm appends the name to this module's __all__
        register_model(fn)
    _registered = True
    return True
