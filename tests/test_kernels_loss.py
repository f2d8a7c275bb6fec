"""Fused token-label loss vs the float64 reference (CPU: Triton interpreter, small shapes; GPU: `-m gpu`)."""
import itertools
import os
import random

import pytest
import torch

from tokenlabel.kernels import (TokenLabelCrossEntropy, fused_linear_token_label_cross_entropy,
                                roi_align_label_maps, token_label_cross_entropy)
from tokenlabel.kernels._tune import make_inputs
from tokenlabel.kernels.reference import (reference_style_loss, roi_align_label_maps_reference,
                                          token_label_cross_entropy_reference)

HAS_CUDA = torch.cuda.is_available()


def _run(fn, d, cls, aux, **kw):
    return fn(cls, aux, d["values"], d["indices"], d["boxes"], d["flips"], **kw)


def _loss_and_grads(fn, d, dtype, **kw):
    cls = d["cls"].detach().to(dtype).requires_grad_()
    aux = d["aux"].detach().to(dtype).requires_grad_()
    loss = _run(fn, d, cls, aux, **kw)
    loss.backward()
    return loss.detach().double(), cls.grad.double(), aux.grad.double()


def _errors(got, ref):
    """max abs error of (loss, grad cls, grad aux), each relative to the reference's largest magnitude."""
    return [((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for g, r in zip(got, ref)]


def _compare(d, dtype, kw, eager_dtype=None):
    """Fused error <= 2x the eager PyTorch error in the same dtype (+ a floor at that dtype's rounding)."""
    ref = _loss_and_grads(token_label_cross_entropy_reference, d, torch.float64, **kw)
    fused = _loss_and_grads(token_label_cross_entropy, d, dtype, **kw)
    eager = _loss_and_grads(reference_style_loss, d, eager_dtype or dtype, **kw)
    ef, ee = _errors(fused, ref), _errors(eager, ref)
    floor = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    for name, a, b in zip(("loss", "grad cls", "grad aux"), ef, ee):
        assert a <= 2 * b + floor, f"{name}: fused error {a:.3e} vs eager {b:.3e} ({kw})"
    return ef


def _kw(d, mix, smoothing, gt, box_order):
    return dict(mix_box=d["mix"] if mix else None, gt_classes=d["gt"], ground_truth=gt, smoothing=smoothing,
                box_order=box_order)


# The CPU subset of the grid (the interpreter runs every program in Python): each case picks the
# other options at random, so successive runs cover the rest of the grid.
CPU_CASES = [  # (B, L, C, S, k)
    (1, 1, 10, 12, 1),
    (3, 3, 10, 12, 5),
    (2, 3, 1001, 18, 5),
    (1, 7, 10, 18, 5),
    (3, 2, 1000, 12, 1),
    (2, 4, 10, 18, 5),
]


@pytest.mark.parametrize("B,L,C,S,k", CPU_CASES)
def test_fused_matches_reference_cpu(B, L, C, S, k, gen, device):
    rnd = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    d = make_inputs(B, L * L, C, S, k, torch.float32, device, generator=gen, flips=None)
    kw = _kw(d, rnd.random() < 0.5, rnd.choice([0.0, 0.1]), rnd.random() < 0.5, rnd.choice(["hw", "original"]))
    _compare(d, torch.float32, kw)


def test_fused_one_token_row_large_L(gen, device):
    """L = 14 (the LV-ViT-S/224 grid) for one sample: bilinear grids of 1 and 2 samples per bin."""
    d = make_inputs(1, 196, 10, 18, 5, torch.float32, device, generator=gen)
    _compare(d, torch.float32, _kw(d, True, 0.1, False, "hw"))


def test_full_box_and_flip(gen, device):
    """A full-image box (cls pooling over the whole map, the widest adaptive grid) with a flip."""
    d = make_inputs(2, 4, 10, 12, 5, torch.float32, device, generator=gen, flips=True)
    d["boxes"] = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.2, 0.1, 0.8, 0.9]], device=device)
    _compare(d, torch.float32, _kw(d, True, 0.1, True, "original"))


@pytest.fixture
def launches(monkeypatch):
    """Names of the Triton kernels launched (kernel[grid](...)), in order, while the fixture is active."""
    from triton.runtime.jit import KernelInterface

    seen = []
    real = KernelInterface.__getitem__

    def spy(self, grid):
        seen.append(getattr(self, "__name__", None) or self.fn.__name__)
        return real(self, grid)

    monkeypatch.setattr(KernelInterface, "__getitem__", spy)
    return seen


def _beyond_boxes(gen, device):
    """One ordinary crop, one box 2.2-2.8x the image (cells of 6.6-8.4 map pixels: the cells inside the image
    have >= 7 x 7 x k taps, always above the 128-entry block; 1.3-1.9x gave none for some seeds), one tall box
    starting above it."""
    u = torch.rand(3, 4, generator=gen).to(device)
    return torch.stack([torch.stack([0.1 * u[0, 0], 0.1 * u[0, 1], 0.5 + 0.4 * u[0, 2], 0.5 + 0.4 * u[0, 3]]),
                        torch.stack([-0.6 - 0.3 * u[1, 0], -0.6 - 0.3 * u[1, 1], 2.2 + 0.6 * u[1, 2],
                                     2.2 + 0.6 * u[1, 3]]),
                        torch.stack([-0.5 * u[2, 0], 0.2 * u[2, 1], 1.5 + 0.5 * u[2, 2], 0.3 + 0.2 * u[2, 3]])])


