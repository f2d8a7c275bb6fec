"""Token-labeling loss: the reference's eager algorithm, its torch.compile, the fused Triton kernel,
and the fused aux-head (Linear folded in) against Linear + fused loss.

Every provider times forward + backward (gradients of the logits, or of the features and the
head's weight for the aux-head variants). Effective GB/s counts the traffic floor of the loss:
reading the logits once and writing their gradients once, 2 * B * (1 + N) * C * itemsize bytes.
"""
from __future__ import annotations

import math

import torch

from .registry import Case, CheckFailed, Prepared, Skip, register

# name -> (params, dtypes); L = sqrt(N) tokens per side, S = label-map side, k = top-k, D = feature dim
SHAPES = {
    "S224": (dict(B=128, N=196, C=1000, S=18, k=5, D=384), ("bf16", "fp32")),
    "S384": (dict(B=64, N=576, C=1000, S=18, k=5, D=384), ("bf16",)),
    "C21841": (dict(B=128, N=196, C=21841, S=18, k=5, D=384), ("bf16",)),
}
QUICK_SHAPES = {
    "tiny": (dict(B=2, N=9, C=11, S=5, k=3, D=8), ("fp32",)),
}
# Tolerance of max |out - ref| / max |ref| against the float64 reference, by logits dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
CHECK_BATCH = 2  # the correctness check runs on the first samples of the batch (full N and C)


def make_inputs(B, N, C, S, k, dtype, device, generator=None, D=None, logits=True):
    """Realistic random inputs: teacher values like sorted-descending logits, k distinct random class
    ids per location, RandomResizedCrop-like boxes, random flips, a MixToken box on the L x L grid.

    Everything is drawn on ``device`` (with ``generator``, which must live there). ``D``: also a
    head's features [B,N,D], weight [C,D] and bias [C]; ``logits=False``: no cls/aux logits."""
    dev = torch.device(device)
    g = generator if generator is not None else torch.Generator(device=dev).manual_seed(0)
    L = math.isqrt(N)
    if L * L != N:
        raise ValueError(f"N={N} is not a square number of tokens")
    if k > C:
        raise ValueError(f"k={k} must be at most C={C}")

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=dev)

    def rand(*shape):
        return torch.rand(*shape, generator=g, device=dev)

    values = (randn(B, k, S, S) * 2 + 4).sort(dim=1, descending=True).values
    # k distinct ids per location without a [.., C] tensor: base + j * step (mod C), (k-1) * step < C
    base = torch.randint(0, C, (B, 1, S, S), generator=g, device=dev)
    step = torch.randint(1, max(2, (C - 1) // max(k - 1, 1) + 1), (B, 1, S, S), generator=g, device=dev)
    indices = (base + torch.arange(k, device=dev).view(1, k, 1, 1) * step) % C
    area = 0.08 + 0.92 * rand(B)
    ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rand(B))
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    top = rand(B) * (1 - h)
    left = rand(B) * (1 - w)
    boxes = torch.stack([top, left, h, w], 1)
    flips = rand(B) < 0.5
    # MixToken box: lambda ~ Beta(1, 1), side sqrt(1 - lambda) of the grid (drawn on the host: python ints)
    host = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=dev)))
    lam = float(torch.rand(1, generator=host))
    cut = max(1, min(L, round(L * math.sqrt(1 - lam))))
    r0 = int(torch.randint(0, L - cut + 1, (1,), generator=host))
    c0 = int(torch.randint(0, L - cut + 1, (1,), generator=host))
    inputs = dict(
        label_values=values.to(torch.float16),
        label_indices=indices.to(torch.int16 if C <= 32767 else torch.int32),
        boxes=boxes,
        flips=flips,
        mix_box=(r0, c0, r0 + cut, c0 + cut),
    )
    if logits:
        inputs["cls_logits"] = randn(B, C).to(dtype).requires_grad_()
        inputs["aux_logits"] = randn(B, N, C).to(dtype).requires_grad_()
    if D is not None:
        inputs["features"] = (randn(B, N, D) / math.sqrt(D) * 4).to(dtype).requires_grad_()
        inputs["weight"] = (randn(C, D) / math.sqrt(D)).to(dtype).requires_grad_()
        inputs["bias"] = (randn(C) * 0.1).to(dtype).requires_grad_()
    return inputs


