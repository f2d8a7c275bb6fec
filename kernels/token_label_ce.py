"""Fused token-labeling cross-entropy: Triton kernels, launcher and autograd glue in one file.

The math (token_labeling.md §2, §4), written once here
======================================================
Per sample b the teacher map is sparse: at each pixel (r, c) of the S x S map, k classes carry a
logit, every other class logit 0. RoIAlign is linear and separable (see reference.py): the pooled
logit of class c for output cell (p, q) is

    z_c = sum_{r, c'} Wy[p, r] * Wx[q, c'] * M[c, r, c'],

so z is non-zero only on U = the union of the top-k classes at the bilinear taps the cell touches
(duplicate classes accumulate). With on = 1 - s + s/C and off = s/C the token target is

    t_c = on * e^{z_c} / Z + off,     Z = sum_{c in U} e^{z_c} + (C - |U|),   sum_c t_c = 1 + s/C.

The soft CE of one logits row x, loss = sum_c t_c * (lse(x) - x_c), therefore needs only lse(x),
sum(x) and the gathers x_c for c in U:

    loss = (1 + s/C) * lse(x) - on * [sum_{c in U} e^{z_c} x_c + (sum(x) - sum_{c in U} x_c)] / Z
           - off * sum(x),

and its gradient is d loss / d x_c = (1 + s/C) * softmax(x)_c - t_c (the target does not sum to 1).
For numerical range every e^{z} is taken relative to m = max(0, max_U z).

One program (one warp for C <= 1024) per logits row:
 1. request the row, then load the taps (rows x cols x k entries of the map rectangle the cell touches)
    with their weights Wy * Wx * value (the bilinear weights as tents, the common two samples per axis
    without a loop);
 2. dedupe the classes of the taps: one bitonic sort on (class, entry) and one segmented scan leave each
    class's total z at the last entry of its run (an entry counts towards U only there); a 2 x 2-pixel
    cell (4k entries) sorts a block of 32 at k 5, larger cells one of 64;
 3. read the row once: max, sum of e^{x - max} (kept in registers), sum(x);
 4. write the row's loss and the dense gradient (1 + s/C) * softmax(x) - on/Z - off, scaled;
 5. after a barrier, overwrite the |U| corrected entries (1 + s/C) * softmax(x)_c - t_c.
A cell with more taps than the large sorted block (a box beyond the image) is handed through a
device-side list to the general rows, which dedupe in blocks of TB entries with pairwise equality
masks (extra programs of the cls launch; a kernel of their own in the chunked fused-linear path).
The cls rows' targets (1 x 1 pooling) are pooled by extra programs of kernel 1 into a [B, C] fp32
buffer (atomic adds: duplicates accumulate); the cls launch then builds each cls target (softmax,
smoothing, ground-truth blend, MixToken mixing with the batch-reversed partner), writes the cls loss
and gradient and adds its sample's token losses into the scalar loss.

The gradient is written during the forward, so backward is only a scale by grad_output, which the
scale kernel reads on the device and skips when it is 1.0 (no host synchronisation anywhere).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = tl.constexpr(1.4426950408889634)  # e^x = 2^(x log2 e)


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _exp2(x, FAST: tl.constexpr):
    """2^x. FAST (compiled): one ex2.approx.ftz, results below 2^-126 flush to 0; tl.exp2 keeps denormals
    with a range test and two predicated multiplies around the same approximation (3 more instructions
    per element). The interpreter takes tl.exp2."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _log(x, FAST: tl.constexpr):
    """ln x for x >= 1 (a softmax denominator); FAST: lg2.approx.ftz times ln 2."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1) * 0.6931471805599453
    else:
        return tl.log(x)


@triton.jit
def _axis_geometry(start_n, size_n, S, L, p):
    """RoIAlign along one axis for output cell p (torchvision, aligned=False, scale 1, adaptive grid).

    start_n, size_n: the box on this axis, normalised to the map side (the reference's -0.5 applied).
    Returns (first sample position - 0.5 * step, step between samples, grid, 1 / grid, lowest tap, highest tap).
    """
    start = start_n * S - 0.5
    roi = tl.maximum(size_n * S, 1.0)
    bin_ = roi / L
    grid_f = tl.maximum(tl.ceil(roi / L), 1.0)  # IEEE division: ceil must see the exact quotient
    step = tl.fdiv(bin_, grid_f)  # positions are continuous in step: the fast division is enough
    base = start + p * bin_
    y_first = tl.maximum(base + 0.5 * step, 0.0)
    y_last = tl.maximum(base + (grid_f - 0.5) * step, 0.0)
    lo = tl.minimum(tl.floor(y_first), S - 1.0).to(tl.int32)
    hi = tl.minimum(tl.floor(y_last) + 1.0, S - 1.0).to(tl.int32)
    return base, step, grid_f.to(tl.int32), tl.fdiv(1.0, grid_f), lo, hi


@triton.jit
def _tent(rf, base, g, grid, step, S):
    """Bilinear weight of sample g (of grid) on map rows rf: the tent max(0, 1 - |y - r|) at y clamped to
    [0, S - 1]. That is torchvision's y_low = floor(y) with weights 1 - ly and ly on y_low and y_low + 1,
    and both taps on S - 1 past it, written without the floor. A sample outside [-1, S] (or g >= grid)
    counts 0: its position moves to -2, two rows away from every map row."""
    y = base + (g + 0.5) * step
    yc = tl.where((y >= -1.0) & (y <= S * 1.0) & (g < grid), tl.minimum(tl.maximum(y, 0.0), S - 1.0), -2.0)
    return tl.maximum(1.0 - tl.abs(yc - rf), 0.0)


@triton.jit
def _axis_weight(r, base, step, grid, S):
    """grid * Wy[r] = sum_g valid(y_g) * (bilinear weight of sample y_g on map row r) (the caller divides).
    Samples 0 and 1 without a loop (a crop inside the image has grid <= ceil(S / L) <= 2 for L >= S/2)."""
    rf = r.to(tl.float32)
    acc = _tent(rf, base, 0, grid, step, S) + _tent(rf, base, 1, grid, step, S)
    if grid > 2:
        g = 2
        while g < grid:  # while, not range: the interpreter cannot take a loaded bound in range()
            acc += _tent(rf, base, g, grid, step, S)
            g += 1
    return acc


@triton.jit
def _entries_dedup(a0, n_ent, ncols, K, r_lo, c_lo, yb, ys, yg, xb, xs, xg, inv_g, val_b, idx_b, S, C, flip,
                   TB: tl.constexpr):
    """Entries [a0, a0+TB): class id, total pooled logit z of that class, first-occurrence flag."""
    eA = a0 + tl.arange(0, TB)
    cidA, wA, validA, badA = _entries(eA, n_ent, ncols, K, r_lo, c_lo, yb, ys, yg, xb, xs, xg, inv_g, val_b, idx_b,
                                      S, C, flip)
    zA = tl.zeros([TB], dtype=tl.float32)
    dupA = tl.zeros([TB], dtype=tl.int32)
    b0 = 0
    while b0 < n_ent:
        eB = b0 + tl.arange(0, TB)
        if b0 == a0:  # the diagonal block is chunk A itself: no second gather
            cidB = cidA
            wB = wA
            validB = validA
        else:
            cidB, wB, validB, _ = _entries(eB, n_ent, ncols, K, r_lo, c_lo, yb, ys, yg, xb, xs, xg, inv_g, val_b, idx_b,
                                           S, C, flip)
        eq = (cidA[:, None] == cidB[None, :]) & validB[None, :]
        zA += tl.sum(tl.where(eq, wB[None, :], 0.0), axis=1)
        dupA += tl.sum((eq & (eB[None, :] < eA[:, None])).to(tl.int32), axis=1)
        b0 += TB
    return cidA, zA, validA, validA & (dupA == 0), badA


@triton.jit
def _u_stats(z, xu, first, bad, m, sum_ez, sum_ezx, sum_xu, n_u, n_bad):
    """Fold one block of entries into the running sums over U (first occurrences only), online in m."""
    m_new = tl.maximum(m, tl.max(tl.where(first, z, 0.0), axis=0))
    r = tl.exp(m - m_new)
    ez = tl.where(first, tl.exp(z - m_new), 0.0)
    xf = tl.where(first, xu, 0.0)
    sum_ez = sum_ez * r + tl.sum(ez, axis=0)
    sum_ezx = sum_ezx * r + tl.sum(ez * xf, axis=0)
    sum_xu += tl.sum(xf, axis=0)
    n_u += tl.sum(first.to(tl.int32), axis=0)
    n_bad += tl.sum(bad.to(tl.int32), axis=0)
    return m_new, sum_ez, sum_ezx, sum_xu, n_u, n_bad



@triton.jit
def _seg_sum(k1, z1, k2, z2):
    """Segmented inclusive scan over class-sorted entries: the running z within a class run (associative
    because the keys are sorted: a range's key is its last entry's, and a run never resumes)."""
    return k2, z2 + tl.where(k1 == k2, z1, 0.0)


@triton.jit
def _entries(e, n_ent, ncols, K, r_lo, c_lo, yb, ys, yg, xb, xs, xg, inv_g, val_b, idx_b, S, C, flip):
    """Tap entries e (entry = (pixel rc, slot j) of the touched rectangle, rows x ncols pixels x K):
    class id, weight Wy * Wx * value (0 where invalid), validity, bad-class flag; both loads at once.

    rc // ncols in fp32: (rc + 0.5) / ncols lies at least 0.5 / ncols from an integer, while the fp32
    rounding error of the quotient (at most rows <= S) is below S * 2^-22: exact for S < 1,000."""
    valid = e < n_ent
    j = e % K
    rc = e // K
    rr = ((rc.to(tl.float32) + 0.5) * (1.0 / ncols.to(tl.float32))).to(tl.int32)
    c = c_lo + rc - rr * ncols
    r = r_lo + rr
    cm = tl.where(flip != 0, S - 1 - c, c)  # the flip mirrors the map's columns
    off = (j * S + r) * S + cm
    cid = tl.load(idx_b + off, mask=valid, other=0).to(tl.int32)
    v = tl.load(val_b + off, mask=valid, other=0.0).to(tl.float32)
    w = _axis_weight(r, yb, ys, yg, S) * _axis_weight(c, xb, xs, xg, S) * (v * inv_g)
    bad = valid & ((cid < 0) | (cid >= C))
    cid = tl.where(bad, 0, cid)  # never address outside the row; the loss becomes NaN instead
    return cid, tl.where(valid, w, 0.0), valid, bad


@triton.jit
def _dedupe_sorted(cid, w, valid, C, TS: tl.constexpr):
    """Deduplicate TS tap entries by sorting on the class id.

    Key = class * TS + entry (unique; invalid entries sort last); one bitonic sort, the weights follow
    by a register gather, then one segmented scan leaves at the last entry of every class run its pooled
    logit z (the sum of Wy * Wx * value); that entry stands for the class. O(TS log^2 TS) work instead of
    the O(TS^2) equality matrix. Returns (class, z, last), in sorted order."""
    e = tl.arange(0, TS)
    key = tl.sort(tl.where(valid, cid * TS + e, C * TS + e))
    cs = key // TS
    ws = tl.gather(w, key % TS, 0)
    _, z = tl.associative_scan((cs, ws), 0, _seg_sum)
    nxt = tl.gather(cs, tl.minimum(e + 1, TS - 1), 0)
    return cs, z, (cs < C) & ((cs != nxt) | (e == TS - 1))


@triton.jit
def _sample_geometry(box_ptr, flip_ptr, b, S, L, p, q, K, ORIGINAL: tl.constexpr):
    """Box of sample b -> per-axis RoIAlign geometry for output cell (p, q), the touched pixel rectangle
    (first row / column, ncols, n_ent = rows x ncols x K tap entries), flip flag, bad-box flag,
    1 / (grid_y * grid_x) (the sample average)."""
    t = tl.load(box_ptr + b * 4 + 0).to(tl.float32)
    l = tl.load(box_ptr + b * 4 + 1).to(tl.float32)
    h = tl.load(box_ptr + b * 4 + 2).to(tl.float32)
    w = tl.load(box_ptr + b * 4 + 3).to(tl.float32)
    flip = (tl.load(flip_ptr + b) != 0).to(tl.int32)
    ok = (h > 0.0) & (w > 0.0) & (tl.abs(t) < float("inf")) & (tl.abs(l) < float("inf")) \
        & (h < float("inf")) & (w < float("inf"))
    t = tl.where(ok, t, 0.0)
    l = tl.where(ok, l, 0.0)
    h = tl.where(ok, h, 1.0)
    w = tl.where(ok, w, 1.0)
    l = tl.where(flip != 0, 1.0 - l - w, l)  # the reference's box in the flipped frame
    if ORIGINAL:  # §2.4: map rows follow the crop's left/width, map columns its top/height
        rs, rn, cs, cn = l, w, t, h
    else:
        rs, rn, cs, cn = t, h, l, w
    yb, ys, yg, y_inv, r_lo, r_hi = _axis_geometry(rs, rn, S, L, p)
    xb, xs, xg, x_inv, c_lo, c_hi = _axis_geometry(cs, cn, S, L, q)
    ncols = c_hi - c_lo + 1
    n_ent = (r_hi - r_lo + 1) * ncols * K
    return yb, ys, yg, r_lo, xb, xs, xg, c_lo, ncols, n_ent, flip, ok, y_inv * x_inv


# --------------------------------------------------------------------------------------------
# pieces of a token row shared by the fast and the general kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _row_load(x_row, C, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr):
    """The whole logits row as fp32 (-inf past C) when it fits one block (SINGLE), else a placeholder."""
    cols = tl.arange(0, BLOCK_C)
    if SINGLE:
        x = tl.load(x_row + cols, mask=cols < C, other=float("-inf")).to(tl.float32)
    else:
        x = tl.zeros([BLOCK_C], dtype=tl.float32)  # the stats loop reads the row block by block
    return x


@triton.jit
def _row_stats(x, x_row, C, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr, FAST: tl.constexpr):
    """A logits row -> (e^{x - max} in registers if SINGLE, max, sum of e^{x - max}, sum(x)).

    No per-element finiteness test: any NaN or +-Inf in the row makes sum(x) non-finite (NaN, or an
    Inf that the loss formula turns into NaN through the row's finiteness check below)."""
    cols = tl.arange(0, BLOCK_C)
    if SINGLE:
        mx = tl.max(x, axis=0)
        ex = _exp2(x * _LOG2E - mx * _LOG2E, FAST)  # one FMA + ex2 per column; 0 at the masked columns
        se = tl.sum(ex, axis=0)
        sum_x = tl.sum(tl.where(cols < C, x, 0.0), axis=0)
    else:
        ex = x  # not kept: the gradient pass reads the row again
        mx = float("-inf")
        se = 0.0
        sum_x = 0.0
        c0 = 0
        while c0 < C:
            mask = c0 + cols < C
            xb_ = tl.load(x_row + c0 + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(mx, tl.max(xb_, axis=0))
            se = se * _exp2((mx - m_new) * _LOG2E, FAST) + tl.sum(_exp2((xb_ - m_new) * _LOG2E, FAST), axis=0)
            mx = m_new
            sum_x += tl.sum(tl.where(mask, xb_, 0.0), axis=0)
            c0 += BLOCK_C
    return ex, mx, se, sum_x


@triton.jit
def _row_lse(x_row, C, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr, FAST: tl.constexpr):
    """One read of a logits row -> (e^{x - max} if SINGLE, max, sum of e^{x - max}, sum(x))."""
    return _row_stats(_row_load(x_row, C, BLOCK_C, SINGLE), x_row, C, BLOCK_C, SINGLE, FAST)


@triton.jit
def _write_dense_grad(ex, x_row, g_row, mx, a, b, C, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr,
                      FAST: tl.constexpr):
    """g = a * e^{x - max} - b over the whole row, with a = (1 + s/C) * scale / sum e^{x - max} and
    b = t_rest * scale: ((1 + s/C) * softmax(x) - t_rest) * scale, t_rest = the off-U target."""
    cols = tl.arange(0, BLOCK_C)
    if SINGLE:
        tl.store(g_row + cols, (ex * a - b).to(g_row.dtype.element_ty), mask=cols < C)
    else:
        c0 = 0
        while c0 < C:
            mask = c0 + cols < C
            xb_ = tl.load(x_row + c0 + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(g_row + c0 + cols, (_exp2((xb_ - mx) * _LOG2E, FAST) * a - b).to(g_row.dtype.element_ty),
                     mask=mask)
            c0 += BLOCK_C


@triton.jit
def _row_cell(row, b_offset, N, L):
    """Token row -> (sample b, output cell p, q)."""
    n = row % N
    return b_offset + row // N, n // L, n % L


@triton.jit
def _token_row_sorted(x, x_row, g_row, loss_out, n_ent, ncols, r_lo, c_lo, yb, ys, yg, xb, xs, xg, inv_g, val_b,
                      idx_b, flip, ok, C, smoothing, scale, S, K, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr,
                      TS: tl.constexpr, FAST: tl.constexpr):
    """Loss and gradient of one token row whose cell has at most TS tap entries (x: from _row_load)."""
    s_over_c = tl.fdiv(smoothing, C.to(tl.float32))
    on = 1.0 - smoothing + s_over_c
    off = s_over_c
    t_sum = 1.0 + s_over_c
    # the tap entries (class ids, weights); a bad class id poisons its weight, so Z and the loss become NaN
    cid, w, valid, bad = _entries(tl.arange(0, TS), n_ent, ncols, K, r_lo, c_lo, yb, ys, yg, xb, xs, xg, inv_g, val_b,
                                  idx_b, S, C, flip)
    w = tl.where(bad, float("nan"), w)
    # dedupe first (while the row is still in flight; e^{x - max} is not live yet, fewer registers)
    cs, z, last = _dedupe_sorted(cid, w, valid, C, TS)
    # log-sum-exp, sum(x) of the row (e^{x - max} stays in registers for the gradient)
    ex, mx, se, sum_x = _row_stats(x, x_row, C, BLOCK_C, SINGLE, FAST)
    lse = mx + _log(se, FAST)
    # the sparse target: Z, sum_U e^{z} x, sum_U x, |U| (relative to m = max(0, max_U z))
    xu = tl.load(x_row + cs, mask=last, other=0.0).to(tl.float32)  # L1 hits: the row was just read
    m = tl.max(tl.where(last, z, 0.0), axis=0)  # >= 0: the masked entries count as 0
    ez = tl.where(last, _exp2((z - m) * _LOG2E, FAST), 0.0)
    e_off = _exp2(-m * _LOG2E, FAST)  # e^{0 - m}: every class outside U
    r_z = tl.fdiv(1.0, tl.sum(ez, axis=0) + (C - tl.sum(last.to(tl.int32), axis=0)).to(tl.float32) * e_off)
    sum_xu = tl.sum(tl.where(last, xu, 0.0), axis=0)
    loss = t_sum * lse - on * (tl.sum(ez * xu, axis=0) + e_off * (sum_x - sum_xu)) * r_z - off * sum_x
    loss = tl.where(ok & (tl.abs(sum_x) < float("inf")), loss, float("nan"))
    tl.store(loss_out, loss * scale)
    # dense gradient: every class gets the off-U target first
    _write_dense_grad(ex, x_row, g_row, mx, tl.fdiv(t_sum * scale, se), (on * e_off * r_z + off) * scale, C, BLOCK_C,
                      SINGLE, FAST)
    tl.debug_barrier()
    # corrections at the classes of U (one write per class: the last entry of its run)
    g_u = (t_sum * _exp2((xu - lse) * _LOG2E, FAST) - (on * ez * r_z + off)) * scale
    tl.store(g_row + cs, g_u.to(g_row.dtype.element_ty), mask=last)


# --------------------------------------------------------------------------------------------
# kernel 1: token rows (loss + gradient), fast path, and cls pooling
# --------------------------------------------------------------------------------------------
@triton.jit
def _token_rows_kernel(
    x_ptr,  # aux logits [B*N, C], contiguous rows
    grad_ptr,  # gradient of the aux logits [B*N, C] (written here)
    row_loss_ptr,  # [B*N] fp32: scaled loss of each token row
    zc_ptr,  # [B, C] fp32, zero on entry: pooled cls logits (atomically accumulated)
    val_ptr,  # [B, K, S, S] teacher logits
    idx_ptr,  # [B, K, S, S] class ids
    box_ptr,  # [B, 4] fp32 (top, left, height, width), normalised, before the flip
    flip_ptr,  # [B] uint8
    list_ptr,  # int32 [rows]: token rows left to the general kernel (cells with more than TS entries)
    count_ptr,  # int32 scalar, zero on entry: how many rows are in the list
    n_cls,  # the first n_cls * CLS_CHUNKS programs pool the cls targets of samples 0..n_cls-1 (0: none)
    b_offset,  # token rows of this launch belong to samples b_offset + row // N (chunked launches)
    C,  # classes
    smoothing,  # label smoothing s
    scale,  # dense_weight / (B * N)
    N: tl.constexpr, L: tl.constexpr, S: tl.constexpr, K: tl.constexpr,  # tokens (L * L), grid side, map side, top-k
    VEC: tl.constexpr,  # a power of two dividing C (up to 16 bytes of logits): rows start 16-byte aligned
    ORIGINAL: tl.constexpr,  # box_order == "original"
    BLOCK_C: tl.constexpr,  # columns per block of a logits row
    SINGLE: tl.constexpr,  # the whole row fits one block (kept in registers between passes)
    TS1: tl.constexpr,  # the small sorted block (a 2 x 2-pixel cell: 4k entries)
    TS: tl.constexpr,  # tap entries of a cell handled here (the large sorted block)
    FAST: tl.constexpr,  # compiled (not the interpreter): ex2/lg2 .approx.ftz by inline PTX
    CLS_CHUNKS: tl.constexpr,  # cdiv(S*S*K, TBC): cls-pooling programs per sample
    TBC: tl.constexpr,  # tap entries per cls-pooling program
):
    pid = tl.program_id(0)
    n_pool = n_cls * CLS_CHUNKS
    if pid < n_pool:
        # ---- cls pooling (1 x 1 RoIAlign) into zc[b, :]: CLS_CHUNKS programs per sample, each one block
        # of TBC tap entries (a whole-crop pool touches up to S*S*k entries; spread, they do not form a
        # serial tail behind the token rows). Duplicates accumulate through the atomic adds.
        b = pid // CLS_CHUNKS
        a0 = (pid % CLS_CHUNKS) * TBC
        yb, ys, yg, r_lo, xb, xs, xg, c_lo, ncols, n_ent, flip, ok, inv_g = _sample_geometry(
            box_ptr, flip_ptr, b, S, 1, 0, 0, K, ORIGINAL)
        if a0 < n_ent:
            val_b = val_ptr + b.to(tl.int64) * K * S * S
            idx_b = idx_ptr + b.to(tl.int64) * K * S * S
            zrow = zc_ptr + b.to(tl.int64) * C
            e = a0 + tl.arange(0, TBC)
            cid, w, valid, bad = _entries(e, n_ent, ncols, K, r_lo, c_lo, yb, ys, yg, xb, xs, xg, inv_g, val_b, idx_b,
                                          S, C, flip)
            tl.atomic_add(zrow + cid, w, mask=valid)
            nbad = tl.sum(bad.to(tl.int32), axis=0) + tl.where(a0 == 0, 1 - ok.to(tl.int32), 0)
            if nbad > 0:  # invalid class ids or box: poison the cls target so the loss is NaN
                tl.atomic_add(zrow, float("nan"))
    else:
        # ---- one token row: sample b, output cell (p, q)
        row = pid - n_pool
        b, p, q = _row_cell(row, b_offset, N, L)
        row64 = row.to(tl.int64)
        Ca = (C // VEC) * VEC  # == C; written so the compiler sees the alignment (vector loads and stores)
        x_row = x_ptr + row64 * Ca
        g_row = grad_ptr + row64 * Ca
        # 1. the row is requested first; its latency overlaps the geometry and the tap loads
        x = _row_load(x_row, Ca, BLOCK_C, SINGLE)
        yb, ys, yg, r_lo, xb, xs, xg, c_lo, ncols, n_ent, flip, ok, inv_g = _sample_geometry(
            box_ptr, flip_ptr, b, S, L, p, q, K, ORIGINAL)
        val_b = val_ptr + b.to(tl.int64) * K * S * S
        idx_b = idx_ptr + b.to(tl.int64) * K * S * S
        # 2. all taps of the cell in one sorted block: the small one for the common 2 x 2-pixel cell, the
        #    large one for cells of 3 pixels along an axis; a larger cell (a box beyond the image) goes
        #    to the general kernel through the list
        if n_ent <= TS1:
            _token_row_sorted(x, x_row, g_row, row_loss_ptr + row64, n_ent, ncols, r_lo, c_lo, yb, ys, yg, xb, xs,
                              xg, inv_g, val_b, idx_b, flip, ok, Ca, smoothing, scale, S, K, BLOCK_C, SINGLE, TS1, FAST)
        elif n_ent <= TS:
            _token_row_sorted(x, x_row, g_row, row_loss_ptr + row64, n_ent, ncols, r_lo, c_lo, yb, ys, yg, xb, xs,
                              xg, inv_g, val_b, idx_b, flip, ok, Ca, smoothing, scale, S, K, BLOCK_C, SINGLE, TS, FAST)
        else:
            tl.store(list_ptr + tl.atomic_add(count_ptr, 1), row)


# --------------------------------------------------------------------------------------------
# kernel 1b: the token rows the fast path handed over (cells with more than TS tap entries)
# --------------------------------------------------------------------------------------------
@triton.jit
def _general_rows(i, step, x_ptr, grad_ptr, row_loss_ptr, loss_ptr, val_ptr, idx_ptr, box_ptr, flip_ptr, list_ptr,
                  count_ptr, b_offset, N, L, C, S, K, smoothing, scale, ORIGINAL: tl.constexpr, BLOCK_C: tl.constexpr,
                  SINGLE: tl.constexpr, TB: tl.constexpr, FAST: tl.constexpr, TO_LOSS: tl.constexpr):
    """The token rows handed over by kernel 1 (cells with more than TS tap entries), entries i, i + step, ...
    of the list. Their losses go to row_loss, or (TO_LOSS: when this runs beside the cls rows, which sum
    row_loss) straight into the scalar loss by atomic adds."""
    count = tl.load(count_ptr)
    s_over_c = smoothing / C
    on = 1.0 - smoothing + s_over_c
    off = s_over_c
    t_sum = 1.0 + s_over_c
    while i < count:
        row = tl.load(list_ptr + i)
        b, p, q = _row_cell(row, b_offset, N, L)
        row64 = row.to(tl.int64)
        x_row = x_ptr + row64 * C
        g_row = grad_ptr + row64 * C
        yb, ys, yg, r_lo, xb, xs, xg, c_lo, ncols, n_ent, flip, ok, inv_g = _sample_geometry(
            box_ptr, flip_ptr, b, S, L, p, q, K, ORIGINAL)
        val_b = val_ptr + b.to(tl.int64) * K * S * S
        idx_b = idx_ptr + b.to(tl.int64) * K * S * S
        ex, mx, se, sum_x = _row_lse(x_row, C, BLOCK_C, SINGLE, FAST)
        lse = mx + tl.log(se)
        m = 0.0
        sum_ez = 0.0
        sum_ezx = 0.0
        sum_xu = 0.0
        n_u = 0
        n_bad = 1 - ok.to(tl.int32)
        a0 = 0
        while a0 < n_ent:
            cid, z, valid, first, bad = _entries_dedup(a0, n_ent, ncols, K, r_lo, c_lo, yb, ys, yg, xb, xs, xg, inv_g,
                                                       val_b, idx_b, S, C, flip, TB)
            xu = tl.load(x_row + cid, mask=first, other=0.0).to(tl.float32)
            m, sum_ez, sum_ezx, sum_xu, n_u, n_bad = _u_stats(z, xu, first, bad, m, sum_ez, sum_ezx, sum_xu, n_u,
                                                              n_bad)
            a0 += TB
        e_off = tl.exp(-m)
        Z = sum_ez + (C - n_u).to(tl.float32) * e_off
        loss = t_sum * lse - on * (sum_ezx + e_off * (sum_x - sum_xu)) / Z - off * sum_x
        loss = tl.where((n_bad == 0) & (tl.abs(sum_x) < float("inf")), loss, float("nan"))
        if TO_LOSS:
            tl.atomic_add(loss_ptr, loss * scale)
        else:
            tl.store(row_loss_ptr + row64, loss * scale)
        _write_dense_grad(ex, x_row, g_row, mx, t_sum * scale / se, (on * e_off / Z + off) * scale, C, BLOCK_C,
                          SINGLE, FAST)
        tl.debug_barrier()
        a0 = 0
        while a0 < n_ent:
            cid, z, valid, first, bad = _entries_dedup(a0, n_ent, ncols, K, r_lo, c_lo, yb, ys, yg, xb, xs, xg, inv_g,
                                                       val_b, idx_b, S, C, flip, TB)
            xu = tl.load(x_row + cid, mask=first, other=0.0).to(tl.float32)
            g_u = (t_sum * tl.exp(xu - lse) - (on * tl.exp(z - m) / Z + off)) * scale
            tl.store(g_row + cid, g_u.to(grad_ptr.dtype.element_ty), mask=first)
            a0 += TB
        tl.debug_barrier()
        i += step




@triton.jit
def _token_rows_general_kernel(
    x_ptr, grad_ptr, row_loss_ptr, val_ptr, idx_ptr, box_ptr, flip_ptr,  # as kernel 1
    list_ptr,  # int32: rows handed over by kernel 1
    count_ptr,  # int32 scalar: their number (read on the device; 0 in the usual case)
    b_offset, N, L, C, S, K, smoothing, scale,
    ORIGINAL: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr,
    TB: tl.constexpr,  # tap entries per dedupe block (blocks of entries, pairwise equality per block pair)
    FAST: tl.constexpr,  # as kernel 1
):
    _general_rows(tl.program_id(0), tl.num_programs(0), x_ptr, grad_ptr, row_loss_ptr, row_loss_ptr, val_ptr, idx_ptr,
                  box_ptr, flip_ptr, list_ptr, count_ptr, b_offset, N, L, C, S, K, smoothing, scale, ORIGINAL, BLOCK_C,
                  SINGLE, TB, FAST, False)


# --------------------------------------------------------------------------------------------
# kernel 2: cls rows (target from the pooled logits, GT blend, MixToken) + loss reduction
# --------------------------------------------------------------------------------------------
@triton.jit
def _cls_rows_kernel(
    x_ptr,  # cls logits [B, C]
    grad_ptr,  # gradient of the cls logits [B, C]
    zc_ptr,  # [B, C] fp32 pooled cls logits from kernel 1
    row_loss_ptr,  # [B*N] scaled token-row losses from kernel 1
    loss_ptr,  # fp32 scalar, zero on entry
    gt_ptr,  # [B] ground-truth classes (read only when GT)
    mix_ptr,  # [4] MixToken box (r0, c0, r1, c1) (read only when MIX_FROM_PTR)
    B, N, C,
    smoothing,
    lam_arg,  # lambda' = 1 - box area / N, when given on the host
    scale,  # cls_weight / B
    # programs B.. handle the token rows kernel 1 handed over (general path), as kernel 1b with TO_LOSS:
    aux_ptr, aux_grad_ptr, val_ptr, idx_ptr, box_ptr, flip_ptr, list_ptr, count_ptr, L, S, K, tok_scale,
    GT: tl.constexpr,
    MIX_FROM_PTR: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GENERAL: tl.constexpr,  # the general-row programs are launched (else the token arguments are unused)
    ORIGINAL: tl.constexpr, BLOCK_T: tl.constexpr, SINGLE_T: tl.constexpr, TB: tl.constexpr, FAST: tl.constexpr,
):
    pid = tl.program_id(0)
    if GENERAL:
        if pid >= B:  # one launch less: the general rows run beside the cls rows (losses by atomic adds)
            _general_rows(pid - B, tl.num_programs(0) - B, aux_ptr, aux_grad_ptr, row_loss_ptr, loss_ptr, val_ptr,
                          idx_ptr, box_ptr, flip_ptr, list_ptr, count_ptr, 0, N, L, C, S, K, smoothing, tok_scale,
                          ORIGINAL, BLOCK_T, SINGLE_T, TB, FAST, True)
        else:
            _cls_row(pid, x_ptr, grad_ptr, zc_ptr, row_loss_ptr, loss_ptr, gt_ptr, mix_ptr, B, N, C, smoothing,
                     lam_arg, scale, GT, MIX_FROM_PTR, BLOCK_C, BLOCK_N)
    else:
        _cls_row(pid, x_ptr, grad_ptr, zc_ptr, row_loss_ptr, loss_ptr, gt_ptr, mix_ptr, B, N, C, smoothing, lam_arg,
                 scale, GT, MIX_FROM_PTR, BLOCK_C, BLOCK_N)


@triton.jit
def _cls_row(b, x_ptr, grad_ptr, zc_ptr, row_loss_ptr, loss_ptr, gt_ptr, mix_ptr, B, N, C, smoothing, lam_arg, scale,
             GT: tl.constexpr, MIX_FROM_PTR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """cls row b: its target from the pooled logits, the loss and gradient, and the sample's token losses."""
    bp = B - 1 - b  # MixToken partner: the batch reversed
    cols = tl.arange(0, BLOCK_C)
    s_over_c = smoothing / C
    on = 1.0 - smoothing + s_over_c
    off = s_over_c
    if MIX_FROM_PTR:
        r0 = tl.load(mix_ptr + 0).to(tl.float32)
        c0_ = tl.load(mix_ptr + 1).to(tl.float32)
        r1 = tl.load(mix_ptr + 2).to(tl.float32)
        c1_ = tl.load(mix_ptr + 3).to(tl.float32)
        lam = 1.0 - (r1 - r0) * (c1_ - c0_) / N
    else:
        lam = lam_arg
    b64 = b.to(tl.int64)
    bp64 = bp.to(tl.int64)
    z_b = zc_ptr + b64 * C
    z_p = zc_ptr + bp64 * C
    x_row = x_ptr + b64 * C
    g_row = grad_ptr + b64 * C

    # A. maxima (+ first argmax, torch's tie-breaking) of both pooled rows; online lse of x
    mz_b = float("-inf")
    mz_p = float("-inf")
    az_b = 0
    az_p = 0
    mx = float("-inf")
    se = 0.0
    c0 = 0
    while c0 < C:
        mask = c0 + cols < C
        zb = tl.load(z_b + c0 + cols, mask=mask, other=float("-inf"))
        zp = tl.load(z_p + c0 + cols, mask=mask, other=float("-inf"))
        vb = tl.max(zb, axis=0)
        vp = tl.max(zp, axis=0)
        ib = tl.argmax(zb, axis=0, tie_break_left=True) + c0
        ip = tl.argmax(zp, axis=0, tie_break_left=True) + c0
        az_b = tl.where(vb > mz_b, ib, az_b)
        az_p = tl.where(vp > mz_p, ip, az_p)
        mz_b = tl.maximum(mz_b, vb)
        mz_p = tl.maximum(mz_p, vp)
        xb_ = tl.load(x_row + c0 + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(mx, tl.max(xb_, axis=0))
        se = se * tl.exp(mx - m_new) + tl.sum(tl.where(mask, tl.exp(xb_ - m_new), 0.0), axis=0)
        mx = m_new
        c0 += BLOCK_C
    lse = mx + tl.log(se)
    # B. softmax denominators of the pooled rows (NaN-poisoned rows stay NaN)
    sz_b = 0.0
    sz_p = 0.0
    nonfinite = 0
    c0 = 0
    while c0 < C:
        mask = c0 + cols < C
        zb = tl.load(z_b + c0 + cols, mask=mask, other=0.0)
        zp = tl.load(z_p + c0 + cols, mask=mask, other=0.0)
        sz_b += tl.sum(tl.where(mask, tl.exp(zb - mz_b), 0.0), axis=0)
        sz_p += tl.sum(tl.where(mask, tl.exp(zp - mz_p), 0.0), axis=0)
        xb_ = tl.load(x_row + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        nonfinite += tl.sum((mask & ~(tl.abs(xb_) < float("inf"))).to(tl.int32), axis=0)
        c0 += BLOCK_C
    # ground-truth blend ratios (§2.6: 0.5 when the GT's argmax agrees with the target's, else 0.9)
    if GT:
        g_b = tl.load(gt_ptr + b).to(tl.int32)
        g_p = tl.load(gt_ptr + bp).to(tl.int32)
        ga_b = tl.where(on > off, g_b, 0)  # argmax of the smoothed one-hot column
        ga_p = tl.where(on > off, g_p, 0)
        gt_bad = (g_b < 0) | (g_b >= C) | (g_p < 0) | (g_p >= C)
        nonfinite += gt_bad.to(tl.int32)  # a class id outside [0, C) gives a NaN loss, never a silent one
        r_b = tl.where(ga_b == az_b, 0.5, 0.9)
        r_p = tl.where(ga_p == az_p, 0.5, 0.9)
    else:
        g_b = -1
        g_p = -1
        r_b = 1.0
        r_p = 1.0
    # sum of the final target: blended columns sum to r(1 + s/C) + (1 - r); mixing is convex
    t_sum = lam * (r_b * (1.0 + s_over_c) + 1.0 - r_b) + (1.0 - lam) * (r_p * (1.0 + s_over_c) + 1.0 - r_p)
    # C. target, loss and gradient
    sum_tx = 0.0
    c0 = 0
    while c0 < C:
        idx = c0 + cols
        mask = idx < C
        zb = tl.load(z_b + idx, mask=mask, other=0.0)
        zp = tl.load(z_p + idx, mask=mask, other=0.0)
        tb = r_b * (on * tl.exp(zb - mz_b) / sz_b + off) + (1.0 - r_b) * tl.where(idx == g_b, on, off)
        tp = r_p * (on * tl.exp(zp - mz_p) / sz_p + off) + (1.0 - r_p) * tl.where(idx == g_p, on, off)
        t = lam * tb + (1.0 - lam) * tp
        xb_ = tl.load(x_row + idx, mask=mask, other=0.0).to(tl.float32)
        sum_tx += tl.sum(tl.where(mask, t * xb_, 0.0), axis=0)
        g = (t_sum * tl.exp(xb_ - lse) - t) * scale
        tl.store(g_row + idx, g.to(grad_ptr.dtype.element_ty), mask=mask)
        c0 += BLOCK_C
    loss = (t_sum * lse - sum_tx) * scale
    loss = tl.where(nonfinite > 0, float("nan"), loss)
    # D. this sample's token-row losses join the scalar
    offs = tl.arange(0, BLOCK_N)
    tok = 0.0
    n0 = 0
    while n0 < N:
        tok += tl.sum(tl.load(row_loss_ptr + b64 * N + n0 + offs, mask=n0 + offs < N, other=0.0), axis=0)
        n0 += BLOCK_N
    tl.atomic_add(loss_ptr, loss + tok)


@triton.jit
def _scale2_kernel(a_ptr, na, b_ptr, nb, go_ptr, BLOCK: tl.constexpr):
    """a *= grad_output and b *= grad_output (b may be empty): a small persistent grid walks the blocks
    of both. grad_output is read on the device and nothing is read or written when it is 1 (the usual
    loss.backward()), so that case costs one tiny launch."""
    go = tl.load(go_ptr).to(tl.float32)
    if go != 1.0:
        na_blk = tl.cdiv(na, BLOCK)
        n_blk = na_blk + tl.cdiv(nb, BLOCK)
        blk = tl.program_id(0)
        while blk < n_blk:
            if blk < na_blk:
                offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
                mask = offs < na
                g = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(a_ptr + offs, (g * go).to(a_ptr.dtype.element_ty), mask=mask)
            else:
                offs = (blk - na_blk).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
                mask = offs < nb
                g = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(b_ptr + offs, (g * go).to(b_ptr.dtype.element_ty), mask=mask)
            blk += tl.num_programs(0)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------
_MAX_SINGLE_BLOCK = 8192
# Tap entries per dedupe block. A token cell of a typical crop (bin <= 1 map pixel, grid 1) touches
# 2 x 2 map pixels = 4k entries; larger cells loop over more blocks. None = next_pow2(4k), >= 16.
_TB = None
_TS = None  # None = _sorted_block(K, S, L)
_TS1 = None  # None = _small_sorted_block(K)
_NUM_WARPS = None  # None = 1 for rows up to 1024 columns, else 8 (kernels/_tune.py sweeps it)
# Register cap of the one-warp token-row kernel: 64 registers let 32 one-warp programs share an SM (the
# resident-block limit) without spills (72 uncapped: 28). 0 = no cap (the sweep compares both).
_MAXNREG = 64


def _reg_cap(num_warps):
    return {"maxnreg": _MAXNREG} if (_MAXNREG and num_warps == 1) else {}


def _tap_block(K, S, L):
    """Entries per dedupe block: 4k covers a cell whose bins are at most ~2 map pixels (L >= S/2);
    coarser grids touch up to (ceil(S/L) + 1)^2 pixels per cell, so the block grows (to 64 at most) to
    keep the number of [TB, TB] block pairs of the O(T^2) dedupe small."""
    if _TB:
        return _TB
    tb = max(16, triton.next_power_of_2(4 * K))
    if 2 * L < S:
        cells = min(S, -(-S // L) + 1)
        tb = max(tb, min(64, triton.next_power_of_2(cells * cells * K)))
    return tb


def _sorted_block(K, S, L):
    """Entries of the sorted one-block path: all taps of a cell whose crop lies inside the image
    (box sides <= 1: at most ceil(S / L) + 1 map pixels per axis), 45 at S 18, L 14, k 5 -> 64."""
    if _TS:
        return _TS
    taps = min(S, -(-S // L) + 1)
    return min(128, max(16, triton.next_power_of_2(taps * taps * K)))


def _row_vec(C, elem_bytes):
    """Largest power of two dividing C, up to 16 bytes of logits: the rows of a contiguous [rows, C] tensor
    then start 16-byte aligned whenever the tensor does, and the kernel may use vector loads and stores."""
    vec = max(1, 16 // elem_bytes)
    while C % vec:
        vec //= 2
    return vec


def _small_sorted_block(K):
    """Entries of the small sorted block: a 2 x 2-pixel cell (bins of at most one map pixel), 4k."""
    return _TS1 or max(16, triton.next_power_of_2(4 * K))


def _row_block(C):
    block = triton.next_power_of_2(C)
    if block <= _MAX_SINGLE_BLOCK:
        return block, True
    return 4096, False


class _Workspace:
    """Kernel inputs in kernel layout plus the small fp32 buffers: zc [B, C], row losses [B*N], loss.

    One allocation and one fill launch for all three (zc and the loss must start at zero: atomics add
    into them); the inputs are passed as they are whenever the kernels can read them directly (any
    float box dtype, any integer flip dtype are converted on load), so no cast or copy kernels run.
    """

    def __init__(self, label_values, label_indices, boxes, flips, B, N, C):
        dev = label_values.device
        # one zero fill: loss, zc, row losses (fp32 views) and one list counter per sample (int32 view; a
        # chunked launch uses the counter of its first sample), then the list of handed-over rows
        buf = torch.zeros(1 + B * C + B * N + B + B * N, device=dev, dtype=torch.int32)
        fbuf = buf.view(torch.float32)
        self.loss = fbuf[0]
        self.zc = fbuf[1:1 + B * C].view(B, C)
        self.row_loss = fbuf[1 + B * C:1 + B * C + B * N]
        self.counts = buf[1 + B * C + B * N:1 + B * C + B * N + B]
        self.rows = buf[1 + B * C + B * N + B:]
        self.values = label_values if label_values.is_contiguous() else label_values.contiguous()
        self.indices = label_indices if label_indices.is_contiguous() else label_indices.contiguous()
        self.boxes = boxes if boxes.is_contiguous() else boxes.contiguous()
        # bool -> uint8 as a view (no copy kernel); integer flips are read as they are (!= 0 on load)
        self.flips = flips.view(torch.uint8) if flips.dtype == torch.bool else flips
        if not self.flips.is_contiguous():
            self.flips = self.flips.contiguous()
        K, S = label_values.shape[1], label_values.shape[-1]
        self.block_c, self.single = _row_block(C)
        self.num_warps = _NUM_WARPS or (1 if self.block_c <= 1024 else 8)
        self.tb = _tap_block(K, S, math.isqrt(N))
        self.ts = _sorted_block(K, S, math.isqrt(N))
        self.ts1 = _small_sorted_block(K)
        self.tbc = 128
        self.cls_chunks = triton.cdiv(S * S * K, self.tbc)


_workspace = _Workspace


_SM_COUNT = {}


def _general_programs(device):
    """Programs of the general kernel: 2 per SM on CUDA (it loops over the list), 4 elsewhere."""
    if device.type != "cuda":
        return 4
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return 2 * _SM_COUNT[device.index]


def launch_token_rows(x, grad, row_loss, w, n_cls, b_offset, rows, N, C, smoothing, scale, original, general=True):
    """Kernel 1 over ``rows`` token rows of ``x`` (samples from b_offset on), plus the cls pooling of
    samples 0..n_cls-1 (n_cls 0: none) into w.zc. ``general``: also launch kernel 1b for the rows handed
    over (False: the cls launch takes them, see _cls_launch)."""
    K, S = w.values.shape[1], w.values.shape[-1]
    L = math.isqrt(N)
    lst, count = w.rows[b_offset * N:], w.counts[b_offset:]
    _token_rows_kernel[(n_cls * w.cls_chunks + rows,)](
        x, grad, row_loss, w.zc, w.values, w.indices, w.boxes, w.flips, lst, count, n_cls, b_offset, C,
        float(smoothing), float(scale), N=N, L=L, S=S, K=K, VEC=_row_vec(C, x.element_size()),
        ORIGINAL=bool(original), BLOCK_C=w.block_c, SINGLE=w.single, TS1=min(w.ts1, w.ts), TS=w.ts, FAST=not _INTERPRET,
        CLS_CHUNKS=w.cls_chunks, TBC=w.tbc, num_warps=w.num_warps, **_reg_cap(w.num_warps))
    if not general:
        return
    # rows whose cell has more than TS tap entries (boxes beyond the image; usually none): a small
    # persistent grid reads their count on the device, so the host never waits
    _token_rows_general_kernel[(min(rows, _general_programs(x.device)),)](
        x, grad, row_loss, w.values, w.indices, w.boxes, w.flips, lst, count, b_offset, N, L, C, S, K,
        float(smoothing), float(scale), ORIGINAL=bool(original), BLOCK_C=w.block_c, SINGLE=w.single, TB=w.tb,
        FAST=not _INTERPRET, num_warps=4 if w.block_c <= 1024 else 8)


def token_label_ce_forward(cls_logits, aux_logits, label_values, label_indices, boxes, flips, mix_tensor,
                           gt_classes, lam, smoothing, dense_weight, cls_weight, ground_truth, original,
                           grad_cls=None, grad_aux=None):
    """Launch both kernels. Returns (loss fp32 scalar, grad_cls, grad_aux); inputs already validated.

    ``grad_cls``/``grad_aux`` may be preallocated buffers (any rows-contiguous [.., C] tensor of the
    logits' dtype); a caller that no longer needs the logits may pass the logits themselves only if
    they are not read afterwards (the correction pass re-reads x at the classes of U, so in-place
    use is NOT allowed here).
    """
    B, N, C = aux_logits.shape
    x_aux = aux_logits.reshape(B * N, C)  # a view for contiguous logits (the usual case)
    if not x_aux.is_contiguous():
        x_aux = x_aux.contiguous()
    x_cls = cls_logits if cls_logits.is_contiguous() else cls_logits.contiguous()
    if grad_aux is None:
        grad_aux = torch.empty_like(x_aux)
    if grad_cls is None:
        grad_cls = torch.empty_like(x_cls)
    w = _workspace(label_values, label_indices, boxes, flips, B, N, C)
    tok_scale = dense_weight / (B * N)
    launch_token_rows(x_aux, grad_aux, w.row_loss, w, B, 0, B * N, N, C, smoothing, tok_scale, original, general=False)
    zc, row_loss, loss = w.zc, w.row_loss, w.loss
    _cls_launch(x_cls, grad_cls, zc, row_loss, loss, gt_classes, mix_tensor, B, N, C, smoothing, lam, cls_weight,
                ground_truth, general=(x_aux, grad_aux, w, tok_scale, original))
    return loss, grad_cls, grad_aux.view(B, N, C)


def _cls_launch(x_cls, grad_cls, zc, row_loss, loss, gt_classes, mix_tensor, B, N, C, smoothing, lam, cls_weight,
                ground_truth, general=None):
    """Kernel 2 over the B cls rows. ``general`` = (aux logits [B*N, C], their gradient, workspace, token
    scale, original): extra programs also handle the token rows kernel 1 handed over (one launch less)."""
    gt = gt_classes if (ground_truth and gt_classes is not None) else zc  # dummy pointer when unused
    mix = mix_tensor if mix_tensor is not None else zc
    BC2 = min(triton.next_power_of_2(C), 4096)
    if general is not None:
        x_aux, grad_aux, w, tok_scale, original = general
        K, S = w.values.shape[1], w.values.shape[-1]
        n_gen = _general_programs(x_cls.device)
        tok = (x_aux, grad_aux, w.values, w.indices, w.boxes, w.flips, w.rows, w.counts, math.isqrt(N), S, K,
               float(tok_scale))
        tok_kw = dict(GENERAL=True, ORIGINAL=bool(original), BLOCK_T=w.block_c, SINGLE_T=w.single, TB=w.tb)
    else:  # no extra programs; the token arguments are placeholders the kernel never reads
        n_gen = 0
        tok = (x_cls, grad_cls, zc, zc, zc, zc, zc, zc, 1, 1, 1, 0.0)
        tok_kw = dict(GENERAL=False, ORIGINAL=False, BLOCK_T=16, SINGLE_T=True, TB=16)
    _cls_rows_kernel[(B + n_gen,)](
        x_cls, grad_cls, zc, row_loss, loss, gt, mix, B, N, C, float(smoothing), float(lam),
        float(cls_weight) / B, *tok, GT=bool(ground_truth), MIX_FROM_PTR=mix_tensor is not None,
        BLOCK_C=BC2, BLOCK_N=min(triton.next_power_of_2(N), 1024), FAST=not _INTERPRET,
        num_warps=4 if max(BC2, tok_kw["BLOCK_T"]) <= 1024 else 8, **tok_kw,
    )


def _traced(grad):
    # traced (torch.compile builds the backward graph lazily, on fake/functional tensor subclasses, where
    # is_compiling() may be False): plain math the compiler fuses; also the path for non-Triton devices
    return torch.compiler.is_compiling() or type(grad) is not torch.Tensor or not (grad.is_cuda or _INTERPRET)


def _go_ptr(grad_output):
    # the loss is an fp32 scalar, so grad_output normally is one too: no reshape, no cast kernel
    return grad_output if grad_output.dtype == torch.float32 else grad_output.to(torch.float32)


def _scale_launch(grad_a, grad_b, grad_output):
    na, nb = grad_a.numel(), grad_b.numel()
    BLOCK = 4096
    blocks = triton.cdiv(na, BLOCK) + triton.cdiv(nb, BLOCK)
    _scale2_kernel[(max(1, min(blocks, 4 * _general_programs(grad_a.device))),)](
        grad_a, na, grad_b, nb, _go_ptr(grad_output), BLOCK=BLOCK, num_warps=8)


def scale_grad_(grad, grad_output):
    """grad *= grad_output in place without a host sync (skipped on the device when it is 1)."""
    if _traced(grad):
        return grad * grad_output.to(grad.dtype)
    _scale_launch(grad, grad[:0], grad_output)
    return grad


def scale_grads_(grad_a, grad_b, grad_output):
    """Both contiguous gradient buffers *= grad_output in place: one launch, no host sync."""
    if _traced(grad_a) or _traced(grad_b):
        return grad_a * grad_output.to(grad_a.dtype), grad_b * grad_output.to(grad_b.dtype)
    _scale_launch(grad_a, grad_b, grad_output)
    return grad_a, grad_b


# --------------------------------------------------------------------------------------------
# torch.library op (torch.compile sees a fake), autograd: backward is only a scale
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("tokenlabel::token_label_ce", mutates_args=())
def token_label_ce_op(cls_logits: torch.Tensor, aux_logits: torch.Tensor, label_values: torch.Tensor,
                      label_indices: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                      mix_tensor: Optional[torch.Tensor], gt_classes: Optional[torch.Tensor], lam: float,
                      smoothing: float, dense_weight: float, cls_weight: float, ground_truth: bool,
                      original: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return token_label_ce_forward(cls_logits, aux_logits, label_values, label_indices, boxes, flips, mix_tensor,
                                  gt_classes, lam, smoothing, dense_weight, cls_weight, ground_truth, original)


@token_label_ce_op.register_fake
def _(cls_logits, aux_logits, label_values, label_indices, boxes, flips, mix_tensor, gt_classes, lam, smoothing,
      dense_weight, cls_weight, ground_truth, original):
    return (aux_logits.new_empty((), dtype=torch.float32), torch.empty_like(cls_logits),
            torch.empty_like(aux_logits))


def _setup_context(ctx, inputs, output):
    _, grad_cls, grad_aux = output
    # The gradient outputs are not differentiable and never get an incoming gradient: without these two
    # calls autograd materialises zeros_like(grad_cls) and zeros_like(grad_aux) for backward (one
    # logits-sized allocation plus a memset per call: the 48 MiB "extra" measured at S/224 bf16).
    ctx.mark_non_differentiable(grad_cls, grad_aux)
    ctx.set_materialize_grads(False)
    # Kept as plain attributes, not save_for_backward: backward hands the buffers over and drops its own
    # reference, so AccumulateGrad can take them as .grad instead of cloning (a saved tensor would
    # keep a second reference and cost one more logits-sized copy).
    ctx.grads = [grad_cls, grad_aux]


def _take_grads(ctx):
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        raise RuntimeError("token_label_cross_entropy: backward can run only once per forward (its gradient "
                           "buffers are handed over to autograd); use retain_graph on a separate forward")
    return grads


def _backward(ctx, grad_loss, _g_cls=None, _g_aux=None):
    grad_cls, grad_aux = _take_grads(ctx)
    if grad_loss is None:  # materialize_grads is off
        return (None,) * 14
    grad_cls, grad_aux = scale_grads_(grad_cls, grad_aux, grad_loss)
    return (grad_cls, grad_aux, None, None, None, None, None, None, None, None, None, None, None, None)


token_label_ce_op.register_autograd(_backward, setup_context=_setup_context)


class TokenLabelCEFunction(torch.autograd.Function):
    """The eager path: the same forward/backward as the custom op without its dispatch layers.

    Only the loss is an output (the gradient buffers live on ctx), so autograd has nothing to
    materialise; torch.compile goes through ``token_label_ce_op`` instead (it needs the fake)."""

    @staticmethod
    def forward(ctx, cls_logits, aux_logits, label_values, label_indices, boxes, flips, mix_tensor, gt_classes,
                lam, smoothing, dense_weight, cls_weight, ground_truth, original):
        loss, grad_cls, grad_aux = token_label_ce_forward(
            cls_logits, aux_logits, label_values, label_indices, boxes, flips, mix_tensor, gt_classes, lam,
            smoothing, dense_weight, cls_weight, ground_truth, original)
        ctx.set_materialize_grads(False)
        ctx.grads = [grad_cls, grad_aux]
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        return _backward(ctx, grad_loss)
