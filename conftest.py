"""pytest set-up for the whole checkout: the tests (``tests/``) and the pytest-benchmark face
(``pytest bench/ --benchmark-only``).

Without CUDA, Triton kernels run under the interpreter (TRITON_INTERPRET=1): that variable must be
set before triton is first imported, so it is set here, at collection time. Items marked ``gpu``
skip cleanly without CUDA; run them on the GPU machine with ``pytest -m gpu``.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Imported now, in interpreter mode: triton.language's own @jit helpers (tl.zeros, tl.sum, ...) take the mode
    # at their first import, and a test that unsets the variable (the GPU-only refusals) must not be the one that
    # first imports triton, or every interpreted kernel after it fails.
    import triton.language  # noqa: F401, E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
