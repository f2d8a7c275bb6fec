"""The MLP's fc1 + bias + GELU as one GEMM with a GELU epilogue, and GELU's backward as the epilogue of fc2's input
gradient: Triton.

Why (models/NOTES.md, thirteenth and fourteenth sessions): on the H100 the step's row kernels already run at 79-87% of
their byte rate, so the 7,500 img/s goal needs fewer passes over memory, not faster passes. Per transformer block at
LV-ViT-S/224, B 128 (M = 25,216 token rows, C = 384, hidden 1,152), the MLP's hidden activation today costs:
forward, fc1's GEMM writes h (58 MB), `_bias_gelu_fwd` reads it back and writes g (116 MB, 41.4 us on the H100);
backward, fc2's input-gradient GEMM writes dg (58 MB), `_bias_gelu_bwd` reads dg and h and writes dh (174 MB, 65.5
us). Here both GEMMs (each [M, 384] x [384, 1152], 22.3 GFLOP) keep their output tile in registers and finish the
GELU there: forward, z = x W1^T + b1 and g = GELU(z) are both written from the accumulator (h is never read back);
backward, dh = (dy W2) * GELU'(z) is written instead of dg (dg never exists), with fc1's bias gradient summed per
row block from the same registers. What goes away per block: one read of h (58 MB) forward, one write and one read
of dg (116 MB) backward, and two launches: ~52 us of bytes at 3.35 TB/s, if the GEMMs themselves keep cuBLAS's
rate (`tokenlabel bench mlp` measures the block's MLP each way).

Measured (H100, 2026-12-05): they do not. The MLP forward + backward takes 0.470 ms this way against 0.402 ms for
cuBLAS's GEMMs with bias_gelu's kernels (the step's path), so the model does not use this module. The same K loop
with a plain epilogue runs 58.9 us against cuBLAS's 44.9 us (76% of its rate), and the GELU epilogue then adds ~37 us
to the forward: about what bias_gelu's separate pass costs (43 us), because in a non-persistent kernel a tile's
epilogue does not overlap any tile's matmul. What it would take is in kernels/NOTES.md (fourteenth session).
``impl="tma"`` (_mm_gelu_tma: persistent programs, operands by TMA; 164 / 192 registers and no spills at the
defaults, against the pointer kernel's 255 with 8 / 24 bytes spilled) is the first step toward that, built and
CPU-checked, not yet timed.

Semantics are those of ``F.gelu(F.linear(x, W1, b1))`` (exact, erf GELU): z is the fp32 accumulator plus the bias,
stored in the compute dtype (saved for the backward); g = GELU(z) from the fp32 z, stored in the compute dtype;
backward dh = dg * (Phi(z) + z phi(z)) with dg the fp32 accumulator of dy @ W2 (cuBLAS rounds dg to the compute
dtype first; here it is not rounded), db1 = sum over rows of dh in fp32.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._common import (INTERPRET, _ensure_allocator, _persistent_grid, _tma_ok, compute_dtype, dispatch, overriding,
                      sm_count)
from .batchnorm import sum_partials
from .bias_gelu import _phi

_INTERP = tl.constexpr(INTERPRET)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Tiling of each GEMM: (BLOCK_M, BLOCK_N, BLOCK_K), warps, pipeline stages, row blocks per group (the launch order
# that keeps a group's A rows in L2 while it walks the column blocks), and how Phi is computed (bias_gelu.CDFS).
# The fastest of 20 tilings each in scripts/sweep_mlp_gemm.py (H100, 2026-12-05, LV-ViT-S/224 B 128:
# bench/results/mlp-gemm-h100/): forward 96.1 us, backward 114.4 us, against 84.7 and 112.3 us for cuBLAS's GEMM +
# bias_gelu's kernel, which they were built to replace. Their sm_90 builds spill 8 and 24 bytes (the epilogue's
# temporaries beside 64 fp32 accumulators per thread); the spill-free 128 x 128 x 32 tiling ran 108.6 and 152.3 us.
# ``impl``: "ptr" (_mm_gelu: one program per tile, operands by pointer loads, cp.async-pipelined; the swept one) or
# "tma" (_mm_gelu_tma: ``per_sm`` persistent programs per SM, operands by TMA; built and CPU-checked on 2026-12-05,
# not yet timed: no device time was left); "tma" falls back to "ptr" where TMA's alignment rules do not hold.
# ``flatten`` ("tma" only): fuse the tile loop with the K loop (tl.range(flatten=True)), so that the next tile's
# loads are in flight during this tile's epilogue.
# ``ws`` ("tma" only, 4 warps, not with flatten): warp-specialise the tile loop (tl.range(warp_specialize=True)).
# Triton 3.6 does this on sm_90 too (Meta's Hopper pass, not only on Blackwell as kernels/NOTES.md first said): one
# producer warp group issues the TMA loads, two consumer warp groups split the tile between them for the wgmmas and
# the epilogue (12 warps, 168 registers: one program per SM), so the next tile's loads run during this tile's
# epilogue. CPU-checked; not yet timed.
FWD = dict(bm=64, bn=128, bk=64, warps=4, stages=3, group=8, cdf="erfcx", impl="ptr", per_sm=2, flatten=False,
           ws=False)
BWD = dict(bm=128, bn=64, bk=64, warps=4, stages=3, group=8, cdf="erfcx", impl="ptr", per_sm=2, flatten=False,
           ws=False)
IMPLS = ("ptr", "tma")


def use_impl(impl: str):
    """Within the block (``with use_impl(...)``) both GEMMs run as ``impl`` (one of IMPLS), whatever FWD / BWD
    say."""
    return overriding((FWD, BWD), "impl", impl, IMPLS, "ptr")


# The warp-specialised tilings use_ws() runs (check_tiling's rules; one program per SM at 12 warps): 64 x 128 x 64
# tiles, 3 stages, both ways (the backward's rows must be 64). Correct on an H100 (test_kernels_linear_gelu.py, 40
# passed, the bf16 / fp16 ws builds included, 2026-12-06) but slower than the plain builds there: forward 94.9 us
# against 87.4, backward 208.7 against 108.1 (kernels/NOTES.md, seventeenth session), so nothing uses it by default.
WS_TILING = dict(bm=64, bn=128, bk=64, warps=4, stages=3, impl="tma", per_sm=1, flatten=False, ws=True)


@contextlib.contextmanager
def use_ws():
    """Within the block both GEMMs run warp-specialised (WS_TILING; group and cdf as FWD / BWD say): correct on an
    H100, and slower there than the plain TMA builds (see WS_TILING)."""
    saved = dict(FWD), dict(BWD)
    FWD.update(WS_TILING)
    BWD.update(WS_TILING)
    try:
        yield
    finally:
        for table, old in zip((FWD, BWD), saved):
            table.clear()
            table.update(old)


@triton.jit
def _dot(a, b, acc):
    if _INTERP:
        # Triton 3.6's interpreter returns garbage for bf16 dots; the products of bf16 / fp16 values are exact in
        # fp32 and the GPU accumulates in fp32, so fp32 operands give the same sums up to the order of addition
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def tile_ids(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """(row block, column block) of output tile number ``tile`` in grouped order: GROUP row blocks walk all column
    blocks before the next group starts, so a group's rows of A stay in L2."""
    per_group = GROUP * tl.cdiv(N, BLOCK_N)
    first_m = (tile // per_group) * GROUP
    group_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP)
    return first_m + (tile % per_group) % group_m, (tile % per_group) // group_m


