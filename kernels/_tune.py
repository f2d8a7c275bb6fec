"""Timing and memory of the fused token-label loss on the GPU (the numbers in kernels/NOTES.md).

    python -m tokenlabel.kernels._tune            # all shapes, prints one line per (shape, provider)
    python -m tokenlabel.kernels._tune --quick    # S/224 only, no torch.compile

Providers: fused (this package), eager (reference_style_loss, the reference repo's algorithm),
compiled (torch.compile of the eager code), fused_linear (aux head folded in; features [B, N, 384]).
Each is checked against the float64 reference on a small batch before any timing. Times are
fwd+bwd in ms from triton.testing.do_bench (median, p20, p80); GB/s counts one read of the logits and
one write of their gradients; extra memory is the peak allocated during fwd+bwd beyond the inputs,
the logits and their gradients.
"""
from __future__ import annotations

import argparse
import math

import torch


def make_inputs(B, N, C, S, k, dtype, device, seed=0, requires_grad=True, generator=None, flips=None,
                mix=True, index_dtype=torch.int16):
    """Random loss inputs like a training batch: RandomResizedCrop boxes, k distinct classes per location."""
    g = generator if generator is not None else torch.Generator(device="cpu").manual_seed(seed)
    L = math.isqrt(N)
    cls = torch.randn(B, C, generator=g).to(device=device, dtype=dtype)
    aux = torch.randn(B, N, C, generator=g).to(device=device, dtype=dtype)
    values = (torch.randn(B, k, S, S, generator=g) * 4).sort(dim=1, descending=True).values.to(torch.float16)
    # k distinct classes per location
    idx = torch.empty(B, k, S, S, dtype=index_dtype)
    for b in range(B):
        idx[b] = torch.rand(S * S, C, generator=g).argsort(-1)[:, :k].T.reshape(k, S, S).to(index_dtype)
    scale = torch.empty(B).uniform_(0.08, 1.0, generator=g)
    ratio = torch.exp(torch.empty(B).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g))
    h = torch.sqrt(scale / ratio).clamp(max=1.0)
    w = torch.sqrt(scale * ratio).clamp(max=1.0)
    t = torch.rand(B, generator=g) * (1 - h)
    l = torch.rand(B, generator=g) * (1 - w)
    boxes = torch.stack([t, l, h, w], 1)
    if flips is None:
        flips = torch.rand(B, generator=g) < 0.5
    else:
        flips = torch.full((B,), bool(flips))
    gt = torch.randint(0, C, (B,), generator=g)
    if mix:
        r0 = int(torch.randint(0, L, (1,), generator=g))
        c0 = int(torch.randint(0, L, (1,), generator=g))
        r1 = int(torch.randint(r0, L + 1, (1,), generator=g))
        c1 = int(torch.randint(c0, L + 1, (1,), generator=g))
        mix = (r0, c0, r1, c1)
    else:
        mix = None
    out = dict(cls=cls.requires_grad_(requires_grad), aux=aux.requires_grad_(requires_grad),
               values=values.to(device), indices=idx.to(device), boxes=boxes.to(device), flips=flips.to(device),
               gt=gt.to(device), mix=mix)
    return out


def _call(fn, d, **kw):
    return fn(d["cls"], d["aux"], d["values"], d["indices"], d["boxes"], d["flips"], mix_box=d["mix"],
              gt_classes=d["gt"], ground_truth=True, **kw)


def check(fn, name, device, dtype, C=1000, tol=None):
    from tokenlabel.kernels.reference import token_label_cross_entropy_reference as ref

    d = make_inputs(4, 49, C, 18, 5, dtype, device, seed=1)
    loss = _call(fn, d)
    loss.backward()
    d64 = {k: (v.detach().double().requires_grad_() if k in ("cls", "aux") else v) for k, v in d.items()}
    l64 = _call(ref, d64)
    l64.backward()
    err = max(abs(loss.item() - l64.item()) / abs(l64.item()),
              (d["aux"].grad.double() - d64["aux"].grad).abs().max().item() / d64["aux"].grad.abs().max().item(),
              (d["cls"].grad.double() - d64["cls"].grad).abs().max().item() / d64["cls"].grad.abs().max().item())
    tol = tol if tol is not None else (1e-4 if dtype == torch.float32 else 3e-2)
    status = "ok" if err <= tol else "FAIL"
    print(f"check {name:13s} {str(dtype):15s} rel.err {err:.2e} {status}", flush=True)
    return err


def copy_bandwidth(device):
    import triton.testing as tt

    x = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = tt.do_bench(lambda: y.copy_(x), quantiles=[0.5])
    return 2 * x.numel() / (ms[0] if isinstance(ms, (list, tuple)) else ms) / 1e6  # GB/s


