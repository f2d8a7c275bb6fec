"""pytest-benchmark face over the same providers as ``tokenlabel bench``.

    pytest bench/ --benchmark-only                         # GPU: every op/provider/shape below
    pytest bench/ --benchmark-only --benchmark-autosave    # saved JSON for `pytest-benchmark compare`
    pytest bench/ --benchmark-only -k "loss and S224"

Each case runs the provider's correctness check first (a failure fails the test, nothing is timed);
the timed function synchronises CUDA so the measured time covers the GPU work. Without CUDA only
the tiny loss cases run (Triton interpreted).
"""
import pytest
import torch

from tokenlabel.bench import registry
from tokenlabel.bench.registry import Case, CheckFailed, Skip
from tokenlabel.bench.runner import DTYPES

OPS = ("loss", "attention", "blocks", "mlp", "step")
MODES = {"loss": ("fwd+bwd",), "attention": ("fwd", "fwd+bwd"),
         "blocks": ("add_ln fwd", "add_ln fwd+bwd", "gelu fwd", "gelu fwd+bwd"), "mlp": ("fwd", "fwd+bwd"),
         "step": ("train_step",)}


def _cases(op, quick):
    module = __import__(registry.OP_MODULES[op], fromlist=["SHAPES"])
    table = module.QUICK_SHAPES if quick else module.SHAPES
    out = []
    for prov in registry.providers(op):
        if prov.name.startswith("loader_fed"):  # need --data
            continue
        for shape, (params, dtypes) in table.items():
            for dn in dtypes:
                for mode in MODES[op]:
                    marks = () if quick else (pytest.mark.gpu,)
                    if "autotune" in prov.name:  # max-autotune compiles for minutes
                        marks += (pytest.mark.slow,)
                    out.append(pytest.param(op, prov.name, shape, dict(params), dn, mode, quick, marks=marks,
                                            id=f"{op}-{prov.name}-{shape}-{dn}-{mode}"))
    return out


PARAMS = [p for op in OPS for p in _cases(op, quick=False)] + [
    p for p in _cases("loss", quick=True) if p.values[1] in ("reference_eager", "fused")]


@pytest.mark.parametrize("op,provider,shape,params,dtype,mode,quick", PARAMS)
def test_bench(benchmark, op, provider, shape, params, dtype, mode, quick):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prov = next(p for p in registry.providers(op) if p.name == provider)
    case = Case(op=op, shape=shape, params=params, dtype=DTYPES[dtype], device=device, quick=quick)
    try:
        prep = prov.fn(case)
        if prep.check is not None:
            prep.check()
    except Skip as e:
        pytest.skip(str(e))
    except CheckFailed as e:
        pytest.fail(f"correctness check failed: {e}")
    benchmark.extra_info.update(op=op, provider=provider, shape=shape, dtype=dtype, baseline=prov.baseline,
                                params=params, gpu=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    fn = prep.modes[mode]

    def timed():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info["mode"] = mode
    benchmark.pedantic(timed, rounds=3 if quick else 20, warmup_rounds=1 if quick else 3, iterations=1)
