"""Multi-head attention backends for LV-ViT: "xformers", "sdpa", "triton", "math", and "auto".

All backends take q, k, v as ``[B, N, H, Dh]`` views straight out of the fused qkv Linear
(``qkv.view(B, N, 3, H, Dh).unbind(2)``: no copies) and return ``[B, N, H * Dh]``, ready for the
output projection.

* ``"xformers"``: ``xformers.ops.memory_efficient_attention``, whose native layout is [B, N, H, Dh],
  so neither the inputs nor the output are transposed. Imported lazily, only when asked for.
* ``"sdpa"``: ``F.scaled_dot_product_attention`` on [B, H, N, Dh] *views* (transpose of strides
  only); PyTorch picks cuDNN / flash / memory-efficient kernels. The flash and cuDNN kernels keep
  their output in [B, N, H, Dh] memory, so the final ``transpose(1, 2).reshape`` is free.
* ``"triton"``: our flash attention (``tokenlabel.kernels.flash_attention``). Through
  ``attention_qkv`` (the model's path) it reads q, k, v out of the qkv Linear's output by strides and
  hands back that output's gradient as one tensor, so no stack of dq, dk, dv follows its backward.
  CUDA only (the CPU runs it under TRITON_INTERPRET=1, for tests); a ``torch.library`` op under
  ``torch.compile``. When "auto" times it, it times both of its backward kernels and keeps the faster
  one for the shape.
* ``"math"``: the reference's plain code, ``softmax((q * scale) @ k^T) @ v``.
* ``"auto"``: on CUDA, the fastest of the available backends for this shape (forward+backward when
  gradients are on, forward otherwise), timed once per (shape, dtype, GPU name) and cached for the
  process; on the CPU, and inside a ``torch.compile`` trace with nothing cached, it is "sdpa"
  (inside a trace a cached "xformers" choice also becomes "sdpa", to keep the graph whole).
"""
from __future__ import annotations

import math
import os
import statistics
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "xformers", "sdpa", "triton", "math")

# (B, N, H, Dh, dtype, device name, grad) -> chosen backend; filled by "auto".
_AUTO_CACHE: dict[tuple, str] = {}
_AUTO_BY_SHAPE: dict[tuple, str] = {}  # the same without the GPU name, for lookups inside a trace
_XFORMERS_STATE: dict[str, object] = {}
_GPU_NAMES: dict[int, str] = {}  # "module" / "import_error" / "probe:<device>" -> result


def check_backend(name: str) -> str:
    """Return ``name`` if it is a known backend, else a ValueError listing the valid ones."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend attn={name!r}; valid: {', '.join(BACKENDS)}")
    return name


def _xformers_hint() -> str:
    cuda = torch.version.cuda or "none (CPU build)"
    return (f"xformers 0.0.35 is built for torch 2.10 and needs the CUDA 12 runtime; this is torch "
            f"{torch.__version__} with CUDA {cuda}. Use attn='sdpa' (or 'auto', which falls back)")


def _import_xformers():
    """The ``xformers.ops`` module, or None with the reason recorded; never raises."""
    if "module" in _XFORMERS_STATE:
        return _XFORMERS_STATE["module"]
    module, reason = None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            import xformers.ops as xops  # noqa: PLC0415 (lazy on purpose)

            module = xops
        except Exception as exc:  # ImportError, OSError from a missing libcudart.so.12, ...
            reason = f"import xformers.ops failed: {type(exc).__name__}: {exc}"
    notes = [str(w.message) for w in caught if "xformers" in str(w.message).lower()]
    if module is not None and notes:
        # xformers imports even when its C++/CUDA extension does not load; it warns instead.
        _XFORMERS_STATE["import_warning"] = " | ".join(notes)
    _XFORMERS_STATE["module"] = module
    _XFORMERS_STATE["import_error"] = reason
    return module


def xformers_status(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(usable, reason): whether xformers' memory-efficient attention runs on ``device``.

    Without a device only the import is checked. On a CUDA device a tiny attention call is run once
    (the extension can import yet fail at the first call when built against another torch/CUDA).
    """
    xops = _import_xformers()
    if xops is None:
        return False, f"{_XFORMERS_STATE['import_error']}. {_xformers_hint()}"
    if device is None:
        return True, "imports"
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"xformers memory_efficient_attention needs a CUDA device, got {device}"
    key = f"probe:{device}"
    if key not in _XFORMERS_STATE:
        try:
            q = torch.randn(1, 8, 2, 64, device=device, dtype=torch.bfloat16)
            xops.memory_efficient_attention(q, q, q)
            _XFORMERS_STATE[key] = (True, "works")
        except Exception as exc:
            extra = _XFORMERS_STATE.get("import_warning")
            msg = f"xformers memory_efficient_attention failed on {device}: {type(exc).__name__}: {exc}"
            if extra:
                msg += f" (at import it warned: {extra})"
            _XFORMERS_STATE[key] = (False, f"{msg}. {_xformers_hint()}")
    return _XFORMERS_STATE[key]


