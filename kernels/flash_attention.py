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

The default ("split") backward launch holds two kinds of programs: the first cdiv(N, BLOCK_M) per head each own
a block of query rows and loop over the keys for dq; the rest each own a block of keys and loop over the queries
for dk and dv. Each computes the delta_i it needs from o and do, so neither waits for the other (no atomics, no
pre-pass); the price is reading o once more per (key block, query block) pair, from L2 at these sizes, and S, P
computed by both kinds (7 matmuls per block pair). The "head" backward runs one program per head over the key
blocks in order and keeps dq in fp32 scratch rows instead (5 matmuls). "split2" launches the split kernel's two
program kinds as two kernels (dq, then dk dv), so each has its own tiling and registers. "tma" (forward too, with
``use_fwd_impl`` / ``use_tma``) runs persistent programs that load by TMA and walk (head, block) items; its dq
launch writes the row sums once for its dk dv launch (see the section above _attn_fwd_tma). Which one runs:
``use_bwd_impl`` inside its block, else the one the model's attn="auto" measured faster for the shape on this GPU,
else "split".

N is tiled as full blocks plus one partial block rounded up to a power of two (>= 16): 197 = 3 x 64 + 16 rows
of work, not 4 x 64. N is a compile-time constant, so each resolution compiles its own kernels once.

fp32 inputs use IEEE fp32 dots (not TF32), so they match a float64 reference to ~1e-6; bf16/fp16 inputs
take bf16/fp16 dots with fp32 accumulation, p and ds rounded to the input dtype before their dots (as every
flash attention does).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, _ensure_allocator, _persistent_grid, dispatch, sm_count

_INTERPRET = INTERPRET
_INTERP = tl.constexpr(_INTERPRET)
_LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
# Which backward the autograd paths launch: "split" (query-block and key-block programs, 7 matmuls per block pair)
# or "head" (one program per head, 5 matmuls, dq in fp32 scratch), or "split2" (split's two program kinds as two
# launches, each with its own tiling and registers), or "tma" (two persistent launches loading by TMA, dq with the
# row sums first, then dk dv; half-precision heads of 16-128 in packed layouts, else "split" runs).
BWD_IMPLS = ("split", "head", "split2", "tma")
# The ones the model's attn="auto" times (and may pick without checking results): those whose GPU tests have run.
# "split2" is new (2026-12-05, ninth session) and joins once `pytest -m gpu` has passed with it on a GPU.
AUTO_BWD_IMPLS = ("split", "head")
BWD_IMPL = "split"
# (B, N, H, D, dtype) -> the backward the model's "auto" measured faster on this GPU (models.attention.select_backend)
BWD_BY_SHAPE: dict[tuple, str] = {}
_BWD_OVERRIDE: list[str] = []  # use_bwd_impl's stack
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
def _tile(P, base, rows, row_stride, offs_d, N, D: tl.constexpr, BLOCK_D: tl.constexpr, ROW_MASK: tl.constexpr):
    """The [len(rows), BLOCK_D] tile at ``rows``: zeros past the head dim D, and past N where ROW_MASK (a partial
    block; full blocks load without a row mask)."""
    ptrs = P + base + rows[:, None] * row_stride + offs_d[None, :]
    if ROW_MASK:
        return tl.load(ptrs, mask=(rows[:, None] < N) & (offs_d[None, :] < D), other=0.0)
    elif D < BLOCK_D:
        return tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _store(P, base, rows, row_stride, offs_d, value, N, D: tl.constexpr, BLOCK_D: tl.constexpr,
           ROW_MASK: tl.constexpr):
    ptrs = P + base + rows[:, None] * row_stride + offs_d[None, :]
    if ROW_MASK:
        tl.store(ptrs, value.to(P.dtype.element_ty), mask=(rows[:, None] < N) & (offs_d[None, :] < D))
    elif D < BLOCK_D:
        tl.store(ptrs, value.to(P.dtype.element_ty), mask=offs_d[None, :] < D)
    else:
        tl.store(ptrs, value.to(P.dtype.element_ty))


# Tiling of N (197 at 224, 577 at 384): full blocks of BLOCK_M / BLOCK_N rows, then one partial block of TAIL_M /
# TAIL_N rows (the remainder rounded up to a power of two, at least 16). 197 = 3 x 64 + 5 is tiled as 3 x 64 + 16,
# not 4 x 64: 208 rows per head instead of 256, (208 / 256)^2 = 66% of the block-pair work. The price: the partial
# blocks are a second instantiation of the code, their 16-row dots run on mma.sync instead of wgmma (a warpgroup's
# wgmma is 64 rows), every mix of the two layouts goes through shared memory, and the registers of a kernel are those
# of its larger instantiation (the split backward's 255; 212 without the partial blocks, sm_90 builds). A config's
# fifth element, ``tail``, picks how the last partial block is done: "pow2" as above (the default); "pad", a full
# BLOCK of rows, row-masked, still peeled off the loop (4 x 64 for 197: 51% more block-pair work, every dot a wgmma
# of one layout, the loop itself without masks); "fold", the same full blocks with the masked one inside the loop
# (FOLD: one instantiation, but every step pays the masks: +125 instructions per step of the dq loop, sm_90 SASS).
# Which wins is for the GPU.


@triton.jit
def _fwd_keys(q, K, V, base, start, s_n, offs_d, m_i, l_i, acc, qk_scale, N, D: tl.constexpr, ROWS: tl.constexpr,
              BLOCK_D: tl.constexpr, TAIL: tl.constexpr, IEEE: tl.constexpr):
    """Fold ROWS keys from ``start`` into the online-softmax state (m_i, l_i, acc) of the query rows of q."""
    kn = start + tl.arange(0, ROWS)
    k = _tile(K, base, kn, s_n, offs_d, N, D, BLOCK_D, TAIL)
    v = _tile(V, base, kn, s_n, offs_d, N, D, BLOCK_D, TAIL)
    return _online_step(q, k, v, kn, m_i, l_i, acc, qk_scale, N, TAIL, IEEE)


@triton.jit
def _online_step(q, k, v, kn, m_i, l_i, acc, qk_scale, N, TAIL: tl.constexpr, IEEE: tl.constexpr):
    """The online-softmax state (m_i, l_i, acc) of q's rows after the keys kn (rows of k and v; TAIL: some past N)."""
    # 1. scores in log2 units; keys past N drop out of max and sum
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    if TAIL:
        s = tl.where(kn[None, :] < N, s, float("-inf"))
    # 2. online softmax: rescale what was summed under the old max (every block has a valid key, so m_new is
    #    finite and the first block's alpha = 2^(-inf) = 0)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


