"""Fixtures shared by the test files. The CUDA/interpreter set-up and the skipping of ``gpu``-marked
tests live in the checkout's root conftest.py, which also serves ``pytest bench/``."""
import os

import pytest
import torch


@pytest.fixture
def device():
    """The device tests run on: CUDA where present, else the CPU (Triton interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def gen():
    """A fresh generator per test: every run draws new random inputs; the seed is printed on failure,
    and ``TOKENLABEL_TEST_SEED=<seed> pytest <test id>`` replays that draw."""
    pinned = os.environ.get("TOKENLABEL_TEST_SEED")
    seed = int(pinned) if pinned else int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    print(f"random seed {seed}")
    return g
