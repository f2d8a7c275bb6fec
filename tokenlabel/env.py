"""``tokenlabel env``: versions, and which of the optional backends actually work on this machine.

Every probe runs in a try block and reports its own error; nothing here needs a GPU, DALI or xformers.
``--json`` prints the same report as one JSON object.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-probe", action="store_true", help="versions only; skip the backend probes")


def _version(module: str) -> str | None:
    try:
        m = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - report any import failure
        return None if isinstance(e, ModuleNotFoundError) else f"import failed: {type(e).__name__}: {e}"
    return str(getattr(m, "__version__", "unknown"))


def _short(e: BaseException, n: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return text if len(text) <= n else text[: n - 3] + "..."


def versions() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "dali": _version("nvidia.dali"),
        "xformers": _version("xformers"),
        "timm": _version("timm"),
        "torchvision": _version("torchvision"),
        "numpy": _version("numpy"),
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                 "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count})
        try:
            info["driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        except Exception:  # noqa: BLE001
            info["driver"] = None
    return info


def probe_triton() -> dict:
    """Compile and run a tiny Triton kernel (on the GPU, or under TRITON_INTERPRET=1 on the CPU)."""
    import torch

    try:
        import triton
        import triton.language as tl
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": _short(e)}
    on_gpu = torch.cuda.is_available()
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be chosen before triton is imported: probe in a child process.
        import subprocess

        code = "import json, tokenlabel.env as e; print(json.dumps(e.probe_triton()))"
        try:
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "TRITON_INTERPRET": "1"})
            rep = json.loads(res.stdout.strip().splitlines()[-1])
        except Exception as e:  # noqa: BLE001
            return {"ok": False, "mode": "interpreter", "error": _short(e)}
        rep["note"] = "no CUDA GPU: kernels run only under TRITON_INTERPRET=1 (slow; for tests)"
        return rep
    try:
        @triton.jit
        def _add_one(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            m = offs < n
            tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=m) + 1.0, mask=m)

        x = torch.arange(100, dtype=torch.float32, device="cuda" if on_gpu else "cpu")
        _add_one[(2,)](x, 100, BLOCK=64)
        ok = bool(torch.equal(x.cpu(), torch.arange(100, dtype=torch.float32) + 1))
        return {"ok": ok, "mode": "gpu" if on_gpu else "interpreter", **({} if ok else {"error": "wrong result"})}
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "mode": "gpu" if on_gpu else "interpreter", "error": _short(e)}


def probe_dali() -> dict:
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: F401
    except ModuleNotFoundError:
        return {"ok": False, "error": "not installed (pip install -e '.[dali-cu13]' or '.[dali-cu12]')"}
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": _short(e)}
    return {"ok": True}


def probe_xformers() -> dict:
    """Import xformers and run memory_efficient_attention once: the C++/CUDA extension must load."""
    import torch

    try:
        import xformers.ops as xops
    except ModuleNotFoundError:
        return {"ok": False, "error": "not installed (pip install -e '.[xformers]')"}
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": _short(e)}
    if not torch.cuda.is_available():
        return {"ok": False, "error": "imports, but its kernels need a CUDA GPU"}
    try:
        q = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
        xops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
        return {"ok": True}
    except Exception as e:  # noqa: BLE001 - e.g. built for another torch/CUDA: show why
        return {"ok": False, "error": _short(e, 500)}


def probe_sdpa() -> dict:
    """Which scaled_dot_product_attention backends accept a LV-ViT-like shape here."""
    import torch
    import torch.nn.functional as F

    out = {}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    q = torch.randn(2, 6, 197, 64, device=dev, dtype=dt)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as e:  # noqa: BLE001
        return {"error": _short(e)}
    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}
    for short, attr in names.items():
        be = getattr(SDPBackend, attr, None)
        if be is None:
            out[short] = "not in this torch"
            continue
        try:
            with sdpa_kernel(be):
                F.scaled_dot_product_attention(q, q, q)
            if dev == "cuda":
                torch.cuda.synchronize()
            out[short] = "ok"
        except Exception as e:  # noqa: BLE001
            out[short] = "unavailable: " + _short(e, 120)
    return out


def probe_kernels() -> dict:
    """The project's own parts import (kernels, models, dataloading)."""
    out = {}
    for mod in ("tokenlabel.kernels", "tokenlabel.models", "tokenlabel.dataloading"):
        try:
            importlib.import_module(mod)
            out[mod] = "ok"
        except Exception as e:  # noqa: BLE001
            out[mod] = _short(e)
    return out