def _taps_lower_bound(d, L):
    """Per cell, a lower bound of its tap entries: map rows x columns with a non-zero RoIAlign weight, x k
    (the kernel's tap rectangle spans at least these pixels)."""
    from tokenlabel.kernels.reference import _axis_weights, box_axes

    S, k = d["values"].shape[-1], d["values"].shape[1]
    rs, rn, cs, cn = box_axes(d["boxes"].cpu(), d["flips"].cpu())
    rows = (_axis_weights(rs, rn, S, L) > 0).sum(-1)  # [B, L]
    cols = (_axis_weights(cs, cn, S, L) > 0).sum(-1)
    return rows[:, :, None] * cols[:, None, :] * k


def test_boxes_beyond_the_image_inline(gen, device, launches):
    """Cells of a box larger than the image touch more map pixels than the sorted one-block path holds: the
    token program handles them itself with the general (pairwise) dedupe (no second launch); all rows match
    the reference."""
    import tokenlabel.kernels.token_label_ce as tlce

    d = make_inputs(3, 16, 10, 12, 5, torch.float32, device, generator=gen)
    d["boxes"] = _beyond_boxes(gen, device)
    ts = tlce._sorted_block(5, 12, 4)
    taps = _taps_lower_bound(d, 4)
    assert (taps > ts).any() and (taps[0] <= ts).all(), f"TS {ts}, taps per cell {taps.tolist()}"
    _compare(d, torch.float32, _kw(d, True, 0.1, True, "hw"))
    assert launches == ["_token_rows_kernel", "_scale2_kernel"], launches  # the references launch nothing


def test_forward_is_one_fill_and_one_launch(gen, device, launches):
    """The forward is the workspace fill plus one kernel launch (MixToken and the ground-truth blend on);
    the backward is one scale launch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Fills(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if any(w in name for w in ("zeros", "zero_", "fill", "full", "ones")):
                self.ops.append(name)
            return func(*args, **(kwargs or {}))

    d = make_inputs(3, 4, 10, 12, 3, torch.float32, device, generator=gen)
    cls = d["cls"].detach().requires_grad_()
    aux = d["aux"].detach().requires_grad_()
    with Fills() as fills:
        loss = _run(token_label_cross_entropy, d, cls, aux, mix_box=d["mix"], gt_classes=d["gt"], ground_truth=True,
                    validate=False)
    assert launches == ["_token_rows_kernel"], launches
    assert fills.ops == ["aten.zeros.default"], fills.ops
    loss.backward()
    assert launches == ["_token_rows_kernel", "_scale2_kernel"], launches
    ref = _run(token_label_cross_entropy_reference, d, d["cls"].double(), d["aux"].double(), mix_box=d["mix"],
               gt_classes=d["gt"], ground_truth=True)
    assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())


def test_fused_linear_one_launch_per_chunk(gen, device, launches):
    """The chunked fused-linear path: one kernel launch per chunk (the first also does the cls rows)."""
    d = make_inputs(3, 9, 10, 12, 3, torch.float32, device, generator=gen)
    feats = torch.randn(3, 9, 6, generator=gen).to(device)
    W = torch.randn(10, 6, generator=gen).to(device)
    fused_linear_token_label_cross_entropy(d["cls"], feats, W, None, d["values"], d["indices"], d["boxes"],
                                           d["flips"], mix_box=d["mix"], chunk_samples=2)
    assert launches == ["_token_rows_kernel"] * 2, launches


@pytest.mark.parametrize("B", [1, 3])
def test_mixtoken_pairs(B, gen, device):
    """The cls rows are built by the last pooling program of each MixToken pair {b, B-1-b}: odd batches
    (the middle sample pairs with itself), B = 1, MixToken as a python box and as a device tensor, with
    the ground-truth blend."""
    d = make_inputs(B, 4, 10, 12, 3, torch.float32, device, generator=gen)
    kw = _kw(d, True, 0.1, True, "hw")
    _compare(d, torch.float32, kw)
    kw["mix_box"] = torch.tensor(d["mix"], device=device, dtype=torch.int32)
    ref = _loss_and_grads(token_label_cross_entropy_reference, d, torch.float64, **_kw(d, True, 0.1, True, "hw"))
    got = _loss_and_grads(token_label_cross_entropy, d, torch.float32, **kw)
    assert max(_errors(got, ref)) < 1e-5


def test_cls_pooling_in_many_chunks(gen, device):
    """S*S*k = 1,024 tap entries per sample: 8 pooling programs per sample (128 entries each), all of a pair
    counted by the ticket before its cls rows are built (whole-image and partial crops, odd B, GT on)."""
    import tokenlabel.kernels.token_label_ce as tlce

    d = make_inputs(3, 16, 10, 16, 4, torch.float32, device, generator=gen)
    d["boxes"][0] = torch.tensor([0.0, 0.0, 1.0, 1.0], device=device)
    w = tlce._Workspace(d["values"], d["indices"], d["boxes"], d["flips"], 3, 16, 10)
    assert w.cls_chunks == 8
    _compare(d, torch.float32, _kw(d, True, 0.0, True, "original"))


@pytest.fixture
def workspaces(monkeypatch):
    """The loss workspaces created while the fixture is active (in order)."""
    import tokenlabel.kernels.token_label_ce as tlce

    seen = []

    class Spy(tlce._Workspace):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(self)

    monkeypatch.setattr(tlce, "_workspace", Spy)
    return seen


def _forward(d, **kw):
    """The op's forward (loss, grad_cls, grad_aux) without autograd: MixToken box, ground truth, smoothing 0.1."""
    from tokenlabel.kernels.token_label_ce import token_label_ce_forward

    B, N, C = d["aux"].shape
    lam = 1 - (d["mix"][2] - d["mix"][0]) * (d["mix"][3] - d["mix"][1]) / N
    mix = torch.tensor(d["mix"], device=d["aux"].device, dtype=torch.int32)
    return token_label_ce_forward(d["cls"].detach(), d["aux"].detach(), d["values"], d["indices"], d["boxes"],
                                  d["flips"], mix, d["gt"], lam, 0.1, 1.0, 1.0, True, False, **kw)