@triton.jit
def _fwd_rows(Q, K, V, O, LSE, base, o_base, bh, start_m, s_n, o_n, qk_scale, N: tl.constexpr, D: tl.constexpr,
              ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, BLOCK_D: tl.constexpr,
              ROW_TAIL: tl.constexpr, IEEE: tl.constexpr, FOLD: tl.constexpr):
    offs_m = start_m + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    q = _tile(Q, base, offs_m, s_n, offs_d, N, D, BLOCK_D, ROW_TAIL)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    if FOLD:  # every key block full-size, the mask on where N is not a multiple of BLOCK_N
        for start in range(0, N, BLOCK_N):
            m_i, l_i, acc = _fwd_keys(q, K, V, base, start, s_n, offs_d, m_i, l_i, acc, qk_scale, N, D, BLOCK_N,
                                      BLOCK_D, N % BLOCK_N != 0, IEEE)
    else:
        for start in range(0, N - N % BLOCK_N, BLOCK_N):
            m_i, l_i, acc = _fwd_keys(q, K, V, base, start, s_n, offs_d, m_i, l_i, acc, qk_scale, N, D, BLOCK_N,
                                      BLOCK_D, False, IEEE)
    if (N % BLOCK_N != 0) and not FOLD:
        m_i, l_i, acc = _fwd_keys(q, K, V, base, N - N % BLOCK_N, s_n, offs_d, m_i, l_i, acc, qk_scale, N, D, TAIL_N,
                                  BLOCK_D, True, IEEE)
    _store(O, o_base, offs_m, o_n, offs_d, acc / l_i[:, None], N, D, BLOCK_D, ROW_TAIL)
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=offs_m < N)


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, s_b, s_n, s_h, o_b, o_n, o_h, H, qk_scale, N: tl.constexpr, D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
              BLOCK_D: tl.constexpr, IEEE: tl.constexpr, FOLD: tl.constexpr = False):
    """One program: one block of query rows of one (sample, head) (BLOCK_M rows, TAIL_M for the last partial one;
    FOLD: BLOCK_M rows for every one, row-masked where N is not a multiple).

    Q, K, V: the same [B, N, H, D] strides (s_b, s_n, s_h; unit stride over D); O: [B, N, H, D] strides
    (o_b, o_n, o_h); LSE: [B * H, N] fp32, log2 units; qk_scale = scale * log2 e.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    base, o_base = b * s_b + h * s_h, b * o_b + h * o_h
    if FOLD or (N % BLOCK_M == 0):
        _fwd_rows(Q, K, V, O, LSE, base, o_base, bh, pid_m * BLOCK_M, s_n, o_n, qk_scale, N, D, BLOCK_M, BLOCK_N,
                  TAIL_N, BLOCK_D, N % BLOCK_M != 0, IEEE, FOLD)
    else:
        if pid_m < N // BLOCK_M:
            _fwd_rows(Q, K, V, O, LSE, base, o_base, bh, pid_m * BLOCK_M, s_n, o_n, qk_scale, N, D, BLOCK_M,
                      BLOCK_N, TAIL_N, BLOCK_D, False, IEEE, FOLD)
        else:
            _fwd_rows(Q, K, V, O, LSE, base, o_base, bh, pid_m * BLOCK_M, s_n, o_n, qk_scale, N, D, TAIL_M,
                      BLOCK_N, TAIL_N, BLOCK_D, True, IEEE, FOLD)


@triton.jit
def _dq_keys(q, do, delta, lse, K, V, base, start, s_n, offs_d, dq, qk_scale, N, D: tl.constexpr,
             ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TAIL: tl.constexpr, IEEE: tl.constexpr):
    """dq += ds k over ROWS keys from ``start``."""
    kn = start + tl.arange(0, ROWS)
    k = _tile(K, base, kn, s_n, offs_d, N, D, BLOCK_D, TAIL)
    v = _tile(V, base, kn, s_n, offs_d, N, D, BLOCK_D, TAIL)
    p = tl.exp2(_dot(q, tl.trans(k), IEEE) * qk_scale - lse[:, None])
    if TAIL:
        p = tl.where(kn[None, :] < N, p, 0.0)
    dp = _dot(do, tl.trans(v), IEEE)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, IEEE)


@triton.jit
def _bwd_dq(Q, K, V, O, DO, DQ, LSE, base, o_base, do_base, g_base, bh, start_m, s_n, o_n, do_n, g_n, sm_scale,
            qk_scale, N: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
            TAIL_N: tl.constexpr, BLOCK_D: tl.constexpr, ROW_TAIL: tl.constexpr, IEEE: tl.constexpr,
            FOLD: tl.constexpr):
    offs_m = start_m + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    q = _tile(Q, base, offs_m, s_n, offs_d, N, D, BLOCK_D, ROW_TAIL)
    do = _tile(DO, do_base, offs_m, do_n, offs_d, N, D, BLOCK_D, ROW_TAIL)
    o = _tile(O, o_base, offs_m, o_n, offs_d, N, D, BLOCK_D, ROW_TAIL)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)
    dq = tl.zeros([ROWS, BLOCK_D], tl.float32)
    if FOLD:
        for start in range(0, N, BLOCK_N):
            dq = _dq_keys(q, do, delta, lse, K, V, base, start, s_n, offs_d, dq, qk_scale, N, D, BLOCK_N, BLOCK_D,
                          N % BLOCK_N != 0, IEEE)
    else:
        for start in range(0, N - N % BLOCK_N, BLOCK_N):
            dq = _dq_keys(q, do, delta, lse, K, V, base, start, s_n, offs_d, dq, qk_scale, N, D, BLOCK_N, BLOCK_D,
                          False, IEEE)
    if (N % BLOCK_N != 0) and not FOLD:
        dq = _dq_keys(q, do, delta, lse, K, V, base, N - N % BLOCK_N, s_n, offs_d, dq, qk_scale, N, D, TAIL_N,
                      BLOCK_D, True, IEEE)
    _store(DQ, g_base, offs_m, g_n, offs_d, dq * sm_scale, N, D, BLOCK_D, ROW_TAIL)


@triton.jit
def _dkdv_queries(k, v, dk, dv, Q, DO, O, LSE, DQ, DQACC, base, o_base, do_base, g_base, bh, qstart, s_n, o_n, do_n,
                  g_n, offs_d, sm_scale, qk_scale, first, last, N, D: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_D: tl.constexpr, TAIL: tl.constexpr, WITH_DQ: tl.constexpr, IEEE: tl.constexpr, kn=None,
                  KEY_TAIL: tl.constexpr = False):
    """dk, dv += the contributions of ROWS queries from ``qstart``. WITH_DQ: also dq_i += ds_ij k_j into the head's
    fp32 rows of DQACC (``first`` key block: written without reading; ``last``: dq itself into DQ)."""
    qm = qstart + tl.arange(0, ROWS)
    q = _tile(Q, base, qm, s_n, offs_d, N, D, BLOCK_D, TAIL)
    do = _tile(DO, do_base, qm, do_n, offs_d, N, D, BLOCK_D, TAIL)
    o = _tile(O, o_base, qm, o_n, offs_d, N, D, BLOCK_D, TAIL)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    # queries past N: lse = +inf, so their p^T column is 2^(-inf) = 0
    lse = tl.load(LSE + bh.to(tl.int64) * N + qm, mask=qm < N, other=float("inf"))
    pT = tl.exp2(_dot(k, tl.trans(q), IEEE) * qk_scale - lse[None, :])  # [key rows, ROWS]
    if KEY_TAIL:
        # keys past N (zero rows of k) score 0, so their p would be 2^-lse: up to ~2^20 when a query's scores are
        # all very negative, which overflows fp16 in ds (inf x the zero row of k = NaN in dq). They are no keys:
        # p = 0.
        pT = tl.where((kn < N)[:, None], pT, 0.0)
    dv += _dot(pT.to(do.dtype), do, IEEE)
    dpT = _dot(v, tl.trans(do), IEEE)
    dsT = pT * (dpT - delta[None, :])
    dk += _dot(dsT.to(q.dtype), q, IEEE)
    if WITH_DQ:
        part = _dot(tl.trans(dsT).to(k.dtype), k, IEEE)  # [ROWS, BLOCK_D]
        acc_ptr = DQACC + bh.to(tl.int64) * N * BLOCK_D + qm[:, None] * BLOCK_D + offs_d[None, :]
        rows = qm[:, None] < N
        new = tl.load(acc_ptr, mask=rows & (first == 0), other=0.0) + part
        tl.store(acc_ptr, new, mask=rows & (last == 0))
        tl.store(DQ + g_base + qm[:, None] * g_n + offs_d[None, :], (new * sm_scale).to(DQ.dtype.element_ty),
                 mask=rows & (offs_d[None, :] < D) & (last != 0))
    return dk, dv


@triton.jit
def _bwd_dkdv(Q, K, V, O, DO, DK, DV, LSE, base, o_base, do_base, g_base, bh, start_n, s_n, o_n, do_n, g_n, sm_scale,
              qk_scale, N: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
              TAIL_M: tl.constexpr, BLOCK_D: tl.constexpr, ROW_TAIL: tl.constexpr, IEEE: tl.constexpr, DQ=None,
              DQACC=None, first=0, last=0, WITH_DQ: tl.constexpr = False, FOLD: tl.constexpr = False):
    """dk, dv of the ROWS keys from start_n (a loop over the query blocks). WITH_DQ (the per-head kernel, which
    runs the key blocks in order): dq as well, see _dkdv_queries."""
    offs_n = start_n + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    k = _tile(K, base, offs_n, s_n, offs_d, N, D, BLOCK_D, ROW_TAIL)
    v = _tile(V, base, offs_n, s_n, offs_d, N, D, BLOCK_D, ROW_TAIL)
    dk = tl.zeros([ROWS, BLOCK_D], tl.float32)
    dv = tl.zeros([ROWS, BLOCK_D], tl.float32)
    if FOLD:
        for qstart in range(0, N, BLOCK_M):
            dk, dv = _dkdv_queries(k, v, dk, dv, Q, DO, O, LSE, DQ, DQACC, base, o_base, do_base, g_base, bh, qstart,
                                   s_n, o_n, do_n, g_n, offs_d, sm_scale, qk_scale, first, last, N, D, BLOCK_M, BLOCK_D,
                                   N % BLOCK_M != 0, WITH_DQ, IEEE, offs_n, ROW_TAIL)
    else:
        for qstart in range(0, N - N % BLOCK_M, BLOCK_M):
            dk, dv = _dkdv_queries(k, v, dk, dv, Q, DO, O, LSE, DQ, DQACC, base, o_base, do_base, g_base, bh, qstart,
                                   s_n, o_n, do_n, g_n, offs_d, sm_scale, qk_scale, first, last, N, D, BLOCK_M, BLOCK_D,
                                   False, WITH_DQ, IEEE, offs_n, ROW_TAIL)
    if (N % BLOCK_M != 0) and not FOLD:
        dk, dv = _dkdv_queries(k, v, dk, dv, Q, DO, O, LSE, DQ, DQACC, base, o_base, do_base, g_base, bh,
                               N - N % BLOCK_M, s_n, o_n, do_n, g_n, offs_d, sm_scale, qk_scale, first, last, N, D,
                               TAIL_M, BLOCK_D, True, WITH_DQ, IEEE, offs_n, ROW_TAIL)
    _store(DK, g_base, offs_n, g_n, offs_d, dk * sm_scale, N, D, BLOCK_D, ROW_TAIL)
    _store(DV, g_base, offs_n, g_n, offs_d, dv, N, D, BLOCK_D, ROW_TAIL)


@triton.jit
def _dq_program(Q, K, V, O, DO, DQ, LSE, base, o_base, do_base, g_base, bh, pid, s_n, o_n, do_n, g_n, sm_scale,
                qk_scale, N: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                TAIL_M: tl.constexpr, TAIL_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
                FOLD: tl.constexpr):
    """dq of query block ``pid`` (the last one the partial TAIL_M block; FOLD: a row-masked full one)."""
    if FOLD or (N % BLOCK_M == 0):
        _bwd_dq(Q, K, V, O, DO, DQ, LSE, base, o_base, do_base, g_base, bh, pid * BLOCK_M, s_n, o_n, do_n, g_n,
                sm_scale, qk_scale, N, D, BLOCK_M, BLOCK_N, TAIL_N, BLOCK_D, N % BLOCK_M != 0, IEEE, FOLD)
    elif pid < N // BLOCK_M:
        _bwd_dq(Q, K, V, O, DO, DQ, LSE, base, o_base, do_base, g_base, bh, pid * BLOCK_M, s_n, o_n, do_n, g_n,
                sm_scale, qk_scale, N, D, BLOCK_M, BLOCK_N, TAIL_N, BLOCK_D, False, IEEE, FOLD)
    else:
        _bwd_dq(Q, K, V, O, DO, DQ, LSE, base, o_base, do_base, g_base, bh, pid * BLOCK_M, s_n, o_n, do_n, g_n,
                sm_scale, qk_scale, N, D, TAIL_M, BLOCK_N, TAIL_N, BLOCK_D, True, IEEE, FOLD)


@triton.jit
def _dkdv_program(Q, K, V, O, DO, DK, DV, LSE, base, o_base, do_base, g_base, bh, jb, s_n, o_n, do_n, g_n, sm_scale,
                  qk_scale, N: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  TAIL_M: tl.constexpr, TAIL_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
                  FOLD: tl.constexpr):
    """dk, dv of key block ``jb`` (the last one the partial TAIL_N block; FOLD: a row-masked full one)."""
    if FOLD or (N % BLOCK_N == 0):
        _bwd_dkdv(Q, K, V, O, DO, DK, DV, LSE, base, o_base, do_base, g_base, bh, jb * BLOCK_N, s_n, o_n, do_n,
                  g_n, sm_scale, qk_scale, N, D, BLOCK_N, BLOCK_M, TAIL_M, BLOCK_D, N % BLOCK_N != 0, IEEE,
                  FOLD=FOLD)
    elif jb < N // BLOCK_N:
        _bwd_dkdv(Q, K, V, O, DO, DK, DV, LSE, base, o_base, do_base, g_base, bh, jb * BLOCK_N, s_n, o_n, do_n,
                  g_n, sm_scale, qk_scale, N, D, BLOCK_N, BLOCK_M, TAIL_M, BLOCK_D, False, IEEE, FOLD=FOLD)
    else:
        _bwd_dkdv(Q, K, V, O, DO, DK, DV, LSE, base, o_base, do_base, g_base, bh, jb * BLOCK_N, s_n, o_n, do_n,
                  g_n, sm_scale, qk_scale, N, D, TAIL_N, BLOCK_M, TAIL_M, BLOCK_D, True, IEEE, FOLD=FOLD)


@triton.jit
def _attn_bwd(Q, K, V, O, DO, DQ, DK, DV, LSE, s_b, s_n, s_h, o_b, o_n, o_h, do_b, do_n, do_h, g_b, g_n, g_h,
              H, sm_scale, qk_scale, N: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              TAIL_M: tl.constexpr, TAIL_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
              KIND: tl.constexpr = 0, FOLD: tl.constexpr = False):
    """Axis 0: the first cdiv(N, BLOCK_M) programs each do dq of one block of query rows; the rest dk, dv of one
    block of keys (one head each; the last block of either kind is the partial TAIL_M / TAIL_N one).
    KIND 1: the dq programs alone; 2: the dk, dv programs alone (axis 0 counts key blocks). "split2" launches the
    two kinds as two kernels, so each kind gets the registers and the tiling it needs instead of sharing one.

    Strides: Q, K, V share (s_b, s_n, s_h); O (o_*); DO (do_*); DQ, DK, DV share (g_*); unit stride over D.
    """
    NQ: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    base, o_base, do_base, g_base = b * s_b + h * s_h, b * o_b + h * o_h, b * do_b + h * do_h, b * g_b + h * g_h
    if KIND == 1:
        _dq_program(Q, K, V, O, DO, DQ, LSE, base, o_base, do_base, g_base, bh, pid, s_n, o_n, do_n, g_n, sm_scale,
                    qk_scale, N, D, BLOCK_M, BLOCK_N, TAIL_M, TAIL_N, BLOCK_D, IEEE, FOLD)
    elif KIND == 2:
        _dkdv_program(Q, K, V, O, DO, DK, DV, LSE, base, o_base, do_base, g_base, bh, pid, s_n, o_n, do_n, g_n,
                      sm_scale, qk_scale, N, D, BLOCK_M, BLOCK_N, TAIL_M, TAIL_N, BLOCK_D, IEEE, FOLD)
    else:
        if pid < NQ:
            _dq_program(Q, K, V, O, DO, DQ, LSE, base, o_base, do_base, g_base, bh, pid, s_n, o_n, do_n, g_n,
                        sm_scale, qk_scale, N, D, BLOCK_M, BLOCK_N, TAIL_M, TAIL_N, BLOCK_D, IEEE, FOLD)
        else:
            _dkdv_program(Q, K, V, O, DO, DK, DV, LSE, base, o_base, do_base, g_base, bh, pid - NQ, s_n, o_n, do_n,
                          g_n, sm_scale, qk_scale, N, D, BLOCK_M, BLOCK_N, TAIL_M, TAIL_N, BLOCK_D, IEEE, FOLD)


@triton.jit
def _attn_bwd_head(Q, K, V, O, DO, DQ, DK, DV, LSE, DQACC, s_b, s_n, s_h, o_b, o_n, o_h, do_b, do_n, do_h, g_b, g_n,
                   g_h, H, sm_scale, qk_scale, N: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   IEEE: tl.constexpr, FOLD: tl.constexpr = False):
    """One program per (sample, head): the key blocks in order, each as _bwd_dkdv plus dq_i += ds_ij k_j kept in
    fp32 rows of DQACC ([B * H, N, BLOCK_D], no initialisation needed). Five matmuls per (query, key) block pair
    instead of the split kernel's seven, no atomics; the price is B * H programs and a serial key loop."""
    NF: tl.constexpr = N // BLOCK_N  # full key blocks (FOLD: cdiv(N, BLOCK_N), the last row-masked)
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    base, o_base, do_base, g_base = b * s_b + h * s_h, b * o_b + h * o_h, b * do_b + h * do_h, b * g_b + h * g_h
    if FOLD:
        NB: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
        for j in range(0, NB):
            tl.debug_barrier()  # as below
            _bwd_dkdv(Q, K, V, O, DO, DK, DV, LSE, base, o_base, do_base, g_base, bh, j * BLOCK_N, s_n, o_n, do_n,
                      g_n, sm_scale, qk_scale, N, D, BLOCK_N, BLOCK_M, TAIL_M, BLOCK_D, N % BLOCK_N != 0, IEEE, DQ,
                      DQACC, j == 0, j == NB - 1, True, FOLD)
    else:
        for j in range(0, NF):
            # the previous key block's dq rows were stored by whichever threads held them: make them visible
            tl.debug_barrier()
            _bwd_dkdv(Q, K, V, O, DO, DK, DV, LSE, base, o_base, do_base, g_base, bh, j * BLOCK_N, s_n, o_n, do_n,
                      g_n, sm_scale, qk_scale, N, D, BLOCK_N, BLOCK_M, TAIL_M, BLOCK_D, False, IEEE, DQ, DQACC, j == 0,
                      (N % BLOCK_N == 0) & (j == NF - 1), True)
    if (N % BLOCK_N != 0) and not FOLD:
        tl.debug_barrier()
        _bwd_dkdv(Q, K, V, O, DO, DK, DV, LSE, base, o_base, do_base, g_base, bh, NF * BLOCK_N, s_n, o_n, do_n, g_n,
                  sm_scale, qk_scale, N, D, TAIL_N, BLOCK_M, TAIL_M, BLOCK_D, True, IEEE, DQ, DQACC, NF == 0, 1,
                  True)


