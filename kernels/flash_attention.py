"""Flash attention for LV-ViT's shapes (197 or 577 tokens, heads of 64 or 60): Triton, forward and backward.

Why our own: at N = 197 the step's cuDNN attention (through SDPA) spends, per block, 47 us forward and
115 us backward plus two helper kernels (dO.O row sums 21 us, dQ cast 18 us; H200 profile, models/NOTES.md),
and autograd stacks dq, dk, dv into the qkv Linear's gradient with one more copy. These kernels read q, k, v
straight out of the fused qkv Linear's output ``[B, N, 3, H, Dh]`` (strides, no copies), write the output in
``[B, N, H * Dh]`` for the proj Linear, and the backward writes the qkv gradient as one ``[B, N, 3, H, Dh]``
tensor with the row sums computed where they are used: one launch forward, one launch backward.

The math (log2 units: c = scale * log2 e, so e^(scale x) = 2^(c x))
===================================================================
Forward, per query row i (online softmax over key blocks, fp32 state m, l, acc):

    s_ij = c q_i.k_j,   m_i = max_j s_ij,   l_i = sum_j 2^(s_ij - m_i),   o_i = sum_j 2^(s_ij - m_i) v_j / l_i,

and lse_i = m_i + log2 l_i is saved (fp32, [B, H, N]), so backward recomputes p_ij = 2^(s_ij - lse_i) exactly.
Backward, with dp_ij = do_i.v_j and delta_i = sum_j p_ij dp_ij = do_i.o_i (the row sum needs only o and do):

    ds_ij = p_ij (dp_ij - delta_i),   dq_i = scale sum_j ds_ij k_j,
    dv_j = sum_i p_ij do_i,           dk_j = scale sum_i ds_ij q_i.

One backward launch holds two kinds of programs: the first cdiv(N, BLOCK_M) per head each own a block of
query rows and loop over the keys for dq; the rest each own a block of keys and loop over the queries for dk
and dv. Each computes the delta_i it needs from o and do, so neither waits for the other (no atomics, no
pre-pass); the price is reading o once more per (key block, query block) pair, from L2 at these sizes.

fp32 inputs use IEEE fp32 dots (not TF32), so they match a float64 reference to ~1e-6; bf16/fp16 inputs
take bf16/fp16 dots with fp32 accumulation, p and ds rounded to the input dtype before their dots (as every
flash attention does).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERP = tl.constexpr(_INTERPRET)
_LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
# Which backward the autograd paths launch: "split" (query-block and key-block programs, 7 matmuls per block pair)
# or "head" (one program per head, 5 matmuls, dq in fp32 scratch). Not yet timed against each other on a GPU.
BWD_IMPL = "split"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    elif _INTERP:
        # Triton 3.6's interpreter returns garbage for bf16 dots; bf16 x bf16 products are exact in fp32 and the
        # GPU accumulates in fp32 too, so fp32 operands compute the same sums (up to the order of addition)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _tile(P, base, rows, row_stride, offs_d, N, D):
    """The [len(rows), BLOCK_D] tile of rows ``rows`` (zeros past N and past the head dim D)."""
    return tl.load(P + base + rows[:, None] * row_stride + offs_d[None, :],
                   mask=(rows[:, None] < N) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, s_b, s_n, s_h, o_b, o_n, o_h, H, qk_scale, N: tl.constexpr, D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """One program: BLOCK_M query rows of one (sample, head).

    Q, K, V: the same [B, N, H, D] strides (s_b, s_n, s_h; unit stride over D); O: [B, N, H, D] strides
    (o_b, o_n, o_h); LSE: [B * H, N] fp32, log2 units; qk_scale = scale * log2 e.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    base = b * s_b + h * s_h
    q = _tile(Q, base, offs_m, s_n, offs_d, N, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        kn = start + offs_n
        k = _tile(K, base, kn, s_n, offs_d, N, D)
        v = _tile(V, base, kn, s_n, offs_d, N, D)
        # 1. scores in log2 units; keys past N drop out of max and sum
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        s = tl.where(kn[None, :] < N, s, float("-inf"))
        # 2. online softmax: rescale what was summed under the old max (every block has a valid key, so
        #    m_new is finite and the first block's alpha = 2^(-inf) = 0)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    acc = acc / l_i[:, None]
    mask_m = offs_m < N
    tl.store(O + b * o_b + h * o_h + offs_m[:, None] * o_n + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=mask_m[:, None] & (offs_d[None, :] < D))
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _bwd_dq(Q, K, V, O, DO, DQ, LSE, base, o_base, do_base, g_base, bh, pid_m, s_n, o_n, do_n, g_n, sm_scale,
            qk_scale, N: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _tile(Q, base, offs_m, s_n, offs_d, N, D)
    do = _tile(DO, do_base, offs_m, do_n, offs_d, N, D)
    o = _tile(O, o_base, offs_m, o_n, offs_d, N, D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        kn = start + offs_n
        k = _tile(K, base, kn, s_n, offs_d, N, D)
        v = _tile(V, base, kn, s_n, offs_d, N, D)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        p = tl.where(kn[None, :] < N, tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    tl.store(DQ + g_base + offs_m[:, None] * g_n + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < N) & (offs_d[None, :] < D))


@triton.jit
def _bwd_dkdv(Q, K, V, O, DO, DK, DV, LSE, base, o_base, do_base, g_base, bh, pid_n, s_n, o_n, do_n, g_n, sm_scale,
              qk_scale, N: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, IEEE: tl.constexpr, DQ=None, DQACC=None, WITH_DQ: tl.constexpr = False):
    """dk, dv of key block pid_n. WITH_DQ (the per-head kernel, which runs the key blocks in order): also
    dq_i += ds_ij k_j into the head's fp32 rows of DQACC, and at the last key block dq itself into DQ."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    key_mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    k = _tile(K, base, offs_n, s_n, offs_d, N, D)
    v = _tile(V, base, offs_n, s_n, offs_d, N, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_M):
        qm = start + offs_m
        q = _tile(Q, base, qm, s_n, offs_d, N, D)
        do = _tile(DO, do_base, qm, do_n, offs_d, N, D)
        o = _tile(O, o_base, qm, o_n, offs_d, N, D)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        # queries past N: lse = +inf, so their p^T column is 2^(-inf) = 0
        lse = tl.load(LSE + bh.to(tl.int64) * N + qm, mask=qm < N, other=float("inf"))
        pT = tl.exp2(_dot(k, tl.trans(q), IEEE) * qk_scale - lse[None, :])  # [BLOCK_N, BLOCK_M]
        dv += _dot(pT.to(do.dtype), do, IEEE)
        dpT = _dot(v, tl.trans(do), IEEE)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(q.dtype), q, IEEE)
        if WITH_DQ:
            part = _dot(tl.trans(dsT).to(k.dtype), k, IEEE)  # [BLOCK_M, BLOCK_D]
            acc_ptr = DQACC + bh.to(tl.int64) * N * BLOCK_D + qm[:, None] * BLOCK_D + offs_d[None, :]
            rows = qm[:, None] < N
            last = (pid_n + 1) * BLOCK_N >= N
            new = tl.load(acc_ptr, mask=rows & (pid_n > 0), other=0.0) + part
            tl.store(acc_ptr, new, mask=rows & (not last))
            tl.store(DQ + g_base + qm[:, None] * g_n + offs_d[None, :], (new * sm_scale).to(DQ.dtype.element_ty),
                     mask=rows & (offs_d[None, :] < D) & last)
    tl.store(DK + g_base + offs_n[:, None] * g_n + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=key_mask)
    tl.store(DV + g_base + offs_n[:, None] * g_n + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=key_mask)


@triton.jit
def _attn_bwd(Q, K, V, O, DO, DQ, DK, DV, LSE, s_b, s_n, s_h, o_b, o_n, o_h, do_b, do_n, do_h, g_b, g_n, g_h,
              H, NQ, sm_scale, qk_scale, N: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """Programs 0..NQ-1 of axis 0: dq of BLOCK_M query rows; the rest: dk, dv of BLOCK_N keys (one head each).

    Strides: Q, K, V share (s_b, s_n, s_h); O (o_*); DO (do_*); DQ, DK, DV share (g_*); unit stride over D.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    base, o_base, do_base, g_base = b * s_b + h * s_h, b * o_b + h * o_h, b * do_b + h * do_h, b * g_b + h * g_h
    if pid < NQ:
        _bwd_dq(Q, K, V, O, DO, DQ, LSE, base, o_base, do_base, g_base, bh, pid, s_n, o_n, do_n, g_n, sm_scale,
                qk_scale, N, D, BLOCK_M, BLOCK_N, BLOCK_D, IEEE)
    else:
        _bwd_dkdv(Q, K, V, O, DO, DK, DV, LSE, base, o_base, do_base, g_base, bh, pid - NQ, s_n, o_n, do_n, g_n,
                  sm_scale, qk_scale, N, D, BLOCK_M, BLOCK_N, BLOCK_D, IEEE)


@triton.jit
def _attn_bwd_head(Q, K, V, O, DO, DQ, DK, DV, LSE, DQACC, s_b, s_n, s_h, o_b, o_n, o_h, do_b, do_n, do_h, g_b, g_n,
                   g_h, H, sm_scale, qk_scale, N: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """One program per (sample, head): the key blocks in order, each as _bwd_dkdv plus dq_i += ds_ij k_j kept in
    fp32 rows of DQACC ([B * H, N, BLOCK_D], no initialisation needed). Five matmuls per (query, key) block pair
    instead of the split kernel's seven, no atomics; the price is B * H programs and a serial key loop."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    base, o_base, do_base, g_base = b * s_b + h * s_h, b * o_b + h * o_h, b * do_b + h * do_h, b * g_b + h * g_h
    for j in range(0, tl.cdiv(N, BLOCK_N)):
        # the previous key block's dq rows were stored by whichever threads held them: make them visible
        tl.debug_barrier()
        _bwd_dkdv(Q, K, V, O, DO, DK, DV, LSE, base, o_base, do_base, g_base, bh, j, s_n, o_n, do_n, g_n, sm_scale,
                  qk_scale, N, D, BLOCK_M, BLOCK_N, BLOCK_D, IEEE, DQ, DQACC, True)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _block_d(D):
    return max(16, triton.next_power_of_2(D))


def _config(D, kind, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for head dim D; kind "fwd", "bwd" or "bwd_head".

    Chosen from sm_90 builds without a GPU (``python -m tokenlabel.kernels._attn_tune resources``: registers,
    spills, shared memory, whether the key loop is pipelined), not yet from GPU timings. Heads of 64 (LV-ViT-S/M/L):
    64 x 64 tiles, one warpgroup, two stages; forward 128 registers, backward 236, neither spills, both pipelined.
    Heads of 60 (LV-ViT-T): masked 64-wide loads cannot be pipelined and four warps spill, so eight warps. fp32
    (IEEE dots on the FMA units, operands in registers): small tiles. The per-head backward at heads of 64: 64 x 64
    tiles, 8 warps, 2 stages (252 registers, pipelined, no spills; 4 warps spill).
    """
    bd = _block_d(D)
    fwd = kind == "fwd"
    if kind == "bwd_head":  # the split backward's key-block program plus a dq tile: more registers, 8 warps
        if dtype == torch.float32:
            return (32, 16, 8, 1) if bd <= 64 else (16, 16, 8, 1)
        if bd <= 64:
            return (64, 64, 8, 1) if D % 16 else (64, 64, 8, 2)
        return (32, 32, 8, 2) if bd <= 128 else (16, 32, 8, 1)
    if dtype == torch.float32:
        if bd <= 64:
            return (32, 32, 4, 1) if fwd else (32, 16, 4, 1)
        return (16, 16, 8, 1)
    if bd <= 64:
        if D % 16:
            return (64, 64, 8, 2) if fwd else (64, 64, 8, 1)
        return 64, 64, 4, 2
    if bd <= 128:
        return (64, 64, 8, 2) if fwd else (32, 64, 8, 2)
    return 32, 32, 8, 1


def check_inputs(q, k, v):
    """The ValueError / RuntimeError a user sees for inputs these kernels cannot take, naming the problem."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"flash attention: {name} must be a [B, N, H, Dh] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"flash attention: q, k, v must have one shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(f"flash attention: q, k, v must share one of float16, bfloat16, float32; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if not (q.is_cuda or _INTERPRET):
        raise RuntimeError(f"flash attention (Triton) needs CUDA tensors, got {q.device} (on the CPU it runs "
                           f"only under TRITON_INTERPRET=1, for tests); use attn='sdpa' there")
    B, N, H, D = q.shape
    if D > MAX_HEAD_DIM:
        raise ValueError(f"flash attention: head dim {D} > {MAX_HEAD_DIM} is not supported")
    if min(B, N, H, D) == 0:
        raise ValueError(f"flash attention: empty input of shape {tuple(q.shape)}")


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _same_strides(q, k, v):
    """q, k, v with one set of strides (views of one qkv tensor already have; otherwise copies)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if q.stride() == k.stride() == v.stride():
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def fwd_launch(q, k, v, o, lse, scale, config=None):
    """(kernel, grid, args, constexprs, launch options) of the forward for these tensors (meta tensors work:
    only shapes and strides are read). ``config`` = (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides _config."""
    B, N, H, D = q.shape
    bm, bn, warps, stages = config or _config(D, "fwd", q.dtype)
    args = (q, k, v, o, lse, q.stride(0), q.stride(1), q.stride(2), o.stride(0), o.stride(1), o.stride(2), H,
            float(scale) * _LOG2E)
    const = dict(N=N, D=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(D), IEEE=q.dtype == torch.float32)
    return _attn_fwd, (triton.cdiv(N, bm), B * H), args, const, dict(num_warps=warps, num_stages=stages)


def bwd_launch(do, q, k, v, o, lse, dq, dk, dv, scale, config=None, impl="split", dq_acc=None):
    """The backward's (kernel, grid, args, constexprs, launch options), as fwd_launch. impl "split": query-block and
    key-block programs (_attn_bwd); "head": one program per (sample, head) (_attn_bwd_head), which needs
    ``dq_acc``, an fp32 scratch of B * H * N * BLOCK_D elements (``bwd_scratch``)."""
    B, N, H, D = q.shape
    bm, bn, warps, stages = config or _config(D, "bwd_head" if impl == "head" else "bwd", q.dtype)
    if impl == "head":
        args = (q, k, v, o, do, dq, dk, dv, lse, dq_acc, q.stride(0), q.stride(1), q.stride(2), o.stride(0),
                o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1),
                dq.stride(2), H, float(scale), float(scale) * _LOG2E)
        const = dict(N=N, D=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(D), IEEE=q.dtype == torch.float32)
        return _attn_bwd_head, (B * H,), args, const, dict(num_warps=warps, num_stages=stages)
    if impl != "split":
        raise ValueError(f"flash attention backward impl={impl!r}; valid: split, head")
    nq = triton.cdiv(N, bm)
    args = (q, k, v, o, do, dq, dk, dv, lse, q.stride(0), q.stride(1), q.stride(2), o.stride(0), o.stride(1),
            o.stride(2), do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2), H, nq,
            float(scale), float(scale) * _LOG2E)
    const = dict(N=N, D=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(D), IEEE=q.dtype == torch.float32)
    return _attn_bwd, (nq + triton.cdiv(N, bn), B * H), args, const, dict(num_warps=warps, num_stages=stages)


def _run(launch):
    kernel, grid, args, const, opts = launch
    kernel[grid](*args, **const, **opts)


def attention_forward(q, k, v, scale, config=None):
    """(o [B, N, H, D] contiguous in q's dtype, lse [B, H, N] fp32 in log2 units); q, k, v [B, N, H, D]."""
    q, k, v = _same_strides(q, k, v)
    B, N, H, D = q.shape
    o = torch.empty(B, N, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    _run(fwd_launch(q, k, v, o, lse, scale, config))
    return o, lse


@contextlib.contextmanager
def use_bwd_impl(impl):
    """Within the block the autograd paths launch backward ``impl`` ("split" or "head") instead of BWD_IMPL."""
    global BWD_IMPL
    if impl not in ("split", "head"):
        raise ValueError(f"flash attention backward impl={impl!r}; valid: split, head")
    prev, BWD_IMPL = BWD_IMPL, impl
    try:
        yield
    finally:
        BWD_IMPL = prev


def bwd_scratch(q):
    """The fp32 dq accumulator the "head" backward needs for q [B, N, H, D] (uninitialised)."""
    B, N, H, D = q.shape
    return torch.empty(B * H * N * _block_d(D), device=q.device, dtype=torch.float32)


def attention_backward(do, q, k, v, o, lse, scale, config=None, impl=None):
    """The gradient of q, k, v packed as one [B, N, 3, H, D] tensor (index 2: q, k, v); do [B, N, H, D].
    ``impl``: "split" or "head" (see bwd_launch); None takes BWD_IMPL."""
    q, k, v = _same_strides(q, k, v)
    B, N, H, D = q.shape
    do = _unit_last(do.to(q.dtype))
    dqkv = torch.empty(B, N, 3, H, D, device=q.device, dtype=q.dtype)
    impl = impl or BWD_IMPL
    scratch = bwd_scratch(q) if impl == "head" else None
    _run(bwd_launch(do, q, k, v, o, lse, *dqkv.unbind(2), scale, config, impl, scratch))
    return dqkv


# --------------------------------------------------------------------------------------------
# torch.library ops (torch.compile sees fakes) and the autograd glue
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("tokenlabel::flash_attn_fwd", mutates_args=())
def flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    return attention_forward(q, k, v, scale)


@flash_attn_fwd_op.register_fake
def _(q, k, v, scale):
    B, N, H, D = q.shape
    return q.new_empty(B, N, H, D), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("tokenlabel::flash_attn_bwd", mutates_args=())
def flash_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, scale: float) -> torch.Tensor:
    return attention_backward(do, q, k, v, o, lse, scale)


@flash_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, scale):
    B, N, H, D = q.shape
    return q.new_empty(B, N, 3, H, D)


def _traced(t):
    # torch.compile traces with fake/functional tensor subclasses (its lazily built backward may run with
    # is_compiling() False): those take the custom ops, whose fakes give the shapes; eager calls go straight
    # to the launchers, without the ops' dispatch layers
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


def _fwd(q, k, v, scale):
    if _traced(q):
        return torch.ops.tokenlabel.flash_attn_fwd(q, k, v, scale)
    return attention_forward(q, k, v, scale)


def _bwd(do, q, k, v, o, lse, scale):
    if _traced(do) or _traced(q):
        return torch.ops.tokenlabel.flash_attn_bwd(do, q, k, v, o, lse, scale)
    return attention_backward(do, q, k, v, o, lse, scale)


class _FlashAttention(torch.autograd.Function):
    """q, k, v [B, N, H, D] (any strides with unit stride over D) -> o [B, N, H, D]."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = _fwd(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _bwd(do, q, k, v, o, lse, ctx.scale).unbind(2)
        return dq, dk, dv, None


class _FlashAttentionQKV(torch.autograd.Function):
    """qkv [B, N, 3 * H * D] (the fused qkv Linear's output) -> o [B, N, H * D]; its gradient is one tensor."""

    @staticmethod
    def forward(ctx, qkv, num_heads, scale):
        B, N, C = qkv.shape
        q, k, v = qkv.view(B, N, 3, num_heads, C // (3 * num_heads)).unbind(2)
        o, lse = _fwd(q, k, v, scale)
        ctx.save_for_backward(qkv, o, lse)
        ctx.num_heads, ctx.scale = num_heads, scale
        return o.view(B, N, C // 3)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        qkv, o, lse = ctx.saved_tensors
        B, N, C = qkv.shape
        H = ctx.num_heads
        q, k, v = qkv.view(B, N, 3, H, C // (3 * H)).unbind(2)
        dqkv = _bwd(do.reshape(B, N, H, C // (3 * H)), q, k, v, o, lse, ctx.scale)
        return dqkv.view(B, N, C), None, None


def flash_attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v for q, k, v ``[B, N, H, Dh]``; returns ``[B, N, H, Dh]``.

    CUDA tensors (or any under TRITON_INTERPRET=1); float16, bfloat16 or float32; Dh <= 256; scale defaults
    to Dh^-0.5. Differentiable in q, k and v.
    """
    check_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _FlashAttention.apply(q, k, v, scale)


def flash_attention_qkv(qkv, num_heads, scale=None):
    """Attention over the fused qkv Linear's output ``[B, N, 3 * H * Dh]`` (q, k, v in that order, heads
    inside each); returns ``[B, N, H * Dh]``, and the gradient of ``qkv`` as one tensor, without copies."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        raise ValueError(f"flash_attention_qkv: qkv must be [B, N, 3 * H * Dh], got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    B, N, C = qkv.shape
    if num_heads < 1 or C % (3 * num_heads):
        raise ValueError(f"flash_attention_qkv: last dim {C} is not 3 * num_heads ({num_heads}) * head_dim")
    if not qkv.is_contiguous():  # a view of the qkv Linear's output is; anything else is packed first
        qkv = qkv.contiguous()
    check_inputs(*qkv.view(B, N, 3, num_heads, C // (3 * num_heads)).unbind(2))
    scale = (C // (3 * num_heads)) ** -0.5 if scale is None else float(scale)
    return _FlashAttentionQKV.apply(qkv, num_heads, scale)