@pytest.mark.parametrize("B,L,stripes", [(3, 3, 4), (2, 3, 8), (1, 2, 16), (4, 2, 2)])
def test_loss_stripes_and_tickets(B, L, stripes, gen, device, workspaces):
    """The loss items (B * N token rows, then ceil(B / 2) cls pairs) go round-robin into `stripes` partial sums:
    item counts that are not a multiple of the stripes, several items per stripe, and more stripes than items
    (empty stripes never close; (1, 2, 16): 5 items). Every stripe counts its items, every non-empty stripe is
    closed once, the scalar is the sum of the partials and matches the reference; the torch-sum variant agrees
    to fp32 rounding."""
    d = make_inputs(B, L * L, 10, 12, 3, torch.float32, device, generator=gen)
    loss, g_cls, g_aux = _forward(d, stripes=stripes, kernel_sum=True)
    w = workspaces[-1]
    n_items = B * L * L + (B + 1) // 2
    assert w.n_items == n_items and w.stripes == stripes
    counts = w.counts[1:stripes * 32:32].cpu()
    want = torch.tensor([len(range(s, n_items, stripes)) for s in range(stripes)], dtype=counts.dtype)
    assert torch.equal(counts, want), (counts, want)
    assert int(w.counts[stripes * 32]) == min(n_items, stripes)  # stripes closed
    parts = w.stripe_partials().double()
    assert (parts[n_items:] == 0).all()
    assert abs(loss.item() - parts.sum().item()) <= 1e-6 * abs(loss.item())
    ref = _run(token_label_cross_entropy_reference, d, d["cls"].double(), d["aux"].double(), mix_box=d["mix"],
               gt_classes=d["gt"], ground_truth=True)
    assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())
    loss_t, g_cls_t, g_aux_t = _forward(d, stripes=stripes, kernel_sum=False)
    assert abs(loss_t.item() - loss.item()) <= 1e-6 * abs(loss.item())
    assert int(workspaces[-1].counts[1:stripes * 32:32].sum()) == 0  # the torch-sum variant counts nothing
    # the gradients do not depend on how the loss is summed; on the GPU the pooled cls targets are fp32
    # atomic sums in run-dependent order, so the cls rows agree to rounding, not bit for bit
    torch.testing.assert_close(g_cls_t, g_cls, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_aux_t, g_aux, rtol=1e-5, atol=1e-7)


def test_loss_is_stored_once_not_accumulated(gen, device, monkeypatch, workspaces):
    """The program closing the last stripe stores the loss: a scalar that is not zero before the launch does
    not leak into it, and two calls in a row give the same loss (fp32 rounding apart: the partials' adds
    come in any order on the GPU)."""
    import tokenlabel.kernels.token_label_ce as tlce

    d = make_inputs(3, 9, 10, 12, 3, torch.float32, device, generator=gen)
    first, _, _ = _forward(d, kernel_sum=True)
    again, _, _ = _forward(d, kernel_sum=True)
    assert abs(first.item() - again.item()) <= 1e-6 * abs(first.item())
    assert workspaces[0].loss.data_ptr() != workspaces[1].loss.data_ptr()  # a fresh workspace per call

    class Dirty(tlce._Workspace):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.loss.fill_(1e6)

    monkeypatch.setattr(tlce, "_workspace", Dirty)
    dirty, _, _ = _forward(d, kernel_sum=True)
    assert abs(dirty.item() - first.item()) <= 1e-6 * abs(first.item())