# --------------------------------------------------------------------------------------------
# "tma": persistent kernels loading by TMA, the forward and the backward's two launches (fifteenth session; built,
# CPU-checked, not timed)
# --------------------------------------------------------------------------------------------
# Why: the split kernel's dk dv programs hold 255 registers (two programs of 4 warps per SM), loop over only four
# query blocks (so each program's first loads are exposed) and recompute the row sums delta_i = do_i.o_i at every
# step. Here the operands arrive by TMA (no registers on the way to shared memory; the sm_90 build of the dk dv
# kernel needs 216 instead of 255), each program walks many (head, block) items in turn, so the next item's loads
# overlap this one's work, and the dq launch writes delta once for the dk dv launch, which then reads no o at all.
# Optionally (``ws``) the item loop is warp-specialised: a producer warp group issues the TMA loads, consumer warp
# groups compute (Triton 3.6's Hopper pass; 12 warps, one program per SM).
#
# Layout: q, k, v, o, do are read as [B * N, H * D] matrices (row stride s_n, head h at column h * D), so one
# descriptor serves every head of every sample. A block of rows that runs past a sample's N reads the next sample's
# first rows (zeros past the last sample): those rows are made harmless, never stored: queries past N get
# lse = +inf (p = 0) in both kernels; keys past N are masked out of p where they would reach a stored row (the dq
# kernel); in the dk dv kernel a key row only reaches its own rows of dk and dv, which are not stored.
# N is cut into full blocks and one partial block of TAIL rows (the pow2 rule of the split kernel) in the loop
# direction; the items are whole blocks (the last block of a head holds N % BLOCK valid rows).


