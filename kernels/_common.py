"""What the kernel files share: the interpreter switch, the SM count, and the eager/traced dispatch of their ops."""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_SM_COUNT: dict = {}


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (2 elsewhere: the interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 2
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device.index]


def traced(*tensors) -> bool:
    """Inside torch.compile's tracing (which may build a backward lazily on fake/functional tensor subclasses with
    is_compiling() False): the ops' torch.library form is needed, whose fakes give the shapes."""
    return torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors)


def dispatch(op, launcher, *args, check=()):
    """``op(*args)`` (the torch.library op) when ``check``'s tensors are traced, else ``launcher(*args)`` directly,
    without the ops' dispatch layers."""
    return op(*args) if traced(*check) else launcher(*args)
