"""pytest set-up for the pytest-benchmark face (``pytest bench/ --benchmark-only``): without CUDA,
Triton runs interpreted and ``gpu``-marked benchmarks are skipped (as tests/conftest.py does)."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
