"""tokenlabel: fused-kernel token labeling (LV-ViT, arXiv 2104.10858) for NVIDIA GPUs.

The public surface re-exports the pieces users reach for most; each import is lazy so that
``import tokenlabel`` stays cheap and never needs DALI, xformers or a GPU.
"""
__version__ = "0.1.0"

import os as _os

# Installed, setup.py maps kernels/ models/ dataloading/ bench/ into this package (package_dir). Run
# from a source checkout that is not installed (PYTHONPATH=.), the same folders are found by adding
# the checkout's root to this package's search path; the setup.py beside them marks a checkout.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "setup.py")) and _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)

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