def test_loss_stripes_in_chunked_fused_linear(gen, device, monkeypatch, workspaces):
    """The fused-linear path launches once per chunk on one workspace: the counts carry over between the
    launches, and whichever launch completes the last stripe stores the loss (4 stripes: several items each)."""
    import tokenlabel.kernels.token_label_ce as tlce

    monkeypatch.setattr(tlce, "_STRIPES", 4)
    B, L, C, D = 3, 3, 10, 6
    d = make_inputs(B, L * L, C, 12, 3, torch.float32, device, generator=gen)
    feats = torch.randn(B, L * L, D, generator=gen).to(device)
    W = torch.randn(C, D, generator=gen).to(device)
    kw = dict(mix_box=d["mix"], gt_classes=d["gt"], ground_truth=True)

    def run():
        return fused_linear_token_label_cross_entropy(d["cls"].detach(), feats, W, None, d["values"], d["indices"],
                                                      d["boxes"], d["flips"], chunk_samples=2, **kw)

    ref = token_label_cross_entropy_reference(d["cls"].double(), feats.double() @ W.double().T, d["values"],
                                              d["indices"], d["boxes"], d["flips"], **kw)
    base = tlce._workspace
    for kernel_sum in (False, True):
        class Variant(base):
            def __init__(self, *a, _sum=kernel_sum, **k):
                super().__init__(*a, **{**k, "kernel_sum": _sum})

        monkeypatch.setattr(tlce, "_workspace", Variant)
        loss_k = run()
        w = workspaces[-1]
        assert w.stripes == 4 and w.kernel_sum == kernel_sum
        # in-kernel sum: the counts carry over between the chunks' launches; torch sum: nothing is counted
        assert int(w.counts[1:4 * 32:32].sum()) == (B * L * L + 2 if kernel_sum else 0)
        assert abs(loss_k.item() - ref.item()) < 1e-5 * abs(ref.item())


def test_bad_stripes_raise(gen, device):
    d = make_inputs(1, 4, 10, 12, 3, torch.float32, device, generator=gen)
    for bad in (0, 3, 8192, 2.0):
        with pytest.raises(ValueError, match="stripes"):
            _forward(d, stripes=bad)


def test_mix_box_as_tensor_and_int32_indices(gen, device):
    d = make_inputs(3, 9, 10, 12, 5, torch.float32, device, generator=gen, index_dtype=torch.int32)
    ref = _loss_and_grads(token_label_cross_entropy_reference, d, torch.float64, **_kw(d, True, 0.1, False, "hw"))
    kw = _kw(d, True, 0.1, False, "hw")
    kw["mix_box"] = torch.tensor(d["mix"], device=device)
    got = _loss_and_grads(token_label_cross_entropy, d, torch.float32, **kw)
    assert max(_errors(got, ref)) < 1e-5


@pytest.mark.parametrize("C", [10, 16])
def test_grad_output_scaling(C, gen, device):
    """grad_output != 1 scales both gradients in backward (C 16: sizes that are multiples of 16 take the
    scale kernel's large-block grid, C 10 the small-block one)."""
    d = make_inputs(2, 4, C, 12, 3, torch.float32, device, generator=gen)
    cls = d["cls"].detach().requires_grad_()
    aux = d["aux"].detach().requires_grad_()
    (-2.5 * _run(token_label_cross_entropy, d, cls, aux, mix_box=d["mix"])).backward()
    c64 = d["cls"].detach().double().requires_grad_()
    a64 = d["aux"].detach().double().requires_grad_()
    (-2.5 * _run(token_label_cross_entropy_reference, d, c64, a64, mix_box=d["mix"])).backward()
    torch.testing.assert_close(cls.grad.double(), c64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(aux.grad.double(), a64.grad, rtol=1e-4, atol=1e-6)


def test_weights(gen, device):
    d = make_inputs(2, 4, 10, 12, 3, torch.float32, device, generator=gen)
    kw = dict(dense_weight=0.5, cls_weight=2.0, mix_box=d["mix"])
    got = _loss_and_grads(token_label_cross_entropy, d, torch.float32, **kw)
    ref = _loss_and_grads(token_label_cross_entropy_reference, d, torch.float64, **kw)
    assert max(_errors(got, ref)) < 1e-5


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_logits_give_nan(bad, gen, device):
    d = make_inputs(2, 4, 10, 12, 3, torch.float32, device, generator=gen)
    for which in ("cls", "aux"):
        cls = d["cls"].detach().clone()
        aux = d["aux"].detach().clone()
        (cls if which == "cls" else aux).view(-1)[3] = bad
        loss = _run(token_label_cross_entropy, d, cls, aux)
        assert torch.isnan(loss), f"{which} with {bad}: loss {loss}"


def test_bad_values_without_validation_give_nan(gen, device):
    """validate=False (the default on CUDA): bad ids or boxes poison the loss instead of a host sync."""
    d = make_inputs(2, 4, 10, 12, 3, torch.float32, device, generator=gen)
    idx = d["indices"].clone()
    idx[1, 0] = 10  # everywhere in one slot of sample 1: a bad id is only seen where the crop reads the map
    loss = token_label_cross_entropy(d["cls"], d["aux"], d["values"], idx, d["boxes"], d["flips"], validate=False)
    assert torch.isnan(loss)
    # a ground-truth class outside [0, C) in the middle sample of an odd batch (its pair is itself)
    d3 = make_inputs(3, 4, 10, 12, 3, torch.float32, device, generator=gen)
    loss = token_label_cross_entropy(d3["cls"], d3["aux"], d3["values"], d3["indices"], d3["boxes"], d3["flips"],
                                     gt_classes=torch.tensor([1, 2, 10], device=device), ground_truth=True,
                                     validate=False)
    assert torch.isnan(loss)
    boxes = d["boxes"].clone()
    boxes[0, 2] = -0.5
    loss = token_label_cross_entropy(d["cls"], d["aux"], d["values"], d["indices"], boxes, d["flips"],
                                     validate=False)
    assert torch.isnan(loss)


def test_fused_linear_matches_reference(gen, device):
    B, L, C, D = 2, 3, 10, 6
    d = make_inputs(B, L * L, C, 12, 3, torch.float32, device, generator=gen)
    feats = torch.randn(B, L * L, D, generator=gen).to(device)
    W = torch.randn(C, D, generator=gen).to(device)
    bias = torch.randn(C, generator=gen).to(device)
    kw = dict(mix_box=d["mix"], gt_classes=d["gt"], ground_truth=True)
    p64 = [t.double().requires_grad_() for t in (d["cls"].detach(), feats, W, bias)]
    l64 = token_label_cross_entropy_reference(p64[0], p64[1] @ p64[2].T + p64[3], d["values"], d["indices"],
                                              d["boxes"], d["flips"], **kw)
    l64.backward()
    p32 = [t.detach().float().requires_grad_() for t in p64]
    l32 = fused_linear_token_label_cross_entropy(p32[0], p32[1], p32[2], p32[3], d["values"], d["indices"],
                                                 d["boxes"], d["flips"], chunk_samples=1, **kw)
    l32.backward()
    assert abs(l32.item() - l64.item()) < 1e-5 * abs(l64.item())
    for a, b in zip(p32, p64):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-6)