def peak_bytes(step):
    """Peak bytes one call of ``step`` allocates beyond what was allocated before it (after a warm-up call)."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bench_one(fn, d, bytes_moved, logits_bytes):
    import triton.testing as tt

    def step():
        _call(fn, d).backward()

    extra = peak_bytes(step) - logits_bytes  # less the gradients of the logits
    q = tt.do_bench(step, quantiles=[0.5, 0.2, 0.8], grad_to_none=[d["cls"], d["aux"]])
    return q, bytes_moved / q[0] / 1e6, extra / 2**20


def graph_time(fn, d):
    """fwd+bwd replayed from a CUDA graph: GPU time without the Python/launch overhead (ms p50/p20/p80)."""
    import triton.testing as tt

    def step():
        d["cls"].grad = None
        d["aux"].grad = None
        _call(fn, d).backward()

    try:
        q = tt.do_bench_cudagraph(step, quantiles=[0.5, 0.2, 0.8])
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"  cuda graph timing failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None
    return q


SWEEP = [  # (TS1, warps, register cap) of the token-row kernel; None = the launcher's default
    (None, 1, 64),  # v5 default: one warp per row, 32-entry sort for 2 x 2-pixel cells, 64 registers
    (None, 1, 0),  # the same without the register cap (72 registers: 28 one-warp programs per SM)
    (64, 1, 64),  # one 64-entry sort for every cell (no small path)
    (None, 2, 0),  # two warps per row (v4's layout)
    (None, 4, 0),
]


def sweep(d, moved):
    """Variants of the token-row kernel at one shape (SWEEP); returns the best (ms, TS1, warps, cap)."""
    from tokenlabel.kernels import token_label_cross_entropy
    from tokenlabel.kernels import token_label_ce as tlce

    best = None
    saved = tlce._TS1, tlce._NUM_WARPS, tlce._MAXNREG
    for ts1, nw, cap in SWEEP:
        tlce._TS1, tlce._NUM_WARPS, tlce._MAXNREG = ts1, nw, cap
        q = graph_time(token_label_cross_entropy, d)
        if q is None:
            continue
        print(f"  sweep TS1={ts1 or 'auto'} warps={nw} maxnreg={cap or 'none'}: graph p50 {q[0]:.4f} ms "
              f"({moved / q[0] / 1e6:.0f} GB/s)", flush=True)
        if best is None or q[0] < best[0]:
            best = (q[0], ts1, nw, cap)
    tlce._TS1, tlce._NUM_WARPS, tlce._MAXNREG = saved
    return best


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also sweep the token-row kernel variants at S/224 bf16")
    args = ap.parse_args(argv)
    from tokenlabel.kernels import fused_linear_token_label_cross_entropy, token_label_cross_entropy
    from tokenlabel.kernels.reference import reference_style_loss

    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for dt in (torch.float32, torch.bfloat16):
        check(token_label_cross_entropy, "fused", dev, dt)
        check(reference_style_loss, "eager", dev, dt)
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    compiled = None if args.quick else torch.compile(reference_style_loss)
    shapes = [("S/224", 128, 196, 1000, torch.bfloat16), ("S/224", 128, 196, 1000, torch.float32)]
    if not args.quick:
        shapes += [("S/384", 64, 576, 1000, torch.bfloat16), ("C=21841", 128, 196, 21841, torch.bfloat16)]
    for name, B, N, C, dt in shapes:
        d = make_inputs(B, N, C, 18, 5, dt, dev)
        esz = torch.tensor([], dtype=dt).element_size()
        logits_bytes = (B * N * C + B * C) * esz
        moved = 2 * logits_bytes
        provs = [("fused", token_label_cross_entropy), ("eager", reference_style_loss)]
        if compiled is not None and C == 1000 and N == 196:
            provs.append(("compiled", compiled))
        floor = moved / (bw * 1e6)
        for pname, fn in provs:
            try:
                q, gbs, extra = bench_one(fn, d, moved, logits_bytes)
                print(f"{name:8s} {str(dt):15s} {pname:9s} fwd+bwd p50 {q[0]:.4f} ms (p20 {q[1]:.4f}, p80 {q[2]:.4f})"
                      f"  {gbs:.0f} GB/s  floor {floor:.4f} ms  extra {extra:.1f} MiB", flush=True)
                if pname == "fused":
                    qg = graph_time(fn, d)
                    if qg is not None:
                        print(f"{name:8s} {str(dt):15s} {pname:9s} cuda-graph p50 {qg[0]:.4f} ms (p20 {qg[1]:.4f}, "
                              f"p80 {qg[2]:.4f})  {moved / qg[0] / 1e6:.0f} GB/s", flush=True)
            except torch.OutOfMemoryError:
                print(f"{name} {pname}: out of memory", flush=True)
            torch.cuda.empty_cache()
        if args.sweep and name == "S/224" and dt == torch.bfloat16:
            print("best (ms, TS1, warps, maxnreg):", sweep(d, moved), flush=True)
        del d
        torch.cuda.empty_cache()
    # fused aux head at C = 21841: peak memory vs the logits it replaces
    for C in (1000, 21841):
        B, N, D = 128, 196, 384
        d = make_inputs(B, N, C, 18, 5, torch.bfloat16, dev, requires_grad=False)
        feats = torch.randn(B, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        lin = torch.nn.Linear(D, C, device=dev, dtype=torch.bfloat16)
        cls = d["cls"].requires_grad_()

        def step():
            fused_linear_token_label_cross_entropy(cls, feats, lin.weight, lin.bias, d["values"], d["indices"],
                                                   d["boxes"], d["flips"], mix_box=d["mix"]).backward()

        peak = peak_bytes(step) / 2**20
        import triton.testing as tt

        q = tt.do_bench(step, quantiles=[0.5, 0.2, 0.8], grad_to_none=[cls, feats, lin.weight, lin.bias])
        logits_mib = B * N * C * 2 / 2**20
        print(f"fused_linear C={C} bf16 fwd+bwd p50 {q[0]:.3f} ms (p20 {q[1]:.3f}, p80 {q[2]:.3f})  peak extra "
              f"{peak:.0f} MiB vs logits {logits_mib:.0f} MiB", flush=True)
        del d, feats, lin
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
