"""What the kernel files share: the interpreter switch, the SM count, the eager/traced dispatch of their ops, and
the ahead-of-time sm_90 build that reports a kernel's registers and spills without a GPU."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile

import torch

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_SM_COUNT: dict = {}


def interpreter_rounds_bf16_to_nearest() -> bool:
    """Make Triton's interpreter convert fp32 to bf16 as the GPU does; True once in effect.

    Triton 3.6's interpreter converts fp32 -> bf16 by truncation (``InterpreterBuilder.cast_impl`` passes no rounding
    mode to its converter), where the GPU (``cvt.rn.bf16.f32``) and torch round to nearest, ties to even. Every bf16
    value an interpreted kernel stored was then up to 1 ulp off instead of 1/2, and biased toward zero: our kernels'
    bf16 outputs measured ~2x torch's distance from an fp32 run in the CPU tests (median over 40 draws), and one draw
    in CI went past the test's bound. With this, interpreted kernels round as they do on the GPU (torch's conversion
    does the rounding). Applied when this module is imported under TRITON_INTERPRET=1."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "rounds_bf16_to_nearest", False):
        return True
    truncating = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = torch.from_numpy(np.array(src.data, dtype=np.float32))  # a copy: contiguous, writable, any ndim
            return interpreter.TensorHandle(x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16),
                                            dst_type.scalar)
        return truncating(self, src, dst_type)

    cast_impl.rounds_bf16_to_nearest = True
    builder.cast_impl = cast_impl
    return True


if INTERPRET:
    interpreter_rounds_bf16_to_nearest()


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


def compute_dtype(t):
    """The dtype an op on ``t`` computes in: autocast's where autocast is on for t's device, else t's own."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def dispatch(op, launcher, *args, check=()):
    """``op(*args)`` (the torch.library op) when ``check``'s tensors are traced, else ``launcher(*args)`` directly,
    without the ops' dispatch layers."""
    return op(*args) if traced(*check) else launcher(*args)


def aot_sm90(launch):
    """Compile one launch for sm_90 without a GPU, with the alignment hints a real launch gets (16-byte-aligned
    pointers, integers that are multiples of 16), by Triton's bundled ptxas: (registers per thread, spilled stack
    bytes, shared bytes, cp.async copies in the TTGIR). ``launch``: (kernel, grid, args without the constexprs,
    constexprs, compile options); tensors may be on the meta device."""
    import triton

    compiled = compile_sm90(launch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    stack = int(re.search(r"STACK:(\d+)", out).group(1))
    return regs, stack, compiled.metadata.shared, len(re.findall("async_copy_global_to_local", compiled.asm["ttgir"]))


def compile_sm90(launch):
    """The sm_90 build of ``launch`` (as aot_sm90 describes it): Triton's compiled kernel, its ``asm`` holding the
    TTIR, TTGIR, LLVM IR, PTX and cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, _, args, const, opts = launch
    names = [n for n in kernel.arg_names if n not in const]
    signature, attrs = {}, {}
    for name, a in zip(names, args):
        if isinstance(a, torch.Tensor):
            signature[name] = _PTR[a.dtype]
            aligned = (a.storage_offset() * a.element_size()) % 16 == 0
        elif isinstance(a, float):
            signature[name], aligned = "fp32", False
        else:
            signature[name] = "i32" if abs(a) < 2**31 else "i64"
            aligned = a % 16 == 0
        if aligned:
            attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    signature.update({n: "constexpr" for n in const})
    src = ASTSource(fn=kernel, signature=signature, constexprs=dict(const), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(opts))


@contextlib.contextmanager
def overriding(tables, key: str, value, choices, default):
    """Within the block every dict of ``tables`` (a kernel module's tilings, e.g. FWD and BWD) has ``key`` =
    ``value`` (one of ``choices``); the old values (``default`` where missing) come back afterwards."""
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    old = [t.get(key, default) for t in tables]
    for t in tables:
        t[key] = value
    try:
        yield
    finally:
        for t, v in zip(tables, old):
            t[key] = v


# TMA: the helpers of the kernels that load by tensor descriptors made on the device
def _scratch(size: int, alignment: int, stream):
    """Global scratch for the tensor descriptors kernels make on the device (linear_gelu's and flash_attention's TMA
    kernels: 128 bytes per descriptor and program)."""
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else torch.cuda.current_device())


def _ensure_allocator() -> None:
    """Triton's allocator lives in a ContextVar, so each thread that launches (autograd runs CUDA backwards in a
    thread of its own) needs it set; an allocator someone else set is kept."""
    import triton
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)  # Triton 3.6's names; elsewhere set ours each time
    if current is None or current.get() is getattr(_allocation, "_NULL_ALLOCATOR", None):
        triton.set_allocator(_scratch)


def _tma_ok(*ts) -> bool:
    """TMA needs 16-byte-aligned bases and row strides, contiguous rows."""
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 and (t.shape[-1] * t.element_size()) % 16 == 0
               for t in ts)


def _persistent_grid(tiles: int, slots: int):
    """(programs, tiles per program) for ``tiles`` output tiles on at most ``slots`` resident programs: the fewest
    rounds, then the fewest programs for them, so that at most programs - 1 tile slots redo the last tile."""
    per = -(-tiles // max(1, min(tiles, slots)))
    return -(-tiles // per), per