def test_dense_targets_match_reference(gen, device):
    d = make_inputs(3, 16, 1001, 12, 5, torch.float32, device, generator=gen)
    for order in ("hw", "original"):
        got = roi_align_label_maps(d["values"], d["indices"], d["boxes"], d["flips"], 1001, 4, 0.1, order)
        ref = roi_align_label_maps_reference(d["values"], d["indices"], d["boxes"], d["flips"], 1001, 4, 0.1, order)
        assert got.shape == (3, 17, 1001) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got.sum(-1), torch.full((3, 17), 1 + 0.1 / 1001, device=device))


def _reference_target(d, C, L, smoothing=0.1):
    """The reference repo's [B, C, 2 + N] target (GT column, cls, tokens) from our dense targets."""
    t = roi_align_label_maps_reference(d["values"], d["indices"], d["boxes"], d["flips"], C, L, smoothing)
    gt = torch.full((t.shape[0], C), smoothing / C, dtype=torch.float64, device=t.device)
    gt.scatter_(1, d["gt"].view(-1, 1), 1 - smoothing + smoothing / C)
    return torch.cat([gt.unsqueeze(1), t], 1).transpose(1, 2)


@pytest.mark.parametrize("ground_truth", [False, True])
def test_module_dense_target_form(ground_truth, gen, device):
    B, L, C = 3, 3, 10
    d = make_inputs(B, L * L, C, 12, 5, torch.float32, device, generator=gen)
    target = _reference_target(d, C, L)
    crit = TokenLabelCrossEntropy(ground_truth=ground_truth)
    got = crit((d["cls"], d["aux"], d["mix"]), target.float())
    ref = token_label_cross_entropy_reference(d["cls"].double(), d["aux"].double(), d["values"], d["indices"],
                                              d["boxes"], d["flips"], mix_box=d["mix"], gt_classes=d["gt"],
                                              ground_truth=ground_truth)
    assert abs(got.item() - ref.item()) < 1e-5 * abs(ref.item())
    # and the sparse call form of the same module (batch dict as the loader yields it)
    batch = dict(label_values=d["values"], label_indices=d["indices"], boxes=d["boxes"], flips=d["flips"],
                 classes=d["gt"])
    fused = crit((d["cls"], d["aux"], d["mix"]), batch)
    assert abs(fused.item() - ref.item()) < 1e-5 * abs(ref.item())


def test_module_soft_target_form(gen, device):
    B, N, C = 3, 4, 10
    cls = torch.randn(B, C, generator=gen).to(device).requires_grad_()
    aux = torch.randn(B, N, C, generator=gen).to(device).requires_grad_()
    target = torch.softmax(torch.randn(B, C, generator=gen), -1).to(device)
    crit = TokenLabelCrossEntropy(dense_weight=0.5)
    mix = (0, 0, 1, 2)
    got = crit((cls, aux, mix), target)
    lam = 1 - 2 / N
    t_cls = lam * target + (1 - lam) * target.flip(0)
    ce = lambda x, t: (-t * torch.log_softmax(x, -1)).sum(-1).mean()  # noqa: E731
    want = ce(cls, t_cls) + 0.5 * ce(aux.reshape(B * N, C), target.repeat_interleave(N, 0))
    torch.testing.assert_close(got, want)
    got.backward()
    assert cls.grad is not None and aux.grad is not None
    # plain timm SoftTargetCrossEntropy form
    torch.testing.assert_close(crit(cls, target), ce(cls, target))