def report(probe: bool = True) -> dict:
    rep = {"versions": versions()}
    if probe:
        rep["works"] = {"triton": probe_triton(), "dali": probe_dali(), "xformers": probe_xformers(),
                        "sdpa": probe_sdpa(), "imports": probe_kernels()}
    return rep


def _print(rep: dict) -> None:
    v = rep["versions"]
    print("tokenlabel env")
    for k in ("python", "platform", "torch", "torch_cuda", "cudnn", "triton", "dali", "xformers", "timm",
              "torchvision", "numpy"):
        missing = "none (CPU build of torch)" if k in ("torch_cuda", "cudnn") else "not installed"
        print(f"  {k:12s} {v.get(k) if v.get(k) is not None else missing}")
    print(f"  {'cuda':12s} {'available' if v['cuda_available'] else 'not available'}")
    for g in v["gpus"]:
        print(f"  gpu {g['index']}: {g['name']}, {g['memory_gib']} GiB, sm_{g['capability'].replace('.', '')}, "
              f"{g['sms']} SMs")
    if "works" not in rep:
        return
    print("what works here")
    for name in ("triton", "dali", "xformers"):
        r = rep["works"][name]
        mode = f" ({r['mode']})" if r.get("mode") else ""
        print(f"  {name:12s} {'yes' if r['ok'] else 'no'}{mode}" + ("" if r["ok"] else f": {r.get('error')}"))
    print("  sdpa         " + ", ".join(f"{k} {v}" for k, v in rep["works"]["sdpa"].items()))
    for mod, st in rep["works"]["imports"].items():
        print(f"  {mod:24s} {st}")


def run(args: argparse.Namespace) -> int:
    rep = report(probe=not getattr(args, "no_probe", False))
    if getattr(args, "json", False):
        json.dump(rep, sys.stdout, indent=1, default=str)
        print()
    else:
        _print(rep)
    return 0


# How a process's threads wait for the GPU: the scheduling flag of the device's primary context (the CUDA driver's
# CU_CTX_SCHED_*). "auto", CUDA's default, spins whenever the process has no more contexts than the machine has
# logical CPUs, i.e. always here: every thread blocked on the GPU (the training loop's syncs, DALI's workers, the
# loader's copy threads) then keeps a core busy that the loader's CPU decoding could use.
CUDA_SYNC = {"auto": 0, "spin": 1, "yield": 2, "blocking": 4}


def set_cuda_sync(mode: str, device: int = 0) -> int:
    """Set how this process waits for CUDA device ``device`` (``CUDA_SYNC``'s names), through the driver API, before
    the primary context is used (call it before anything touches CUDA). Returns the scheduling flags the context
    has afterwards. Raises ValueError for an unknown mode and RuntimeError, naming the step, where the driver is
    missing or refuses."""
    if mode not in CUDA_SYNC:
        raise ValueError(f"cuda sync mode must be one of {', '.join(CUDA_SYNC)}, got {mode!r}")
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise RuntimeError(f"setting the CUDA sync mode needs the CUDA driver (libcuda.so.1), which does not load "
                           f"here: {e}") from None
    dev = ctypes.c_int()
    set_flags = getattr(lib, "cuDevicePrimaryCtxSetFlags_v2", None) or lib.cuDevicePrimaryCtxSetFlags
    steps = (("cuInit", lambda: lib.cuInit(0)),
             (f"cuDeviceGet({device})", lambda: lib.cuDeviceGet(ctypes.byref(dev), int(device))),
             (f"cuDevicePrimaryCtxSetFlags({mode})", lambda: set_flags(dev, CUDA_SYNC[mode])))
    for name, call in steps:
        rc = call()
        if rc != 0:
            raise RuntimeError(f"setting the CUDA sync mode: {name} failed with CUresult {rc}")
    flags, active = ctypes.c_uint(), ctypes.c_int()
    lib.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active))
    return flags.value & 0x7
