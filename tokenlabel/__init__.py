"""tokenlabel: fused-kernel token labeling (LV-ViT, arXiv 2104.10858) for NVIDIA GPUs.

The public surface re-exports the pieces users reach for most; each import is lazy so that
``import tokenlabel`` stays cheap and never needs DALI, xformers or a GPU.
"""
__version__ = "0.1.0"

_LAZY = {
    "token_label_cross_entropy": "tokenlabel.kernels",
    "TokenLabelCrossEntropy": "tokenlabel.kernels",
    "roi_align_label_maps": "tokenlabel.kernels",
    "create_model": "tokenlabel.models",
    "build_loader": "tokenlabel.dataloading",
    "LabelStore": "tokenlabel.dataloading",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tokenlabel' has no attribute {name!r}")


__all__ = sorted(_LAZY)