def test_autocast(gen, device):
    d = make_inputs(2, 4, 10, 12, 3, torch.float32, device, generator=gen)
    cls = d["cls"].detach().requires_grad_()
    aux = d["aux"].detach().requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = _run(token_label_cross_entropy, d, cls, aux, mix_box=d["mix"])
    loss.backward()
    ref = _run(token_label_cross_entropy_reference, d, d["cls"].double(), d["aux"].double(), mix_box=d["mix"])
    assert abs(loss.item() - ref.item()) < 1e-4 * abs(ref.item())
    assert cls.grad.dtype == torch.float32 and aux.grad.shape == aux.shape


def test_compile_fullgraph_through_fake(gen, device):
    """torch.compile(fullgraph=True) traces the op through its fake (aot_eager here; inductor under -m gpu)."""
    d = make_inputs(2, 4, 10, 12, 3, torch.float32, device, generator=gen)

    def f(cls, aux, values, indices, boxes, flips):
        return token_label_cross_entropy(cls, aux, values, indices, boxes, flips, mix_box=(0, 1, 2, 2),
                                         validate=False) * 1.5

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    cls = d["cls"].detach().requires_grad_()
    aux = d["aux"].detach().requires_grad_()
    loss = compiled(cls, aux, d["values"], d["indices"], d["boxes"], d["flips"])
    loss.backward()
    c64 = d["cls"].detach().double().requires_grad_()
    a64 = d["aux"].detach().double().requires_grad_()
    ref = 1.5 * token_label_cross_entropy_reference(c64, a64, d["values"], d["indices"], d["boxes"], d["flips"],
                                                    mix_box=(0, 1, 2, 2))
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())
    torch.testing.assert_close(aux.grad.double(), a64.grad, rtol=1e-4, atol=1e-7)


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tokenlabel.kernels.token_label_ce import token_label_ce_op

    with FakeTensorMode():
        cls = torch.empty(4, 7, dtype=torch.bfloat16)
        aux = torch.empty(4, 9, 7, dtype=torch.bfloat16)
        v = torch.empty(4, 2, 5, 5, dtype=torch.float16)
        i = torch.empty(4, 2, 5, 5, dtype=torch.int16)
        loss, gc, ga = token_label_ce_op(cls, aux, v, i, torch.empty(4, 4), torch.empty(4, dtype=torch.bool), None,
                                         None, 1.0, 0.1, 1.0, 1.0, False, False)
        assert loss.shape == () and loss.dtype == torch.float32
        assert gc.shape == cls.shape and ga.shape == aux.shape and ga.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# GPU: the full grid, half precisions, real torch.compile, realistic shapes
# --------------------------------------------------------------------------------------------
GRID_FACTORS = ([10, 1000, 1001], [1, 5], [12, 18], [1, 7, 14, 24], [1, 3],  # C, k, S, L, B
                [False, True], [0.0, 0.1], [False, True], ["hw", "original"])  # mix, smoothing, gt, box order


def pairwise_cases(factors):
    """A greedy pairwise covering of the product of `factors`: every pair of values of every two factors
    appears in at least one case (13 cases for GRID_FACTORS instead of 1,536). Each case compiles its own
    kernel variant (N, L, S, k and the options are constexprs), ~3 s apiece on the GPU machine."""
    def pairs(row):
        return {(i, row[i], j, row[j]) for i in range(len(row)) for j in range(i + 1, len(row))}

    todo = set().union(*(pairs(r) for r in itertools.product(*factors)))
    rows, every = [], list(itertools.product(*factors))
    while todo:
        best = max(every, key=lambda r: len(pairs(r) & todo))
        rows.append(best)
        todo -= pairs(best)
    return rows


# TOKENLABEL_FULL_GRID=1 runs the whole product (about an hour on an H100, nearly all of it compiling).
GPU_GRID = (list(itertools.product(*GRID_FACTORS)) if os.environ.get("TOKENLABEL_FULL_GRID") == "1"
            else pairwise_cases(GRID_FACTORS))


def test_pairwise_cases_cover_every_pair():
    rows = pairwise_cases(GRID_FACTORS)
    for i, j in itertools.combinations(range(len(GRID_FACTORS)), 2):
        seen = {(r[i], r[j]) for r in rows}
        assert seen == set(itertools.product(GRID_FACTORS[i], GRID_FACTORS[j])), (i, j)
    assert len(rows) < 20


