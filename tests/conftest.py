"""Test set-up shared by every test file.

Without CUDA, Triton kernels run under the interpreter (TRITON_INTERPRET=1): that variable must be
set before triton is first imported, so it is set here, at collection time. Tests marked ``gpu``
skip cleanly without CUDA; run them on the GPU machine with ``pytest -m gpu``.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device tests run on: CUDA where present, else the CPU (Triton interpreted)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def gen():
    """A fresh, unseeded-by-test generator: every run draws new random inputs; the seed is printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    print(f"random seed {seed}")
    return g