def _attention_math(q, k, v, scale):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, Dh] views
    attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return attn @ v  # [B, H, N, Dh]


def _attention_sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)


def _attention_xformers(q, k, v, scale):
    ok, reason = xformers_status(q.device)
    if not ok:
        raise RuntimeError(f"attn='xformers' cannot run: {reason}")
    return _XFORMERS_STATE["module"].memory_efficient_attention(q, k, v, scale=scale)  # [B, N, H, Dh]


def _flash():
    from tokenlabel.kernels import flash_attention  # noqa: PLC0415 (imports triton: only when asked for)

    return flash_attention


def cannot_run_here(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine, as a predicate ("runs on CUDA GPUs only ...", "does not
    load: ..."), or None. "xformers" and "triton" need a visible CUDA GPU (the Triton interpreter, for tests, runs
    "triton" on the CPU); "xformers" must also load."""
    if name in ("xformers", "triton") and not torch.cuda.is_available():
        if not (name == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1"):
            return "runs on CUDA GPUs only and none is visible here"
    if name == "xformers":
        ok, reason = xformers_status()
        if not ok:
            return f"does not load: {reason}"
    return None


def prepare_backend(name: str) -> str:
    """Check that backend ``name`` can be used here and import what it needs (before any torch.compile trace);
    a RuntimeError says why not ("xformers" that does not load, "triton" without Triton)."""
    check_backend(name)
    if name == "xformers":
        ok, reason = xformers_status()
        if not ok:
            raise RuntimeError(f"attn='xformers' is not available: {reason}")
    elif name == "triton":
        try:
            _flash()
        except Exception as exc:  # ImportError without triton, ...
            raise RuntimeError(f"attn='triton' is not available: {type(exc).__name__}: {exc}; use attn='sdpa'") from exc
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto",
              scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q, k, v ``[B, N, H, Dh]``; returns ``[B, N, H * Dh]``."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be [B, N, H, Dh] of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, N, H, Dh = q.shape
    scale = Dh ** -0.5 if scale is None else scale
    if backend == "auto":
        backend = resolve_auto(q)
    if backend == "xformers":
        return _attention_xformers(q, k, v, scale).reshape(B, N, H * Dh)
    if backend == "triton":
        return _flash().flash_attention(q, k, v, scale).reshape(B, N, H * Dh)
    if backend == "sdpa":
        out = _attention_sdpa(q, k, v, scale)
    elif backend == "math":
        out = _attention_math(q, k, v, scale)
    else:
        check_backend(backend)
        raise AssertionError(backend)
    return out.transpose(1, 2).reshape(B, N, H * Dh)


def attention_qkv(qkv: torch.Tensor, num_heads: int, backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """Attention over the fused qkv Linear's output ``[B, N, 3 * H * Dh]`` (q, k, v, heads inside each);
    returns ``[B, N, H * Dh]``. The model's path: "triton" takes ``qkv`` whole (its gradient comes back as one
    tensor), the other backends its three [B, N, H, Dh] views."""
    if qkv.dim() != 3 or num_heads < 1 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv must be [B, N, 3 * num_heads * head_dim] with num_heads={num_heads}, got "
                         f"{tuple(qkv.shape)}")
    B, N, C = qkv.shape
    q, k, v = qkv.view(B, N, 3, num_heads, C // (3 * num_heads)).unbind(2)
    if backend == "auto":
        backend = resolve_auto(q)
    if backend == "triton":
        return _flash().flash_attention_qkv(qkv, num_heads, scale)
    return attention(q, k, v, backend, scale)


def available_backends(device: torch.device | str) -> list[str]:
    """Concrete backends that run on ``device`` ("xformers" only where it loads and runs, "triton" on CUDA)."""
    out = ["sdpa", "math"]
    if torch.device(device).type == "cuda":
        out.insert(1, "triton")
        if xformers_status(device)[0]:
            out.insert(0, "xformers")
    return out


def _time_backend(backend, qkv, num_heads, grad: bool, reps: int = 15) -> float:
    """Median milliseconds of one call on the model's path (``attention_qkv``: the gradient of the qkv
    Linear's output, forward+backward when ``grad``): CUDA events around each call with the host ahead of the GPU
    (``bench.timing.time_calls``), so the events time the GPU's work, as in a training step where the host runs
    ahead (CUDA graphs, compile), not a backend's Python launch latency. Timed without the host ahead, "auto" once
    picked SDPA at N = 197, where our kernels' GPU time was 14% lower (bench/results/attention.csv, H100,
    2026-12-05)."""
    from tokenlabel.bench.timing import time_calls  # noqa: PLC0415 (only when timing)

    def step():
        out = attention_qkv(qkv, num_heads, backend)
        if grad:
            out.backward(gout)

    gout = torch.randn(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3, device=qkv.device, dtype=qkv.dtype)
    return statistics.median(time_calls(step, qkv.device, warmup=3, reps=reps, flush_l2=False))


def _time_triton_backwards(qkv, num_heads) -> float:
    """"triton" forward+backward timed with each of its backward kernels; the faster one is recorded for the
    shape (flash_attention.BWD_BY_SHAPE, which its autograd paths follow) and its time returned."""
    fa = _flash()
    times = {}
    for impl in fa.AUTO_BWD_IMPLS:
        with fa.use_bwd_impl(impl):
            times[impl] = _time_backend("triton", qkv, num_heads, grad=True)
    best = min(times, key=times.get)
    B, N, C = qkv.shape
    fa.BWD_BY_SHAPE[(B, N, num_heads, C // (3 * num_heads), qkv.dtype)] = best
    return times[best]


def select_backend(shape, dtype: torch.dtype, device, grad: bool = True) -> str:
    """The fastest backend for q/k/v of ``shape`` [B, N, H, Dh] on ``device``; measured once, cached.

    Falls back to "sdpa" for CPU devices. A backend that raises while being timed is skipped
    (with a warning saying why).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return "sdpa"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    B, N, H, Dh = (int(s) for s in shape)
    if device.index not in _GPU_NAMES:
        _GPU_NAMES[device.index] = torch.cuda.get_device_name(device)
    key = (B, N, H, Dh, dtype, _GPU_NAMES[device.index], bool(grad))
    if key in _AUTO_CACHE:
        return _AUTO_CACHE[key]
    best, best_ms = "sdpa", math.inf
    with torch.cuda.device(device), torch.autocast("cuda", enabled=False), torch.enable_grad() if grad else torch.no_grad():
        qkv = torch.randn(B, N, 3 * H * Dh, device=device, dtype=dtype, requires_grad=grad)
        for backend in available_backends(device):
            try:
                if backend == "triton" and grad:
                    ms = _time_triton_backwards(qkv, H)
                else:
                    ms = _time_backend(backend, qkv, H, grad=grad)
            except Exception as exc:  # e.g. a kernel without support for this head dim
                warnings.warn(f"attn='auto': backend {backend!r} skipped for q of shape {key[:4]} "
                              f"{dtype}: {type(exc).__name__}: {exc}", stacklevel=2)
                continue
            if ms < best_ms:
                best, best_ms = backend, ms
        del qkv
    _AUTO_CACHE[key] = best
    _AUTO_BY_SHAPE[(B, N, H, Dh, dtype, bool(grad))] = best
    return best


def resolve_auto(q: torch.Tensor) -> str:
    """The concrete backend "auto" stands for, for this q ([B, N, H, Dh])."""
    if not q.is_cuda:
        return "sdpa"
    grad = torch.is_grad_enabled()
    if torch.compiler.is_compiling():
        # No timing inside a trace: what an eager call measured for this shape, else sdpa. xformers'
        # Python op dispatch is not promised to trace without graph breaks, so a trace takes sdpa there.
        choice = _AUTO_BY_SHAPE.get((*q.shape, q.dtype, grad), "sdpa")
        return "sdpa" if choice == "xformers" else choice
    if torch.cuda.is_current_stream_capturing():
        return _AUTO_BY_SHAPE.get((*q.shape, q.dtype, grad), "sdpa")
    return select_backend(q.shape, q.dtype, q.device, grad)