@pytest.mark.gpu
@pytest.mark.parametrize("C,k,S,L,B,mix,smoothing,gt,order", GPU_GRID)
def test_full_grid_gpu(C, k, S, L, B, mix, smoothing, gt, order, gen):
    d = make_inputs(B, L * L, C, S, k, torch.float32, "cuda", generator=gen)
    _compare(d, torch.float32, _kw(d, mix, smoothing, gt, order))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,L,C", [(128, 14, 1000), (3, 7, 1001), (64, 24, 1000)])
def test_half_precision_error_gpu(dtype, B, L, C, gen):
    d = make_inputs(B, L * L, C, 18, 5, torch.float32, "cuda", generator=gen)
    _compare(d, dtype, _kw(d, True, 0.1, True, "hw"))


@pytest.mark.gpu
@pytest.mark.parametrize("stripes", [128, 256])
def test_loss_sum_repeatable_gpu(stripes, gen, workspaces):
    """S/224 bf16 (25,088 token rows and 64 cls pairs over the stripes, under real concurrency): every stripe
    closes, repeated calls agree to fp32 rounding, the in-kernel sum equals the torch sum of the partials."""
    d = make_inputs(128, 196, 1000, 18, 5, torch.bfloat16, "cuda", generator=gen)
    losses = [_forward(d, stripes=stripes, kernel_sum=True)[0].item() for _ in range(3)]
    w = workspaces[-1]
    assert int(w.counts[stripes * 32]) == stripes
    assert abs(w.loss.item() - w.stripe_partials().double().sum().item()) <= 1e-6 * abs(losses[0])
    assert max(losses) - min(losses) <= 2e-6 * abs(losses[0]), losses
    torch_sum = _forward(d, stripes=stripes, kernel_sum=False)[0].item()
    assert abs(torch_sum - losses[0]) <= 2e-6 * abs(losses[0])
    ref = token_label_cross_entropy_reference(d["cls"].double(), d["aux"].double(), d["values"], d["indices"],
                                              d["boxes"], d["flips"], mix_box=d["mix"], gt_classes=d["gt"],
                                              ground_truth=True)
    assert abs(losses[0] - ref.item()) < 1e-3 * abs(ref.item())


@pytest.mark.gpu
def test_large_vocab_gpu(gen):
    d = make_inputs(2, 49, 21841, 18, 5, torch.float32, "cuda", generator=gen, index_dtype=torch.int32)
    _compare(d, torch.float32, _kw(d, True, 0.1, True, "hw"))


@pytest.mark.gpu
def test_compile_inductor_gpu(gen):
    d = make_inputs(8, 196, 1000, 18, 5, torch.bfloat16, "cuda", generator=gen)

    def f(cls, aux, values, indices, boxes, flips):
        return token_label_cross_entropy(cls, aux, values, indices, boxes, flips, mix_box=(2, 3, 9, 10))

    compiled = torch.compile(f, fullgraph=True)
    cls = d["cls"].detach().requires_grad_()
    aux = d["aux"].detach().requires_grad_()
    loss = compiled(cls, aux, d["values"], d["indices"], d["boxes"], d["flips"])
    loss.backward()
    c2 = d["cls"].detach().requires_grad_()
    a2 = d["aux"].detach().requires_grad_()
    eager = f(c2, a2, d["values"], d["indices"], d["boxes"], d["flips"])
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(aux.grad, a2.grad)