@triton.jit
def _epilogue(acc, BIAS, Z, OUT, PART, pid_m, rows, cols, M, N, BLOCK_N: tl.constexpr, BACKWARD: tl.constexpr,
              CDF: tl.constexpr):
    """Forward: z = acc + BIAS -> Z, GELU(z) -> OUT. Backward: z <- Z, acc * GELU'(z) -> OUT, its column sums over
    the tile's rows -> PART[pid_m] (fp32; rows of N padded to whole column blocks, as batchnorm.sum_partials
    reads them)."""
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if BACKWARD:
        z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
        cdf, e = _phi(z, CDF)
        dh = tl.where(mask, acc * (cdf + z * (e * 0.3989422804014327)), 0.0)
        tl.store(OUT + offs, dh.to(OUT.dtype.element_ty), mask=mask)
        tl.store(PART + pid_m.to(tl.int64) * (tl.cdiv(N, BLOCK_N) * BLOCK_N) + cols, tl.sum(dh, 0), mask=col_ok)
    else:
        z = acc + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        cdf, _ = _phi(z, CDF)
        tl.store(Z + offs, z.to(Z.dtype.element_ty), mask=mask)
        tl.store(OUT + offs, (z * cdf).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _mm_gelu(A, B, BIAS, Z, OUT, PART, M, N, stride_bk, stride_bn, K: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
             STAGES: tl.constexpr, BACKWARD: tl.constexpr, CDF: tl.constexpr, EVEN_K: tl.constexpr):
    """acc = A[M, K] @ B (B[k, n] at B + k * stride_bk + n * stride_bn) for one output tile per program, then
    _epilogue."""
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    a_ptr = A + rows.to(tl.int64)[:, None] * K + rk[None, :]
    b_ptr = B + rk[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        if EVEN_K:
            a = tl.load(a_ptr, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptr, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + rk) < K
            a = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(a, b, acc)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K * stride_bk
    _epilogue(acc, BIAS, Z, OUT, PART, pid_m, rows, cols, M, N, BLOCK_N, BACKWARD, CDF)


@triton.jit
def _mm_gelu_tma(A, B, BIAS, Z, OUT, PART, M, N, K: tl.constexpr, B_NK: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, STAGES: tl.constexpr,
                 BACKWARD: tl.constexpr, CDF: tl.constexpr, PROGS: tl.constexpr, PER: tl.constexpr,
                 FLATTEN: tl.constexpr = False, WS: tl.constexpr = False):
    """_mm_gelu's GEMM and epilogues with the operands loaded by TMA (tensor descriptors made on the device; rows
    and columns past the edges read as 0) and PROGS persistent programs, each taking every PROGS-th output tile (at
    most PER of them). B is [N, K] (B_NK: fc1's weight, K contiguous) or [K, N] (fc2's weight), contiguous.
    PROGS and PER are compile-time constants (a runtime loop bound breaks Triton 3.6's interpreter), so each number
    of token rows builds once: once for training's fixed batch, once more for an eval batch of another size."""
    a_desc = tl.make_tensor_descriptor(A, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    if B_NK:
        b_desc = tl.make_tensor_descriptor(B, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(B, shape=[K, N], strides=[N, 1], block_shape=[BLOCK_K, BLOCK_N])
    n_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for i in tl.range(0, PER, flatten=FLATTEN, warp_specialize=WS):
        # a program past the last tile redoes the last one (the same values to the same places: no branch around
        # the K loop, which FLATTEN needs to fuse the tile loop with the K loop, so that the next tile's loads are
        # issued during this tile's epilogue); the launcher sizes PROGS so that few do
        tile = tl.minimum(tl.program_id(0) + i * PROGS, n_tiles - 1)
        pid_m, pid_n = tile_ids(tile, M, N, BLOCK_M, BLOCK_N, GROUP)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            a = a_desc.load([pid_m * BLOCK_M, k0])
            if B_NK:
                b = b_desc.load([pid_n * BLOCK_N, k0]).T
            else:
                b = b_desc.load([k0, pid_n * BLOCK_N])
            acc = _dot(a, b, acc)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _epilogue(acc, BIAS, Z, OUT, PART, pid_m, rows, cols, M, N, BLOCK_N, BACKWARD, CDF)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def check_tiling(cfg, backward: bool) -> None:
    """ValueError naming the problem for a tiling the kernels cannot build. ``ws`` needs Triton's Hopper warp
    specialisation, which takes only the TMA kernel at 4 warps with an unflattened tile loop; and the backward's
    column sums must not lie across the split between its two consumer warp groups (Triton 3.6 splits a 128-row
    tile by rows, and its pass then aborts the whole process on an assertion, so a Python error here is the only
    clear one)."""
    if not cfg.get("ws", False):
        return
    problems = [why for bad, why in (
        (cfg.get("impl", "ptr") != "tma", f"impl='tma' (got {cfg.get('impl', 'ptr')!r})"),
        (cfg["warps"] != 4, f"warps=4 (got {cfg['warps']})"),
        (cfg.get("flatten", False), "flatten=False"),
        (backward and cfg["bm"] != 64, f"bm=64 in the backward (got {cfg['bm']})"),
        (cfg["bn"] > 128, f"bn <= 128 (got {cfg['bn']}: Triton 3.6 aborts lowering a 256-wide tile's wgmmas)"))
        if bad]
    if problems:
        raise ValueError(f"linear_gelu tiling {cfg}: ws=True (warp specialisation) needs " + ", ".join(problems))


def _launch(cfg, a, b, b_nk, N, bias, z, out, part, backward):
    """b_nk: b is [N, K] (fc1's weight); else [K, N] (fc2's)."""
    check_tiling(cfg, backward)
    M, K = a.shape
    bm, bn, bk = cfg["bm"], cfg["bn"], cfg["bk"]
    common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=cfg["group"], STAGES=cfg["stages"], BACKWARD=backward,
                  CDF=cfg["cdf"], num_warps=cfg["warps"])
    if cfg.get("impl", "ptr") == "tma" and _tma_ok(a, b):
        _ensure_allocator()
        progs, per = _persistent_grid(triton.cdiv(M, bm) * triton.cdiv(N, bn), cfg["per_sm"] * sm_count(a.device))
        _mm_gelu_tma[(progs,)](a, b, bias, z, out, part, M, N, K=K, B_NK=b_nk, PROGS=progs, PER=per,
                               FLATTEN=cfg.get("flatten", False), WS=cfg.get("ws", False), **common)
    else:
        sbk, sbn = (b.stride(1), b.stride(0)) if b_nk else (b.stride(0), b.stride(1))
        _mm_gelu[(triton.cdiv(M, bm) * triton.cdiv(N, bn),)](a, b, bias, z, out, part, M, N, sbk, sbn, K=K,
                                                              EVEN_K=K % bk == 0, **common)


def linear_gelu_forward(x, w1, b1):
    """(z, g) for x [M, K], w1 [N, K], b1 [N], all of one dtype: z = x @ w1^T + b1 and g = GELU(z), both [M, N]."""
    M, _ = x.shape
    N = w1.shape[0]
    z = torch.empty(M, N, device=x.device, dtype=x.dtype)
    g = torch.empty_like(z)
    _launch(FWD, x, w1, True, N, b1, z, g, z, backward=False)
    return z, g


def linear_gelu_backward(dy, w2, z):
    """(dh, db1) for dy [M, C], w2 [C, N] (fc2's weight), z [M, N] from the forward: dh = (dy @ w2) * GELU'(z) in
    z's dtype, db1 = the column sums of dh in fp32."""
    M, N = z.shape
    dh = torch.empty_like(z)
    bn = BWD["bn"]
    part = torch.empty(triton.cdiv(M, BWD["bm"]), 1, triton.cdiv(N, bn) * bn, device=z.device, dtype=torch.float32)
    _launch(BWD, dy, w2, False, N, z, z, dh, part, backward=True)
    db1 = torch.empty(N, device=z.device, dtype=torch.float32)
    sum_partials(part, (db1,), N)  # one Triton pass over the row blocks' partials, as bias_gelu's backward
    return dh, db1


def sm90_resources(M: int = 128 * 197, C: int = 384, N: int = 1152, dtype=torch.bfloat16, sms: int = 132) -> dict:
    """The two GEMMs' sm_90 builds at LV-ViT-S's MLP shape with FWD's and BWD's tilings, without a GPU (run
    without TRITON_INTERPRET): {"fwd" | "bwd": (registers, spilled stack bytes, shared bytes, pipelined async
    copies: cp.async for "ptr", TMA loads for "tma", warps of the build: more than the tiling's where the
    tile loop was warp-specialised)}."""
    import re

    from ._common import aot_sm90, compile_sm90

    x = torch.empty(M, C, device="meta", dtype=dtype)
    zt = torch.empty(M, N, device="meta", dtype=dtype)
    part = torch.empty(M // 64, N, device="meta", dtype=torch.float32)
    out = {}
    for name, cfg, backward in (("fwd", FWD, False), ("bwd", BWD, True)):
        check_tiling(cfg, backward)
        w = torch.empty((C, N) if backward else (N, C), device="meta", dtype=dtype)
        bias = zt if backward else torch.empty(N, device="meta", dtype=dtype)
        const = dict(K=C, BLOCK_M=cfg["bm"], BLOCK_N=cfg["bn"], BLOCK_K=cfg["bk"], GROUP=cfg["group"],
                     STAGES=cfg["stages"], BACKWARD=backward, CDF=cfg["cdf"])
        if cfg.get("impl", "ptr") == "tma":
            progs, per = _persistent_grid(triton.cdiv(M, cfg["bm"]) * triton.cdiv(N, cfg["bn"]), cfg["per_sm"] * sms)
            const.update(B_NK=not backward, PROGS=progs, PER=per, FLATTEN=cfg.get("flatten", False),
                         WS=cfg.get("ws", False))
            launch = (_mm_gelu_tma, None, [x, w, bias, zt, zt, part, M, N], const, dict(num_warps=cfg["warps"]))
            regs, stack, shared, _ = aot_sm90(launch)
            built = compile_sm90(launch)
            tma = len(re.findall("async_tma_copy_global_to_local", built.asm["ttgir"]))
            out[name] = (regs, stack, shared, tma, built.metadata.num_warps)
        else:
            sbk, sbn = (N, 1) if backward else (1, C)
            const.update(EVEN_K=C % cfg["bk"] == 0)
            out[name] = (*aot_sm90((_mm_gelu, None, [x, w, bias, zt, zt, part, M, N, sbk, sbn], const,
                                    dict(num_warps=cfg["warps"]))), cfg["warps"])
    return out


# --------------------------------------------------------------------------------------------
# torch.library ops (torch.compile sees fakes) and the autograd glue
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("tokenlabel::linear_gelu_fwd", mutates_args=())
def linear_gelu_fwd_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_gelu_forward(x, w1, b1)


@linear_gelu_fwd_op.register_fake
def _(x, w1, b1):
    z = x.new_empty(x.shape[0], w1.shape[0])
    return z, torch.empty_like(z)


@torch.library.custom_op("tokenlabel::linear_gelu_bwd", mutates_args=())
def linear_gelu_bwd_op(dy: torch.Tensor, w2: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_gelu_backward(dy, w2, z)


@linear_gelu_bwd_op.register_fake
def _(dy, w2, z):
    return torch.empty_like(z), z.new_empty(z.shape[1], dtype=torch.float32)


class _Mlp(torch.autograd.Function):
    """y = GELU(x W1^T + b1) W2^T for x [M, C] and weights already in the compute dtype."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2):
        z, g = dispatch(torch.ops.tokenlabel.linear_gelu_fwd, linear_gelu_forward, x, w1, b1, check=(x,))
        ctx.save_for_backward(x, w1, w2, z, g)
        ctx.b1_dtype = b1.dtype
        return g @ w2.t()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, w1, w2, z, g = ctx.saved_tensors
        dy = dy.contiguous()
        dh, db1 = dispatch(torch.ops.tokenlabel.linear_gelu_bwd, linear_gelu_backward, dy, w2, z, check=(dy, z))
        return dh @ w1, dh.t() @ x, db1.to(ctx.b1_dtype), dy.t() @ g


def mlp_gelu(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``F.linear(F.gelu(F.linear(x, w1, b1)), w2)`` (exact GELU; fc2's bias left to the caller, who folds it into
    the residual add) with fc1's bias + GELU in fc1's GEMM epilogue and GELU's backward in the epilogue of fc2's
    input-gradient GEMM. x: [..., C]; w1: [N, C]; b1: [N]; w2: [C_out, N]. Under autocast everything computes in
    autocast's dtype (the weights cast as autocast would; fc1's bias is added in fp32 and gets an fp32 gradient);
    the result has the compute dtype."""
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"mlp_gelu: x must be a non-empty [..., C] tensor, got shape {tuple(x.shape)}")
    if w1.dim() != 2 or w1.shape[1] != x.shape[-1]:
        raise ValueError(f"mlp_gelu: w1 must be [N, {x.shape[-1]}] (fc1's weight), got {tuple(w1.shape)}")
    if b1.shape != (w1.shape[0],):
        raise ValueError(f"mlp_gelu: b1 must be [{w1.shape[0]}], got {tuple(b1.shape)}")
    if w2.dim() != 2 or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"mlp_gelu: w2 must be [C_out, {w1.shape[0]}] (fc2's weight), got {tuple(w2.shape)}")
    dt = compute_dtype(x)
    for name, t in (("x", x), ("w1", w1), ("b1", b1), ("w2", w2)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"mlp_gelu: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (x.is_cuda or INTERPRET):
        raise RuntimeError(f"mlp_gelu (Triton) needs CUDA tensors, got {x.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dt).contiguous()
    with torch.autocast(x.device.type, enabled=False):
        y = _Mlp.apply(x2, w1.to(dt).contiguous(), b1, w2.to(dt).contiguous())
    return y.reshape(*lead, w2.shape[0])
