"""tokenlabel.dataloading: label-map store, annotator, DALI and PIL training pipelines.

DALI is imported lazily (only when a DALI loader is built), with an install hint when missing.
Module map (one owner each):
  store.py      LabelStore: memory-mapped top-k label maps + index from image path to row
  synthetic.py  make_synthetic_imagefolder: a small real-JPEG ImageFolder for tests and demos
  annotate.py   the annotator (`tokenlabel annotate`)
  labels_cli.py `tokenlabel labels import|info`
  loader.py     build_loader (backend "dali" | "torch") and the shared GPU tail (finish_batch)
  sampling.py   sampler, counter RNG, crop/erasing draws, label-map warps
  randaugment.py  RandAugment draws, PIL engine, torch engine (the reference)
  ra_kernel.py  the GPU tail in Triton: RandAugment + flip + normalise + erasing from one table
  packing.py    one host->device copy per batch for all metadata
"""
_LAZY = {
    "LabelStore": "tokenlabel.dataloading.store",
    "make_synthetic_imagefolder": "tokenlabel.dataloading.synthetic",
    "annotate": "tokenlabel.dataloading.annotate",
    "build_loader": "tokenlabel.dataloading.loader",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tokenlabel.dataloading' has no attribute {name!r}")


__all__ = sorted(_LAZY)