@triton.jit
def _rows(P, ROWS: tl.constexpr, HD, s_n, BLOCK: tl.constexpr, D: tl.constexpr):
    """A TMA descriptor over P as a [ROWS, HD] matrix (row stride s_n) in [BLOCK, D] boxes: one head's block."""
    return tl.make_tensor_descriptor(P, shape=[ROWS, HD], strides=[s_n, 1], block_shape=[BLOCK, D])


@triton.jit
def _key_descs(K, V, ROWS: tl.constexpr, HD, s_n, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, D: tl.constexpr):
    """Descriptors of a head's key and value blocks: BLOCK_N rows, and TAIL_N rows for the last, partial block (the
    full ones again where N has none)."""
    k_desc = _rows(K, ROWS, HD, s_n, BLOCK_N, D)
    v_desc = _rows(V, ROWS, HD, s_n, BLOCK_N, D)
    if TAIL_N > 0:
        return k_desc, v_desc, _rows(K, ROWS, HD, s_n, TAIL_N, D), _rows(V, ROWS, HD, s_n, TAIL_N, D)
    else:
        return k_desc, v_desc, k_desc, v_desc


@triton.jit
def _item(i, PROGS: tl.constexpr, ITEMS: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr, H, N: tl.constexpr,
          D: tl.constexpr):
    """This program's i-th item (past the last one: the last one again, the same values to the same places): (head
    bh, first row of its block, sample b, the sample's first row, the head's first column)."""
    item = tl.minimum(tl.program_id(0) + i * PROGS, ITEMS - 1)
    bh = item // NB
    b = bh // H
    return bh, (item % NB) * BLOCK, b, b * N, (bh % H) * D