_TARGET_KEYS = ("label_values", "label_indices", "boxes", "flips")


def _slice(inputs, b):
    out = {}
    for key, v in inputs.items():
        if key == "mix_box" or key in ("weight", "bias"):
            out[key] = v.detach().clone().requires_grad_() if torch.is_tensor(v) else v
        else:
            out[key] = v[:b].detach().clone().requires_grad_(v.requires_grad)
    return out


def _rel_err(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        raise CheckFailed(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    scale = ref.abs().max().clamp_min(1e-30)
    return float((out - ref).abs().max() / scale)


def _kernels():
    try:
        import tokenlabel.kernels as K
        from tokenlabel.kernels import reference as R
    except Exception as e:  # noqa: BLE001 - not written yet, or the extension fails
        raise Skip(f"tokenlabel.kernels not importable: {type(e).__name__}: {e}")
    return K, R


def _kernel(name):
    K, R = _kernels()
    fn = getattr(K, name, None)
    if fn is None:
        raise Skip(f"tokenlabel.kernels.{name} not available yet")
    return fn


def _logits_check(loss_fn, inputs, dtype, use_head: bool):
    """Check ``loss_fn`` on the first CHECK_BATCH samples against the float64 reference: loss and grads."""
    _, R = _kernels()
    b = min(CHECK_BATCH, inputs["cls_logits"].shape[0])

    def check():
        x = _slice(inputs, b)
        leaves = ["cls_logits"] + (["features", "weight", "bias"] if use_head else ["aux_logits"])
        loss = loss_fn(x)
        grads = torch.autograd.grad(loss, [x[n] for n in leaves])
        x64 = {n: (v.detach().double().requires_grad_() if torch.is_tensor(v) and v.is_floating_point()
                   and n not in ("label_values", "boxes") else v) for n, v in x.items()}
        aux64 = (torch.nn.functional.linear(x64["features"], x64["weight"], x64["bias"]) if use_head
                 else x64["aux_logits"])
        ref = R.token_label_cross_entropy_reference(x64["cls_logits"], aux64,
                                                    *(x64[n] for n in _TARGET_KEYS), mix_box=x64["mix_box"])
        ref_grads = torch.autograd.grad(ref, [x64[n] for n in leaves])
        errors = {"loss": _rel_err(loss, ref)}
        errors.update({f"grad_{n}": _rel_err(g, r) for n, g, r in zip(leaves, grads, ref_grads)})
        tol = TOLERANCE[dtype]
        bad = {n: e for n, e in errors.items() if not e <= tol}   # NaN fails too
        if bad:
            raise CheckFailed(", ".join(f"{n} rel err {e:.3g} > {tol:g}" for n, e in bad.items()))
        return errors

    return check


def _prepare(case: Case, loss_fn, use_head: bool = False, memory_ref=False, compare_to=None, note=""):
    p = case.params
    dtype = case.dtype
    g = torch.Generator(device=case.device).manual_seed(0)
    inputs = make_inputs(p["B"], p["N"], p["C"], p["S"], p["k"], dtype, case.device, g,
                         D=p["D"] if use_head else None)
    if use_head:
        del inputs["aux_logits"]          # never materialised by these providers
    leaves = ["cls_logits"] + (["features", "weight", "bias"] if use_head else ["aux_logits"])
    B, N, C = p["B"], p["N"], p["C"]
    esize = torch.finfo(dtype).bits // 8
    logits_bytes = B * (1 + N) * C * esize

    def fwd_bwd():
        loss = loss_fn(inputs)
        return torch.autograd.grad(loss, [inputs[n] for n in leaves])
    fwd_bwd.inputs = inputs

    grad_bytes = sum(inputs[n].numel() * inputs[n].element_size() for n in leaves)
    return Prepared(
        modes={"fwd+bwd": fwd_bwd},
        check=_logits_check(loss_fn, inputs, dtype, use_head),
        bytes=None if use_head else 2 * logits_bytes,
        memory=True,
        memory_exclude=grad_bytes,
        memory_ref=B * N * C * esize if memory_ref else None,
        compare_to=compare_to,
        notes=("GB/s counts reading the logits once and writing their grads once; mix_box on" + note),
    )


def _call(fn, x, aux=None):
    return fn(x["cls_logits"], x["aux_logits"] if aux is None else aux, *(x[n] for n in _TARGET_KEYS),
              mix_box=x["mix_box"])


@register("loss", "reference_eager", baseline=True)
def reference_eager(case: Case) -> Prepared:
    """The reference repo's eager algorithm (densify -> roi_align -> softmax -> soft CE) in the logits' dtype."""
    _, R = _kernels()
    return _prepare(case, lambda x: _call(R.reference_style_loss, x))


_COMPILED = {}


@register("loss", "reference_compile")
def reference_compile(case: Case) -> Prepared:
    """torch.compile of the reference-style eager loss."""
    _, R = _kernels()
    if "fn" not in _COMPILED:
        # one compiled graph per shape (check slice + full batch per case): lift the recompile cap
        # so dynamo never falls back to eager silently, and keep shapes static.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        _COMPILED["fn"] = torch.compile(R.reference_style_loss, dynamic=False)
    fn = _COMPILED["fn"]
    prep = _prepare(case, lambda x: _call(fn, x), note="; torch.compile default mode, static shapes")
    prep.check = _compiled_check(prep, lambda x: _call(R.reference_style_loss, x), case.dtype)
    return prep


def _compiled_check(prep, eager_fn, dtype):
    """Compiled vs eager on the full batch (one compile per shape, reused for timing); the eager code
    itself is checked against the float64 reference as the baseline provider."""
    fwd_bwd = prep.modes["fwd+bwd"]
    inputs = fwd_bwd.inputs

    def check():
        got = fwd_bwd()
        leaves = [inputs["cls_logits"], inputs["aux_logits"]]
        want = torch.autograd.grad(eager_fn(inputs), leaves)
        errors = {f"grad_{n}_vs_eager": _rel_err(g, w) for n, g, w in zip(("cls_logits", "aux_logits"), got, want)}
        tol = TOLERANCE[dtype]
        bad = {n: e for n, e in errors.items() if not e <= tol}
        if bad:
            raise CheckFailed(", ".join(f"{n} rel err {e:.3g} > {tol:g}" for n, e in bad.items()))
        return errors

    return check


@register("loss", "fused")
def fused(case: Case) -> Prepared:
    """tokenlabel.kernels.token_label_cross_entropy: targets RoI-aligned inside one Triton launch."""
    fn = _kernel("token_label_cross_entropy")
    return _prepare(case, lambda x: _call(fn, x))


@register("loss", "linear_fused")
def linear_fused(case: Case) -> Prepared:
    """Aux head as nn.Linear(D, C) then the fused loss: the [B,N,C] logits and their grads exist."""
    fused_fn = _kernel("token_label_cross_entropy")

    def loss(x):
        aux = torch.nn.functional.linear(x["features"], x["weight"], x["bias"])
        return _call(fused_fn, x, aux=aux)

    return _prepare(case, loss, use_head=True, note="; grads of features, weight, bias and cls logits")


@register("loss", "fused_linear")
def fused_linear(case: Case) -> Prepared:
    """Aux head folded into the loss (chunked): the [B,N,C] logits never exist."""
    fn = _kernel("fused_linear_token_label_cross_entropy")

    def loss(x):
        return fn(x["cls_logits"], x["features"], x["weight"], x["bias"], *(x[n] for n in _TARGET_KEYS),
                  mix_box=x["mix_box"])

    return _prepare(case, loss, use_head=True, memory_ref=True, compare_to="linear_fused",
                    note="; speedup vs linear_fused (Linear + fused loss)")


def yardsticks(device, quick: bool, context: dict) -> list[dict]:
    """A large device-to-device copy: the GB/s the loss's effective bandwidth is measured against."""
    from . import timing

    nbytes = (1 << 30) if device.type == "cuda" else (8 << 20)
    p50, p20, p80 = timing.copy_bandwidth(device, nbytes, reps=20 if device.type == "cuda" else 5)
    return [dict(provider="copy", mode="copy", shape=f"{nbytes >> 20}MiB", dtype="fp32", metric="GB/s",
                 p50=p50, p20=p20, p80=p80, unit="GB/s",
                 notes="tensor.copy_ device to device; GB/s counts read + write")]