@pytest.mark.gpu
def test_fused_linear_gpu_memory(gen):
    B, N, D, C = 16, 196, 384, 21841
    d = make_inputs(B, N, C, 18, 5, torch.bfloat16, "cuda", generator=gen, index_dtype=torch.int32)
    feats = torch.randn(B, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lin = torch.nn.Linear(D, C, device="cuda", dtype=torch.bfloat16)
    kw = dict(mix_box=d["mix"])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fused_linear_token_label_cross_entropy(d["cls"], feats, lin.weight, lin.bias, d["values"], d["indices"],
                                                  d["boxes"], d["flips"], **kw)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < B * N * C * 2, f"peak {peak / 2**20:.0f} MiB >= logits {B * N * C * 2 / 2**20:.0f} MiB"
    ref = token_label_cross_entropy_reference(d["cls"].double(), (feats.double() @ lin.weight.double().T
                                              + lin.bias.double()), d["values"], d["indices"], d["boxes"],
                                              d["flips"], **kw)
    assert abs(loss.item() - ref.item()) < 2e-2 * abs(ref.item())


def test_backward_hands_over_the_gradient_buffer(gen, device, monkeypatch):
    """The gradient written by the forward becomes .grad itself: no logits-sized copy in backward."""
    from tokenlabel.kernels import token_label_ce as tlce

    seen = {}
    real = tlce.token_label_ce_forward

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen["aux"], seen["cls"] = out[2].data_ptr(), out[1].data_ptr()
        return out

    monkeypatch.setattr(tlce, "token_label_ce_forward", spy)
    d = make_inputs(2, 4, 10, 12, 3, torch.float32, device, generator=gen)
    cls = d["cls"].detach().requires_grad_()
    aux = d["aux"].detach().requires_grad_()
    loss = _run(token_label_cross_entropy, d, cls, aux, mix_box=d["mix"])
    loss.backward()
    assert aux.grad.data_ptr() == seen["aux"] and cls.grad.data_ptr() == seen["cls"]
    with pytest.raises(RuntimeError, match="once"):
        loss2 = _run(token_label_cross_entropy, d, cls.detach().requires_grad_(), aux.detach().requires_grad_())
        loss2.backward(retain_graph=True)
        loss2.backward()


def test_cpu_fallback_without_triton(gen, monkeypatch):
    """CPU tensors without TRITON_INTERPRET (e.g. `tokenlabel train` on a laptop) take the eager path."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    d = make_inputs(2, 9, 10, 12, 3, torch.float32, "cpu", generator=gen)
    kw = _kw(d, True, 0.1, True, "original")
    got = _loss_and_grads(token_label_cross_entropy, d, torch.float32, **kw)
    ref = _loss_and_grads(token_label_cross_entropy_reference, d, torch.float64, **kw)
    assert max(_errors(got, ref)) < 1e-5
    feats = torch.randn(2, 9, 4, generator=gen)
    W = torch.randn(10, 4, generator=gen)
    loss = fused_linear_token_label_cross_entropy(d["cls"], feats, W, None, d["values"], d["indices"], d["boxes"],
                                                  d["flips"], **kw)
    want = token_label_cross_entropy_reference(d["cls"].double(), feats.double() @ W.double().T, d["values"],
                                               d["indices"], d["boxes"], d["flips"], **kw)
    assert abs(loss.item() - want.item()) < 1e-5 * abs(want.item())


def test_custom_op_path_matches_eager_function(gen, device):
    """The custom op (the torch.compile path) and the eager autograd.Function give the same loss and
    gradients; the op's gradient outputs are non-differentiable (nothing to materialise in backward)."""
    from tokenlabel.kernels.token_label_ce import TokenLabelCEFunction, token_label_ce_op

    d = make_inputs(3, 9, 11, 10, 3, torch.float32, device, generator=gen)
    mix = torch.tensor([0, 1, 2, 3], device=device)  # int64: read as is by the kernel
    args = (d["values"], d["indices"], d["boxes"], d["flips"], mix, None, 1.0, 0.1, 0.7, 1.3, False, False)
    c1, a1 = d["cls"].detach().requires_grad_(), d["aux"].detach().requires_grad_()
    loss1, gc, ga = token_label_ce_op(c1, a1, *args)
    assert not gc.requires_grad and not ga.requires_grad
    (3.0 * loss1).backward()
    c2, a2 = d["cls"].detach().requires_grad_(), d["aux"].detach().requires_grad_()
    loss2 = TokenLabelCEFunction.apply(c2, a2, *args)
    (3.0 * loss2).backward()
    c64, a64 = d["cls"].detach().double().requires_grad_(), d["aux"].detach().double().requires_grad_()
    ref = token_label_cross_entropy_reference(c64, a64, d["values"], d["indices"], d["boxes"], d["flips"],
                                              mix_box=(0, 1, 2, 3), dense_weight=0.7, cls_weight=1.3)
    (3.0 * ref).backward()
    torch.testing.assert_close(loss1.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss2.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for got in (c1.grad, c2.grad):
        torch.testing.assert_close(got.double(), c64.grad, rtol=1e-4, atol=1e-6)
    for got in (a1.grad, a2.grad):
        torch.testing.assert_close(got.double(), a64.grad, rtol=1e-4, atol=1e-6)


def test_integer_flips_and_fp64_boxes_read_directly(gen, device):
    """Flips given as int64 (any non-zero = flipped) and float64 boxes give the bool/fp32 result."""
    d = make_inputs(4, 9, 12, 10, 3, torch.float32, device, generator=gen)
    flips = torch.tensor([0, 1, 1, 0], device=device, dtype=torch.bool)
    d["flips"] = flips
    want = _loss_and_grads(token_label_cross_entropy, d, torch.float32, mix_box=d["mix"])
    d2 = dict(d, flips=flips.to(torch.int64) * 7, boxes=d["boxes"].double())
    got = _loss_and_grads(token_label_cross_entropy, d2, torch.float32, mix_box=d["mix"])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_gpu_peak_extra_memory_is_small(gen):
    """fwd + bwd allocates nothing logits-sized beyond the gradients it returns (the materialised zero
    gradients of v2 cost one more [B, N, C] buffer)."""
    B, N, C = 16, 196, 1000
    d = make_inputs(B, N, C, 18, 5, torch.bfloat16, "cuda", generator=gen)
    cls = d["cls"].detach().to(torch.bfloat16).requires_grad_()
    aux = d["aux"].detach().to(torch.bfloat16).requires_grad_()
    for _ in range(2):  # the first call compiles; measure the second
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = _run(token_label_cross_entropy, d, cls, aux, mix_box=d["mix"])
        grads = torch.autograd.grad(loss, [cls, aux])
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before - sum(g.numel() * g.element_size() for g in grads)
        del loss, grads
    assert extra < 0.1 * aux.numel() * aux.element_size(), f"peak extra {extra / 2**20:.2f} MiB"