@triton.jit
def _attn_fwd_tma(Q, K, V, O, LSE, s_n, o_b, o_n, o_h, H, qk_scale, ROWS: tl.constexpr, N: tl.constexpr,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
                  STAGES: tl.constexpr, PROGS: tl.constexpr, PER: tl.constexpr, ITEMS: tl.constexpr,
                  WS: tl.constexpr):
    """The forward's items (head bh, query block), bh-major: o and lse of the block's rows, as _attn_fwd computes
    them (keys past N, the next sample's rows here, masked out of the softmax)."""
    HD = H * D
    q_desc = _rows(Q, ROWS, HD, s_n, BLOCK_M, D)
    k_desc, v_desc, kt_desc, vt_desc = _key_descs(K, V, ROWS, HD, s_n, BLOCK_N, TAIL_N, D)
    NQB: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
    FULL_N: tl.constexpr = N - N % BLOCK_N
    offs_d = tl.arange(0, D)
    for i in tl.range(0, PER, warp_specialize=WS):
        bh, qs, b, row0, col = _item(i, PROGS, ITEMS, NQB, BLOCK_M, H, N, D)
        qm = qs + tl.arange(0, BLOCK_M)
        q = q_desc.load([row0 + qs, col])
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for ks in tl.range(0, FULL_N, BLOCK_N, num_stages=STAGES):
            m_i, l_i, acc = _online_step(q, k_desc.load([row0 + ks, col]), v_desc.load([row0 + ks, col]),
                                         ks + tl.arange(0, BLOCK_N), m_i, l_i, acc, qk_scale, N, False, False)
        if TAIL_N > 0:
            m_i, l_i, acc = _online_step(q, kt_desc.load([row0 + FULL_N, col]), vt_desc.load([row0 + FULL_N, col]),
                                         FULL_N + tl.arange(0, TAIL_N), m_i, l_i, acc, qk_scale, N, True, False)
        ptrs = O + b.to(tl.int64) * o_b + qm.to(tl.int64)[:, None] * o_n + (col // D) * o_h + offs_d[None, :]
        tl.store(ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=(qm < N)[:, None])
        tl.store(LSE + bh * N + qm, m_i + tl.log2(l_i), mask=qm < N)


@triton.jit
def _bwd_dq_tma(Q, K, V, O, DO, DQ, LSE, DELTA, s_n, o_n, do_n, g_b, g_n, g_h, H, sm_scale, qk_scale,
                ROWS: tl.constexpr, N: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                TAIL_N: tl.constexpr, STAGES: tl.constexpr, PROGS: tl.constexpr, PER: tl.constexpr,
                ITEMS: tl.constexpr, WS: tl.constexpr):
    """Items (head bh, query block mb), bh-major: dq of the block's rows, and delta_i = do_i.o_i into DELTA [B * H,
    N] (fp32) for the dk dv launch. ROWS = B * N; the constexprs PROGS, PER, ITEMS as linear_gelu's TMA kernel."""
    HD = H * D
    q_desc = _rows(Q, ROWS, HD, s_n, BLOCK_M, D)
    o_desc = _rows(O, ROWS, HD, o_n, BLOCK_M, D)
    do_desc = _rows(DO, ROWS, HD, do_n, BLOCK_M, D)
    k_desc, v_desc, kt_desc, vt_desc = _key_descs(K, V, ROWS, HD, s_n, BLOCK_N, TAIL_N, D)
    NQB: tl.constexpr = (N + BLOCK_M - 1) // BLOCK_M
    FULL_N: tl.constexpr = N - N % BLOCK_N
    offs_d = tl.arange(0, D)
    for i in tl.range(0, PER, warp_specialize=WS):
        bh, qs, b, row0, col = _item(i, PROGS, ITEMS, NQB, BLOCK_M, H, N, D)
        qm = qs + tl.arange(0, BLOCK_M)
        q = q_desc.load([row0 + qs, col])
        do = do_desc.load([row0 + qs, col])
        o = o_desc.load([row0 + qs, col])
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        lse = tl.load(LSE + bh * N + qm, mask=qm < N, other=float("inf"))
        tl.store(DELTA + bh * N + qm, delta, mask=qm < N)
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        for ks in tl.range(0, FULL_N, BLOCK_N, num_stages=STAGES):
            k = k_desc.load([row0 + ks, col])
            v = v_desc.load([row0 + ks, col])
            p = tl.exp2(_dot(q, tl.trans(k), False) * qk_scale - lse[:, None])
            ds = p * (_dot(do, tl.trans(v), False) - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, False)
        if TAIL_N > 0:
            k = kt_desc.load([row0 + FULL_N, col])
            v = vt_desc.load([row0 + FULL_N, col])
            kn = FULL_N + tl.arange(0, TAIL_N)
            p = tl.exp2(_dot(q, tl.trans(k), False) * qk_scale - lse[:, None])
            p = tl.where(kn[None, :] < N, p, 0.0)  # the next sample's rows are no keys of this head
            ds = p * (_dot(do, tl.trans(v), False) - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, False)
        ptrs = DQ + b.to(tl.int64) * g_b + qm.to(tl.int64)[:, None] * g_n + (col // D) * g_h + offs_d[None, :]
        tl.store(ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=(qm < N)[:, None])


@triton.jit
def _bwd_dkdv_tma(Q, K, V, DO, DK, DV, LSE, DELTA, s_n, do_n, g_b, g_n, g_h, H, sm_scale, qk_scale,
                  ROWS: tl.constexpr, N: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, STAGES: tl.constexpr, PROGS: tl.constexpr,
                  PER: tl.constexpr, ITEMS: tl.constexpr, WS: tl.constexpr):
    """Items (head bh, key block jb), bh-major: dk, dv of the block's keys over all queries, with the DELTA the dq
    launch wrote."""
    HD = H * D
    k_desc = _rows(K, ROWS, HD, s_n, BLOCK_N, D)
    v_desc = _rows(V, ROWS, HD, s_n, BLOCK_N, D)
    q_desc = _rows(Q, ROWS, HD, s_n, BLOCK_M, D)
    do_desc = _rows(DO, ROWS, HD, do_n, BLOCK_M, D)
    if TAIL_M > 0:
        qt_desc = _rows(Q, ROWS, HD, s_n, TAIL_M, D)
        dot_desc = _rows(DO, ROWS, HD, do_n, TAIL_M, D)
    NKB: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    FULL_M: tl.constexpr = N - N % BLOCK_M
    offs_d = tl.arange(0, D)
    for i in tl.range(0, PER, warp_specialize=WS):
        bh, ks, b, row0, col = _item(i, PROGS, ITEMS, NKB, BLOCK_N, H, N, D)
        k = k_desc.load([row0 + ks, col])
        v = v_desc.load([row0 + ks, col])
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        for qs in tl.range(0, FULL_M, BLOCK_M, num_stages=STAGES):
            q = q_desc.load([row0 + qs, col])
            do = do_desc.load([row0 + qs, col])
            lse = tl.load(LSE + bh * N + qs + tl.arange(0, BLOCK_M))
            delta = tl.load(DELTA + bh * N + qs + tl.arange(0, BLOCK_M))
            pT = tl.exp2(_dot(k, tl.trans(q), False) * qk_scale - lse[None, :])
            dv += _dot(pT.to(do.dtype), do, False)
            dsT = pT * (_dot(v, tl.trans(do), False) - delta[None, :])
            dk += _dot(dsT.to(q.dtype), q, False)
        if TAIL_M > 0:
            qm = FULL_M + tl.arange(0, TAIL_M)
            q = qt_desc.load([row0 + FULL_M, col])
            do = dot_desc.load([row0 + FULL_M, col])
            lse = tl.load(LSE + bh * N + qm, mask=qm < N, other=float("inf"))  # rows past N: p = 0
            delta = tl.load(DELTA + bh * N + qm, mask=qm < N, other=0.0)
            pT = tl.exp2(_dot(k, tl.trans(q), False) * qk_scale - lse[None, :])
            dv += _dot(pT.to(do.dtype), do, False)
            dsT = pT * (_dot(v, tl.trans(do), False) - delta[None, :])
            dk += _dot(dsT.to(q.dtype), q, False)
        kn = ks + tl.arange(0, BLOCK_N)
        offs = b.to(tl.int64) * g_b + kn.to(tl.int64)[:, None] * g_n + (col // D) * g_h + offs_d[None, :]
        tl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=(kn < N)[:, None])
        tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=(kn < N)[:, None])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _block_d(D):
    return max(16, triton.next_power_of_2(D))


# "split2"'s (dq kernel, dk dv kernel) configs for bf16 / fp16 heads of 64, from sm_90 builds until the GPU times them
# (kernels/NOTES.md): padded tails, so every dot is a wgmma of one layout and the loops carry no masks; pipelined, no
# spills; dq 136 registers (3 programs of 4 warps per SM, 224 instructions per key step); dk dv 182 (2 programs of 4
# warps, 353 per 32-query step; 224 of 197 query rows padded instead of 256). The split kernel: 255 registers.
SPLIT2_64 = ((64, 64, 4, 2, "pad"), (32, 64, 4, 2, "pad"))


def _config(D, kind, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages[, tail]) for head dim D; kind "fwd", "bwd", "bwd_head", or
    "bwd_dq" / "bwd_dkdv" ("split2"'s two kernels).

    Chosen from sm_90 builds without a GPU (``python -m tokenlabel.kernels._attn_tune resources``: registers,
    spills, shared memory, whether the loops are pipelined), not yet from GPU timings. Heads of 64 (LV-ViT-S/M/L),
    bf16: forward 64 x 64 tiles, 4 warps, 2 stages (112 registers); split backward the same (255, no spills);
    per-head backward 32 x 64 (255, no spills; 64 x 64 at 8 warps spills). Heads of 60 (LV-ViT-T): the loads
    are masked over the head dim and cannot be pipelined; 8 warps keep the backwards spill-free. fp32 (IEEE dots
    on the FMA units, operands in registers) and heads over 64 (no LV-ViT model has them): small tiles, a few
    spilled registers left in the wider cases (correct, slower).
    """
    bd = _block_d(D)
    fp32 = dtype == torch.float32
    table = {  # (fwd, bwd, bwd_head[, bwd_dq, bwd_dkdv: "split2"'s two kernels, else bwd's])
        "fp32": ((32, 32, 4, 1), (16, 16, 8, 1), (32, 16, 8, 1)),
        "fp32 wide": ((16, 16, 8, 1),) * 3,
        "64": ((64, 64, 4, 2), (64, 64, 4, 2), (32, 64, 4, 2), SPLIT2_64[0], SPLIT2_64[1]),
        "64 masked": ((64, 64, 8, 2), (64, 64, 8, 1), (32, 64, 8, 1)),
        "128": ((64, 64, 8, 2), (32, 64, 8, 2), (32, 32, 8, 1)),
        "256": ((32, 32, 8, 1), (16, 32, 8, 1), (16, 16, 8, 1)),
    }
    if fp32:
        row = table["fp32" if bd <= 64 else "fp32 wide"]
    elif bd <= 64:
        row = table["64 masked" if D % 16 else "64"]
    else:
        row = table["128" if bd <= 128 else "256"]
    kinds = ("fwd", "bwd", "bwd_head", "bwd_dq", "bwd_dkdv")
    if kind not in kinds:
        raise ValueError(f"attention config kind={kind!r}; valid: {', '.join(kinds)}")
    i = kinds.index(kind)
    return row[i] if i < len(row) else row[1]


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


def _tail(N, block):
    """Rows of the last, partial block of N: the remainder rounded up to a power of two, at least 16 (0: none)."""
    r = N % block
    return 0 if r == 0 else min(block, max(16, triton.next_power_of_2(r)))


TAILS = ("pow2", "pad", "fold")  # how the last partial block of N is tiled (see above)


def _tiling(N, D, bm, bn, dtype, tail="pow2"):
    """The constexprs of a (BLOCK_M, BLOCK_N) tiling with ``tail`` (TAILS)."""
    if tail not in TAILS:
        raise ValueError(f"attention tail={tail!r}; valid: {', '.join(TAILS)}")
    fold = tail == "fold" and (N % bm != 0 or N % bn != 0)  # nothing to fold where both divide N
    if tail == "pow2":
        tails = (_tail(N, bm), _tail(N, bn))
    else:
        tails = (bm if N % bm else 0, bn if N % bn else 0)
    return dict(N=N, D=D, BLOCK_M=bm, BLOCK_N=bn, TAIL_M=tails[0], TAIL_N=tails[1], BLOCK_D=_block_d(D),
                IEEE=dtype == torch.float32, FOLD=fold)


def _unpack(config):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, tail) of a config tuple (tail, the fifth element, optional)."""
    config = tuple(config)
    if len(config) not in (4, 5):
        raise ValueError(f"attention config {config!r}: (BLOCK_M, BLOCK_N, num_warps, num_stages[, tail])")
    return config + ("pow2",) * (5 - len(config))


def fwd_launch(q, k, v, o, lse, scale, config=None):
    """(kernel, grid, args, constexprs, launch options) of the forward for these tensors (meta tensors work:
    only shapes and strides are read). ``config`` = (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides _config."""
    B, N, H, D = q.shape
    bm, bn, warps, stages, tail = _unpack(config or _config(D, "fwd", q.dtype))
    args = (q, k, v, o, lse, q.stride(0), q.stride(1), q.stride(2), o.stride(0), o.stride(1), o.stride(2), H,
            float(scale) * _LOG2E)
    const = _tiling(N, D, bm, bn, q.dtype, tail)
    return _attn_fwd, (triton.cdiv(N, bm), B * H), args, const, dict(num_warps=warps, num_stages=stages)


def _check_impl(impl):
    if impl not in BWD_IMPLS:
        raise ValueError(f"flash attention backward impl={impl!r}; valid: {', '.join(BWD_IMPLS)}")
    return impl


_BWD_KINDS = {"split": 0, "dq": 1, "dkdv": 2}  # _attn_bwd's KIND


def bwd_launch(do, q, k, v, o, lse, dq, dk, dv, scale, config=None, impl="split", dq_acc=None, kind="split"):
    """One backward launch's (kernel, grid, args, constexprs, launch options), as fwd_launch. impl "split":
    query-block and key-block programs (_attn_bwd); ``kind`` "dq" or "dkdv": one of the two kinds alone (the two
    launches of impl "split2", see bwd_launches); "head": one program per (sample, head) (_attn_bwd_head), which
    needs ``dq_acc``, an fp32 scratch of B * H * N * BLOCK_D elements (``bwd_scratch``)."""
    head = _check_impl(impl) == "head"
    if impl == "split2":
        raise ValueError('impl "split2" is two launches: use bwd_launches, or bwd_launch(kind="dq" / "dkdv")')
    if kind not in _BWD_KINDS or (head and kind != "split"):
        raise ValueError(f"backward kind={kind!r}; valid: {', '.join(_BWD_KINDS)} (impl \"split\" only)")
    B, N, H, D = q.shape
    cfg_kind = "bwd_head" if head else ("bwd" if kind == "split" else f"bwd_{kind}")
    bm, bn, warps, stages, tail = _unpack(config or _config(D, cfg_kind, q.dtype))
    args = ((q, k, v, o, do, dq, dk, dv, lse) + ((dq_acc,) if head else ())
            + (q.stride(0), q.stride(1), q.stride(2), o.stride(0), o.stride(1), o.stride(2), do.stride(0),
               do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2), H, float(scale),
               float(scale) * _LOG2E))
    const = _tiling(N, D, bm, bn, q.dtype, tail)
    if head:
        return _attn_bwd_head, (B * H,), args, const, dict(num_warps=warps, num_stages=stages)
    programs = {"split": triton.cdiv(N, bm) + triton.cdiv(N, bn), "dq": triton.cdiv(N, bm), "dkdv": triton.cdiv(N, bn)}
    const["KIND"] = _BWD_KINDS[kind]
    return _attn_bwd, (programs[kind], B * H), args, const, dict(num_warps=warps, num_stages=stages)


def bwd_launches(do, q, k, v, o, lse, dq, dk, dv, scale, config=None, impl="split", dq_acc=None):
    """The backward as a list of launches: one for "split" and "head"; for "split2" the dq kernel, then the dk, dv
    kernel, ``config`` then a pair (dq's, dk dv's) or None for the defaults; for "tma" its two launches
    (``config``: tma_bwd_launches's ``configs``) where tma_ready, else "split"'s."""
    if _check_impl(impl) == "tma":
        if tma_ready(q, k, v, o, do):
            return tma_bwd_launches(do, q, k, v, o, lse, dq, dk, dv, scale, config)
        impl, config = "split", None
    if impl != "split2":
        return [bwd_launch(do, q, k, v, o, lse, dq, dk, dv, scale, config, impl, dq_acc)]
    if config is not None and (len(config) != 2 or not all(c is None or isinstance(c, tuple) for c in config)):
        raise ValueError(f'impl "split2" takes a pair of configs (dq kernel, dk dv kernel), got {config!r}')
    cq, ckv = config if config is not None else (None, None)
    return [bwd_launch(do, q, k, v, o, lse, dq, dk, dv, scale, cq, "split", kind="dq"),
            bwd_launch(do, q, k, v, o, lse, dq, dk, dv, scale, ckv, "split", kind="dkdv")]


# "tma"'s two launches (the dq kernel, which also writes the row sums delta; the dk dv kernel): tile rows of each
# direction, warps, pipeline stages of the inner loop, programs per SM, and ``ws``, the item loop warp-specialised
# (4 warps; a producer and two consumer warp groups, one program per SM; the forward only, see _check_ws). Timed on
# an H100 (2026-12-05, S224 bf16, _attn_tune, bench/results/attn-tma-h100): the fastest tilings were these, dq
# 98.7 us + dk dv 105.1 us = 204 us against the split kernel's 169.5 us, so "tma" is not the default.
TMA_BWD = {"dq": dict(bm=64, bn=64, warps=4, stages=3, per_sm=2, ws=False),
           "dkdv": dict(bm=64, bn=64, warps=4, stages=3, per_sm=2, ws=False)}


# The forward: "ptr" (_attn_fwd, one program per query block, pointer loads; the default) or "tma" (_attn_fwd_tma:
# persistent programs walking (head, query block) items, operands by TMA; where tma_ready, else "ptr"); TMA_FWD as
# TMA_BWD's entries. On an H100 (2026-12-05, S224 bf16) the fastest "tma" forward (this tiling) took 76.8 us against
# "ptr"'s 50.6 us (warp-specialised: 87.5 us), so "ptr" stays the default.
FWD_IMPLS = ("ptr", "tma")
FWD_IMPL = "ptr"
_FWD_OVERRIDE: list[str] = []
TMA_FWD = dict(bm=64, bn=64, warps=4, stages=3, per_sm=2, ws=False)


@contextlib.contextmanager
def use_fwd_impl(impl):
    """Within the block the forward runs as ``impl`` (FWD_IMPLS)."""
    if impl not in FWD_IMPLS:
        raise ValueError(f"flash attention forward impl={impl!r}; valid: {', '.join(FWD_IMPLS)}")
    _FWD_OVERRIDE.append(impl)
    try:
        yield
    finally:
        _FWD_OVERRIDE.pop()


def tma_fwd_launch(q, k, v, o, lse, scale, config=None, sms=None):
    """The "tma" forward's launch, as fwd_launch's tuple; ``config``: TMA_FWD entries to override."""
    B, N, H, D = q.shape
    cfg = {**TMA_FWD, **(config or {})}
    _check_ws(cfg, "forward")
    items = B * H * triton.cdiv(N, cfg["bm"])
    progs, per = _persistent_grid(items, cfg["per_sm"] * (sms or sm_count(q.device)))
    args = (q, k, v, o, lse, q.stride(1), o.stride(0), o.stride(1), o.stride(2), H, float(scale) * _LOG2E)
    const = dict(ROWS=B * N, N=N, D=D, BLOCK_M=cfg["bm"], BLOCK_N=cfg["bn"], TAIL_N=_tail(N, cfg["bn"]),
                 STAGES=cfg["stages"], PROGS=progs, PER=per, ITEMS=items, WS=bool(cfg["ws"]))
    return _attn_fwd_tma, (progs,), args, const, dict(num_warps=cfg["warps"], num_stages=cfg["stages"])


def _check_ws(cfg, what):
    """ValueError naming the problem for ws=True where Triton 3.6's Hopper pass does not build the kernel (it fails
    there with an opaque "PassManager::run failed": 4 warps; not the dq kernel; 64-row forward blocks) or builds it
    wrong: the dk dv kernel built warp-specialised left dk / dv rows unwritten (NaN) on an H100 (2026-12-05, every
    tiling tried; bench/results/attn-tma-h100), while its plain build matched the split kernel exactly."""
    if not cfg["ws"]:
        return
    problems = [why for bad, why in (
        (cfg["warps"] != 4, f"warps=4 (got {cfg['warps']})"),
        (what != "forward", "the forward kernel (Triton 3.6 does not build the dq kernel warp-specialised, and its "
                            "warp-specialised dk dv kernel leaves dk / dv rows unwritten on an H100)"),
        (what == "forward" and cfg["bm"] != 64, f"bm=64 in the forward (got {cfg['bm']})")) if bad]
    if problems:
        raise ValueError(f"attention tma {what} config {cfg}: ws=True (warp specialisation) needs "
                         + ", ".join(problems))


def tma_ready(q, k, v, o, do) -> bool:
    """Whether "tma" takes these tensors (else "split" runs): half precision, a power-of-two head dim of 16-128,
    each of q, k, v, o, do a [B, N, H, D] view whose (sample, token) rows lie at one stride (as views of the qkv
    Linear's output and of o do) with the heads packed along a row, 16-byte-aligned bases and row strides."""
    B, N, H, D = q.shape
    if q.dtype not in (torch.float16, torch.bfloat16) or D not in (16, 32, 64, 128):
        return False
    return all(t.stride(3) == 1 and t.stride(2) == D and t.stride(0) == N * t.stride(1) and t.data_ptr() % 16 == 0
               and (t.stride(1) * t.element_size()) % 16 == 0 for t in (q, k, v, o, do))


def tma_bwd_launches(do, q, k, v, o, lse, dq, dk, dv, scale, configs=None, sms=None):
    """"tma"'s two launches, as bwd_launch's tuples; ``configs``: {"dq" | "dkdv": TMA_BWD entries to override};
    ``sms``: the SM count the persistent grids are sized for (default: q's device's)."""
    B, N, H, D = q.shape
    delta = torch.empty(B * H * N, device=q.device, dtype=torch.float32)  # the dq kernel writes, dk dv reads
    launches = []
    for kind, kernel in (("dq", _bwd_dq_tma), ("dkdv", _bwd_dkdv_tma)):
        cfg = {**TMA_BWD[kind], **((configs or {}).get(kind) or {})}
        _check_ws(cfg, f"backward {kind}")
        bm, bn = cfg["bm"], cfg["bn"]
        items = B * H * triton.cdiv(N, bm if kind == "dq" else bn)
        progs, per = _persistent_grid(items, cfg["per_sm"] * (sms or sm_count(q.device)))
        const = dict(ROWS=B * N, N=N, D=D, BLOCK_M=bm, BLOCK_N=bn, STAGES=cfg["stages"], PROGS=progs, PER=per,
                     ITEMS=items, WS=bool(cfg["ws"]))
        if kind == "dq":
            args = (q, k, v, o, do, dq, lse, delta, q.stride(1), o.stride(1), do.stride(1))
            const["TAIL_N"] = _tail(N, bn)
        else:
            args = (q, k, v, do, dk, dv, lse, delta, q.stride(1), do.stride(1))
            const["TAIL_M"] = _tail(N, bm)
        args += (dq.stride(0), dq.stride(1), dq.stride(2), H, float(scale), float(scale) * _LOG2E)
        launches.append((kernel, (progs,), args, const, dict(num_warps=cfg["warps"], num_stages=cfg["stages"])))
    return launches


def _run(launch):
    kernel, grid, args, const, opts = launch
    kernel[grid](*args, **const, **opts)


def attention_forward(q, k, v, scale, config=None):
    """(o [B, N, H, D] contiguous in q's dtype, lse [B, H, N] fp32 in log2 units); q, k, v [B, N, H, D]."""
    q, k, v = _same_strides(q, k, v)
    B, N, H, D = q.shape
    o = torch.empty(B, N, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    impl = _FWD_OVERRIDE[-1] if _FWD_OVERRIDE else FWD_IMPL
    if impl == "tma" and config is None and tma_ready(q, k, v, o, o):
        _ensure_allocator()  # the TMA kernel makes its descriptors on the device
        _run(tma_fwd_launch(q, k, v, o, lse, scale))
    else:
        _run(fwd_launch(q, k, v, o, lse, scale, config))
    return o, lse


@contextlib.contextmanager
def use_bwd_impl(impl):
    """Within the block the autograd paths launch backward ``impl`` ("split" or "head"), whatever was measured."""
    _BWD_OVERRIDE.append(_check_impl(impl))
    try:
        yield
    finally:
        _BWD_OVERRIDE.pop()


# the TMA kernels warp-specialised where Triton 3.6 builds them so correctly: the forward only (its pass fails on the
# dq kernel; its dk dv kernel came out wrong on an H100, see _check_ws)
TMA_WS = {"fwd": dict(ws=True, per_sm=1)}


@contextlib.contextmanager
def use_tma(configs=None):
    """Within the block the forward and the autograd paths' backward run the "tma" kernels, TMA_FWD / TMA_BWD
    updated by ``configs`` ({"fwd" | "dq" | "dkdv": entries}, e.g. TMA_WS)."""
    tables = {"fwd": TMA_FWD, **TMA_BWD}
    saved = {kind: dict(cfg) for kind, cfg in tables.items()}
    for kind, update in (configs or {}).items():
        if kind not in tables:
            raise ValueError(f"tma configs: kinds are {', '.join(tables)}, got {kind!r}")
        tables[kind].update(update)
    try:
        with use_fwd_impl("tma"), use_bwd_impl("tma"):
            yield
    finally:
        for kind, cfg in saved.items():
            tables[kind].clear()
            tables[kind].update(cfg)


def bwd_impl_for(q):
    """The backward the autograd paths launch for q [B, N, H, D]: use_bwd_impl's if inside one, else the one
    measured faster for this shape (BWD_BY_SHAPE, filled by the model's "auto"), else BWD_IMPL."""
    if _BWD_OVERRIDE:
        return _BWD_OVERRIDE[-1]
    return BWD_BY_SHAPE.get((*q.shape, q.dtype), BWD_IMPL)


def bwd_scratch(q):
    """The fp32 dq accumulator the "head" backward needs for q [B, N, H, D] (uninitialised)."""
    B, N, H, D = q.shape
    return torch.empty(B * H * N * _block_d(D), device=q.device, dtype=torch.float32)


def attention_backward(do, q, k, v, o, lse, scale, config=None, impl=None):
    """The gradient of q, k, v packed as one [B, N, 3, H, D] tensor (index 2: q, k, v); do [B, N, H, D].
    ``impl``: "split" or "head" (see bwd_launch); None: bwd_impl_for(q)."""
    q, k, v = _same_strides(q, k, v)
    B, N, H, D = q.shape
    do = _unit_last(do.to(q.dtype))
    dqkv = torch.empty(B, N, 3, H, D, device=q.device, dtype=q.dtype)
    impl = impl or bwd_impl_for(q)
    scratch = bwd_scratch(q) if impl == "head" else None
    if impl == "tma":
        _ensure_allocator()  # the TMA kernels make their descriptors on the device
    for launch in bwd_launches(do, q, k, v, o, lse, *dqkv.unbind(2), scale, config, impl, scratch):
        _run(launch)
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


def _fwd(q, k, v, scale):
    return dispatch(torch.ops.tokenlabel.flash_attn_fwd, attention_forward, q, k, v, scale, check=(q,))


def _bwd(do, q, k, v, o, lse, scale):
    return dispatch(torch.ops.tokenlabel.flash_attn_bwd, attention_backward, do, q, k, v, o, lse, scale,
                    check=(do, q))


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
