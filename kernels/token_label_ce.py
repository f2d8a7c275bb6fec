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

One launch (after one zero fill of a small workspace) does the whole forward. One program (one warp
for C <= 1024) per logits row:
 1. request the row, then load the taps (rows x cols x k entries of the map rectangle the cell touches)
    with their weights Wy * Wx * value (the bilinear weights as tents, the common two samples per axis
    without a loop);
 2. dedupe the classes of the taps: one bitonic sort on (class, entry) and one segmented scan leave each
    class's total z at the last entry of its run (an entry counts towards U only there); a 2 x 2-pixel
    cell (4k entries) sorts a block of 32 at k 5, larger cells one of 64;
 3. read the row once: max, sum of e^{x - max} (kept in registers), sum(x);
 4. add the row's scaled loss into one of STRIPES partial sums (each in its own 128-byte line) and count
    it there, then write the dense gradient (1 + s/C) * softmax(x) - on/Z - off, scaled;
 5. after a barrier, overwrite the |U| corrected entries (1 + s/C) * softmax(x)_c - t_c.
A cell with more taps than the large sorted block (a box beyond the image; rare) is handled by the same
program with the general algorithm: blocks of TB entries deduped with pairwise equality masks, in two
passes over the blocks (U statistics, then the corrections).
The programs with the lowest ids pool the cls targets (1 x 1 RoIAlign, CLS_CHUNKS programs per sample,
one block of TBC tap entries each) into a [B, C] fp32 buffer (atomic adds: duplicates accumulate), then
take a ticket on their MixToken pair {b, B-1-b}; the last pooling program of a pair builds both cls
targets (softmax, smoothing, ground-truth blend, mixing with the batch-reversed partner) and writes
their loss and gradient, while the token rows run beside it.
The loss: every token row and every cls pair is one loss item, added into partial sum (item % STRIPES) and
counted there (release); the program whose item completes a stripe acquires it and counts the stripe as
closed, and the one that closes the last stripe sums the STRIPES partials (fixed order) and stores the loss.
No address takes more than n_items / STRIPES atomics, and the loss scalar is written once.

The gradient is written during the forward, so backward is only a scale by grad_output, which the
scale kernel reads on the device and skips when it is 1.0 (no host synchronisation anywhere).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, sm_count

_INTERPRET = INTERPRET
_LOG2E = tl.constexpr(1.4426950408889634)  # e^x = 2^(x log2 e)


# Loss accumulation (v7): every loss item (a token row, a cls pair) adds into one of STRIPES partial sums, each in
# its own 128-byte line of the workspace (word 0: the fp32 partial, word 1: the int32 count of items added).
_STRIPES = 128
_LINE = tl.constexpr(32)  # int32 words per 128-byte line


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
# pieces of a token row shared by the sorted and the general path
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
def _loss_add(value, item, part_ptr, cnt_ptr, n_items, STRIPES: tl.constexpr, KERNEL_SUM: tl.constexpr):
    """Add one loss item (the scaled loss of a token row or of a cls pair) into partial sum item % STRIPES (a
    relaxed reduction: nothing waits on it). KERNEL_SUM: then count the item on its stripe with a returning
    add that has release semantics (a fence, then the add: the partial's add is ordered before the count
    for every program that later acquires the count). Returns whether this item completed its stripe (the
    stripe's last count; n_items items over STRIPES stripes round-robin); False without KERNEL_SUM (the
    partial sums are then summed by torch after the launch)."""
    s = item % STRIPES
    tl.atomic_add(part_ptr + s * _LINE, value, sem="relaxed")
    if KERNEL_SUM:
        done = tl.atomic_add(cnt_ptr + s * _LINE + 1, 1, sem="release")
        need = n_items // STRIPES + (s < n_items % STRIPES).to(tl.int32)
        last = done == need - 1
    else:
        last = False
    return last


@triton.jit
def _loss_close(last, item, part_ptr, cnt_ptr, loss_ptr, n_items, STRIPES: tl.constexpr, KERNEL_SUM: tl.constexpr):
    """The program that completed a stripe (last, from _loss_add) acquires it (an acquire read of its count:
    every item's add to that partial is now visible) and counts it on the second-level counter (the line
    after the stripes; acq_rel). The program that closes the last non-empty stripe reads all STRIPES
    partials and stores their sum (a fixed reduction tree) into the loss scalar: the scalar is written once,
    by a store, never accumulated."""
    if KERNEL_SUM:
        if last:
            s = item % STRIPES
            tl.atomic_add(cnt_ptr + s * _LINE + 1, 0, sem="acquire")
            closed = tl.atomic_add(cnt_ptr + STRIPES * _LINE, 1, sem="acq_rel")
            if closed == tl.minimum(n_items, STRIPES) - 1:
                k = tl.arange(0, STRIPES)
                parts = tl.load(part_ptr + k * _LINE, cache_modifier=".cg")  # (L2: written by other SMs' atomics)
                tl.store(loss_ptr, tl.sum(parts, axis=0))


@triton.jit
def _token_row_sorted(x, x_row, g_row, item, part_ptr, cnt_ptr, loss_ptr, n_items, n_ent, ncols, r_lo, c_lo, yb, ys,
                      yg, xb, xs, xg, inv_g, val_b, idx_b, flip, ok, C, smoothing, scale, S, K, BLOCK_C: tl.constexpr,
                      SINGLE: tl.constexpr, TS: tl.constexpr, FAST: tl.constexpr, STRIPES: tl.constexpr,
                      KERNEL_SUM: tl.constexpr):
    """Loss (loss item `item`, see _loss_add) and gradient of one token row whose cell has at most TS tap
    entries (x: from _row_load)."""
    s_over_c = tl.fdiv(smoothing, C.to(tl.float32))
    on = 1.0 - smoothing + s_over_c
    off = s_over_c
    t_sum = 1.0 + s_over_c
    # the tap entries (class ids, weights); a bad class id poisons its weight, so Z and the loss become NaN
    cid, w, valid, bad = _entries(tl.arange(0, TS), n_ent, ncols, K, r_lo, c_lo, yb, ys, yg, xb, xs, xg, inv_g, val_b,
                                  idx_b, S, C, flip)
    w = tl.where(bad, float("nan"), w)
    # dedupe first (while the row is still in flight; e^{x - max} is not live yet, fewer registers)
    cs, z, last_u = _dedupe_sorted(cid, w, valid, C, TS)
    # log-sum-exp, sum(x) of the row (e^{x - max} stays in registers for the gradient)
    ex, mx, se, sum_x = _row_stats(x, x_row, C, BLOCK_C, SINGLE, FAST)
    lse = mx + _log(se, FAST)
    # the sparse target: Z, sum_U e^{z} x, sum_U x, |U| (relative to m = max(0, max_U z))
    xu = tl.load(x_row + cs, mask=last_u, other=0.0).to(tl.float32)  # L1 hits: the row was just read
    m = tl.max(tl.where(last_u, z, 0.0), axis=0)  # >= 0: the masked entries count as 0
    ez = tl.where(last_u, _exp2((z - m) * _LOG2E, FAST), 0.0)
    e_off = _exp2(-m * _LOG2E, FAST)  # e^{0 - m}: every class outside U
    r_z = tl.fdiv(1.0, tl.sum(ez, axis=0) + (C - tl.sum(last_u.to(tl.int32), axis=0)).to(tl.float32) * e_off)
    sum_xu = tl.sum(tl.where(last_u, xu, 0.0), axis=0)
    loss = t_sum * lse - on * (tl.sum(ez * xu, axis=0) + e_off * (sum_x - sum_xu)) * r_z - off * sum_x
    loss = tl.where(ok & (tl.abs(sum_x) < float("inf")), loss, float("nan"))
    # before the gradient stores: the count's fence then waits for the loss's add only
    last = _loss_add(loss * scale, item, part_ptr, cnt_ptr, n_items, STRIPES, KERNEL_SUM)
    # dense gradient: every class gets the off-U target first
    _write_dense_grad(ex, x_row, g_row, mx, tl.fdiv(t_sum * scale, se), (on * e_off * r_z + off) * scale, C, BLOCK_C,
                      SINGLE, FAST)
    tl.debug_barrier()
    # corrections at the classes of U (one write per class: the last entry of its run)
    g_u = (t_sum * _exp2((xu - lse) * _LOG2E, FAST) - (on * ez * r_z + off)) * scale
    tl.store(g_row + cs, g_u.to(g_row.dtype.element_ty), mask=last_u)
    _loss_close(last, item, part_ptr, cnt_ptr, loss_ptr, n_items, STRIPES, KERNEL_SUM)


@triton.jit
def _token_row_general(x_row, g_row, item, part_ptr, cnt_ptr, loss_ptr, n_items, n_ent, ncols, r_lo, c_lo, yb, ys,
                       yg, xb, xs, xg, inv_g, val_b, idx_b, flip, ok, C, smoothing, scale, S, K, BLOCK_C: tl.constexpr,
                       TB: tl.constexpr, FAST: tl.constexpr, STRIPES: tl.constexpr, KERNEL_SUM: tl.constexpr):
    """Loss (loss item `item`) and gradient of one token row whose cell has more tap entries than the
    sorted block holds (a box beyond the image; rare): blocks of TB entries deduped with pairwise equality
    masks, one pass over the blocks for the U statistics and one for the corrections. The row is streamed
    in blocks of BLOCK_C after the U pass (twice: statistics, gradient), so no row-sized value is live
    during the pairwise dedupe or across the loss (the one-warp program stays under its register cap)."""
    s_over_c = tl.fdiv(smoothing, C.to(tl.float32))
    on = 1.0 - smoothing + s_over_c
    off = s_over_c
    t_sum = 1.0 + s_over_c
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
        m, sum_ez, sum_ezx, sum_xu, n_u, n_bad = _u_stats(z, xu, first, bad, m, sum_ez, sum_ezx, sum_xu, n_u, n_bad)
        a0 += TB
    # streamed (not SINGLE: e^{x - max} is not kept across the loss), the row is read again below: L2 hits
    ex, mx, se, sum_x = _row_lse(x_row, C, BLOCK_C, False, FAST)
    lse = mx + tl.log(se)
    e_off = tl.exp(-m)
    Z = sum_ez + (C - n_u).to(tl.float32) * e_off
    loss = t_sum * lse - on * (sum_ezx + e_off * (sum_x - sum_xu)) / Z - off * sum_x
    loss = tl.where((n_bad == 0) & (tl.abs(sum_x) < float("inf")), loss, float("nan"))
    last = _loss_add(loss * scale, item, part_ptr, cnt_ptr, n_items, STRIPES, KERNEL_SUM)
    _write_dense_grad(ex, x_row, g_row, mx, t_sum * scale / se, (on * e_off / Z + off) * scale, C, BLOCK_C, False,
                      FAST)
    tl.debug_barrier()
    a0 = 0
    while a0 < n_ent:
        cid, z, valid, first, bad = _entries_dedup(a0, n_ent, ncols, K, r_lo, c_lo, yb, ys, yg, xb, xs, xg, inv_g,
                                                   val_b, idx_b, S, C, flip, TB)
        xu = tl.load(x_row + cid, mask=first, other=0.0).to(tl.float32)
        g_u = (t_sum * tl.exp(xu - lse) - (on * tl.exp(z - m) / Z + off)) * scale
        tl.store(g_row + cid, g_u.to(g_row.dtype.element_ty), mask=first)
        a0 += TB
    _loss_close(last, item, part_ptr, cnt_ptr, loss_ptr, n_items, STRIPES, KERNEL_SUM)


@triton.jit
def _pair_block(z_b, z_p, x_b, x_p, idx, Cz, Cx, Z_OTHER: tl.constexpr, X_OTHER: tl.constexpr):
    """Columns idx of the pair's two pooled rows (read from L2, ".cg": written by other programs' atomics,
    never served from an L1 line this SM may have fetched before they were complete) and of its two cls
    logits rows (fp32)."""
    zb = tl.load(z_b + idx, mask=idx < Cz, other=Z_OTHER, cache_modifier=".cg")
    zp = tl.load(z_p + idx, mask=idx < Cz, other=Z_OTHER, cache_modifier=".cg")
    xb = tl.load(x_b + idx, mask=idx < Cx, other=X_OTHER).to(tl.float32)
    xp = tl.load(x_p + idx, mask=idx < Cx, other=X_OTHER).to(tl.float32)
    return zb, zp, xb, xp


@triton.jit
def _cls_pair(b, x_ptr, grad_ptr, zc_ptr, part_ptr, cnt_ptr, loss_ptr, n_items, gt_ptr, mix_ptr, B, N, C, smoothing,
              lam_arg, scale, GT: tl.constexpr, MIX_FROM_PTR: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
              VEC_Z: tl.constexpr, FAST: tl.constexpr, STRIPES: tl.constexpr, KERNEL_SUM: tl.constexpr):
    """The cls rows of the MixToken pair {b, B-1-b} (one row when b is the middle of an odd batch): each
    target from the pooled logits of both samples (complete: the caller holds the pair's last ticket), the
    loss of both rows (one loss item, B * N + b, after the B * N token rows) and their gradients.

    Both rows read the same two pooled rows (their own and the partner's, roles swapped), so one set of
    passes serves both: 3 passes over blocks of BLOCK_C columns instead of 3 per row. VEC / VEC_Z: powers
    of two dividing C (up to 16 bytes of the logits / of fp32); the row lengths and block offsets are
    written so the compiler sees 16-byte alignment (vector loads, one address per vector)."""
    bp = B - 1 - b  # MixToken partner: the batch reversed
    two = bp != b
    cols = tl.arange(0, BLOCK_C)
    Cx = (C // VEC) * VEC  # == C
    Cz = (C // VEC_Z) * VEC_Z  # == C
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
    z_b = zc_ptr + b64 * Cz
    z_p = zc_ptr + bp64 * Cz
    x_b = x_ptr + b64 * Cx
    x_p = x_ptr + bp64 * Cx
    n_blk = tl.cdiv(C, BLOCK_C)
    # A. maxima (+ first argmax, torch's tie-breaking) of both pooled rows; online lse of both logits rows
    mz_b = float("-inf")
    mz_p = float("-inf")
    az_b = 0
    az_p = 0
    mx_b = float("-inf")
    mx_p = float("-inf")
    se_b = 0.0
    se_p = 0.0
    blk = 0
    while blk < n_blk:
        idx = blk * BLOCK_C + cols
        zb, zp, xb, xp = _pair_block(z_b, z_p, x_b, x_p, idx, Cz, Cx, float("-inf"), float("-inf"))
        vb = tl.max(zb, axis=0)
        vp = tl.max(zp, axis=0)
        az_b = tl.where(vb > mz_b, tl.argmax(zb, axis=0, tie_break_left=True) + blk * BLOCK_C, az_b)
        az_p = tl.where(vp > mz_p, tl.argmax(zp, axis=0, tie_break_left=True) + blk * BLOCK_C, az_p)
        mz_b = tl.maximum(mz_b, vb)
        mz_p = tl.maximum(mz_p, vp)
        m_b = tl.maximum(mx_b, tl.max(xb, axis=0))
        m_p = tl.maximum(mx_p, tl.max(xp, axis=0))
        se_b = se_b * _exp2((mx_b - m_b) * _LOG2E, FAST) + tl.sum(_exp2((xb - m_b) * _LOG2E, FAST), axis=0)
        se_p = se_p * _exp2((mx_p - m_p) * _LOG2E, FAST) + tl.sum(_exp2((xp - m_p) * _LOG2E, FAST), axis=0)
        mx_b = m_b
        mx_p = m_p
        blk += 1
    lse_b = mx_b + tl.log(se_b)
    lse_p = mx_p + tl.log(se_p)
    # B. softmax denominators of the pooled rows (NaN-poisoned rows stay NaN); non-finite logits
    sz_b = 0.0
    sz_p = 0.0
    nonfinite = 0
    blk = 0
    while blk < n_blk:
        idx = blk * BLOCK_C + cols
        zb, zp, xb, xp = _pair_block(z_b, z_p, x_b, x_p, idx, Cz, Cx, float("-inf"), 0.0)
        sz_b += tl.sum(_exp2((zb - mz_b) * _LOG2E, FAST), axis=0)  # 0 at the masked columns
        sz_p += tl.sum(_exp2((zp - mz_p) * _LOG2E, FAST), axis=0)
        nonfinite += tl.sum((~(tl.abs(xb) < float("inf")) | ~(tl.abs(xp) < float("inf"))).to(tl.int32), axis=0)
        blk += 1
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
    # each sample's own target T = r * (on * softmax(z) + off) + (1 - r) * (smoothed one-hot of its GT); the
    # row of b takes lam * T_b + (1 - lam) * T_p, the row of bp the roles swapped. Sums: a blended target
    # sums to r (1 + s/C) + 1 - r (mixing is convex)
    sum_b = r_b * (1.0 + s_over_c) + 1.0 - r_b
    sum_p = r_p * (1.0 + s_over_c) + 1.0 - r_p
    ts_b = lam * sum_b + (1.0 - lam) * sum_p
    ts_p = lam * sum_p + (1.0 - lam) * sum_b
    on_b = r_b * on / sz_b  # the divisions hoisted out of the column loop
    on_p = r_p * on / sz_p
    # C. targets, losses and gradients of both rows
    sum_tx_b = 0.0
    sum_tx_p = 0.0
    blk = 0
    while blk < n_blk:
        idx = blk * BLOCK_C + cols
        zb, zp, xb, xp = _pair_block(z_b, z_p, x_b, x_p, idx, Cz, Cx, 0.0, 0.0)
        tb = on_b * _exp2((zb - mz_b) * _LOG2E, FAST) + r_b * off + (1.0 - r_b) * tl.where(idx == g_b, on, off)
        tp = on_p * _exp2((zp - mz_p) * _LOG2E, FAST) + r_p * off + (1.0 - r_p) * tl.where(idx == g_p, on, off)
        t_b = lam * tb + (1.0 - lam) * tp
        t_p = lam * tp + (1.0 - lam) * tb
        sum_tx_b += tl.sum(tl.where(idx < C, t_b * xb, 0.0), axis=0)
        sum_tx_p += tl.sum(tl.where(idx < C, t_p * xp, 0.0), axis=0)
        gb = (ts_b * _exp2((xb - lse_b) * _LOG2E, FAST) - t_b) * scale
        gp = (ts_p * _exp2((xp - lse_p) * _LOG2E, FAST) - t_p) * scale
        tl.store(grad_ptr + b64 * Cx + idx, gb.to(grad_ptr.dtype.element_ty), mask=idx < Cx)
        tl.store(grad_ptr + bp64 * Cx + idx, gp.to(grad_ptr.dtype.element_ty), mask=(idx < Cx) & two)
        blk += 1
    loss = (ts_b * lse_b - sum_tx_b) + tl.where(two, ts_p * lse_p - sum_tx_p, 0.0)
    loss = tl.where(nonfinite > 0, float("nan"), loss * scale)
    item = B * N + b
    last = _loss_add(loss, item, part_ptr, cnt_ptr, n_items, STRIPES, KERNEL_SUM)
    _loss_close(last, item, part_ptr, cnt_ptr, loss_ptr, n_items, STRIPES, KERNEL_SUM)


# --------------------------------------------------------------------------------------------
# the kernel: cls pooling (+ cls rows by the last pooling program of each pair), then token rows
# --------------------------------------------------------------------------------------------
@triton.jit
def _token_rows_kernel(
    x_ptr,  # aux logits [B*N, C], contiguous rows
    grad_ptr,  # gradient of the aux logits [B*N, C] (written here)
    loss_ptr,  # fp32 scalar: the loss, stored once by the program that closes the last stripe (KERNEL_SUM)
    part_ptr,  # fp32 [STRIPES lines of 32 words], zero on entry: word 0 of line s is the partial sum of stripe s
    cnt_ptr,  # int32 view of the same lines: word 1 counts the stripe's items; line STRIPES: closed stripes
    zc_ptr,  # [B, C] fp32, zero on entry: pooled cls logits (atomically accumulated)
    ticket_ptr,  # int32 [B], zero on entry: pooling programs finished, per MixToken pair (index min(b, B-1-b))
    val_ptr,  # [B, K, S, S] teacher logits
    idx_ptr,  # [B, K, S, S] class ids
    box_ptr,  # [B, 4] (top, left, height, width), normalised, before the flip (any float dtype)
    flip_ptr,  # [B] flips (any integer dtype, != 0 = flipped)
    xc_ptr,  # cls logits [B, C] (read only when n_cls > 0)
    gc_ptr,  # their gradient [B, C] (written only when n_cls > 0)
    gt_ptr,  # [B] ground-truth classes (read only when GT)
    mix_ptr,  # [4] MixToken box (r0, c0, r1, c1) (read only when MIX_FROM_PTR)
    n_cls,  # B: the first B * CLS_CHUNKS programs do the cls rows of the whole batch; 0: none (later chunks)
    n_items,  # loss items of the whole forward (all launches): B * N token rows + ceil(B / 2) cls pairs
    b_offset,  # token rows of this launch belong to samples b_offset + row // N (chunked launches)
    C,  # classes
    smoothing,  # label smoothing s
    scale,  # dense_weight / (B * N)
    lam_arg,  # lambda' = 1 - box area / N, when given on the host
    cls_scale,  # cls_weight / B
    N: tl.constexpr, L: tl.constexpr, S: tl.constexpr, K: tl.constexpr,  # tokens (L * L), grid side, map side, top-k
    VEC: tl.constexpr,  # a power of two dividing C (up to 16 bytes of logits): rows start 16-byte aligned
    ORIGINAL: tl.constexpr,  # box_order == "original"
    BLOCK_C: tl.constexpr,  # columns per block of a logits row
    SINGLE: tl.constexpr,  # the whole row fits one block (kept in registers between passes)
    TS1: tl.constexpr,  # the small sorted block (a 2 x 2-pixel cell: 4k entries)
    TS: tl.constexpr,  # the large sorted block; cells with more tap entries take the general path
    TB: tl.constexpr,  # tap entries per block of the general path (pairwise equality per block pair)
    FAST: tl.constexpr,  # compiled (not the interpreter): ex2/lg2 .approx.ftz by inline PTX
    CLS_CHUNKS: tl.constexpr,  # cdiv(S*S*K, TBC): cls-pooling programs per sample
    TBC: tl.constexpr,  # tap entries per cls-pooling program
    GT: tl.constexpr,  # ground-truth blend of the cls targets
    MIX_FROM_PTR: tl.constexpr,  # lambda from the MixToken box on the device
    BLOCK_LOOP: tl.constexpr,  # columns per block where rows are walked in a loop (cls pair, general token rows)
    VEC_CLS: tl.constexpr,  # as VEC, for the cls logits' dtype
    VEC_Z: tl.constexpr,  # as VEC, for fp32 (the pooled rows)
    STRIPES: tl.constexpr,  # partial sums of the loss (a power of two), see _loss_add
    KERNEL_SUM: tl.constexpr,  # the launch sums the partials into loss_ptr (else torch does, after it)
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
        zrow = zc_ptr + b.to(tl.int64) * C  # scattered adds: no alignment to show
        if a0 < n_ent:
            val_b = val_ptr + b.to(tl.int64) * K * S * S
            idx_b = idx_ptr + b.to(tl.int64) * K * S * S
            e = a0 + tl.arange(0, TBC)
            cid, w, valid, bad = _entries(e, n_ent, ncols, K, r_lo, c_lo, yb, ys, yg, xb, xs, xg, inv_g, val_b, idx_b,
                                          S, C, flip)
            # relaxed: no fence per add; the ticket below orders them all at once
            tl.atomic_add(zrow + cid, w, mask=valid, sem="relaxed")
            nbad = tl.sum(bad.to(tl.int32), axis=0) + tl.where(a0 == 0, 1 - ok.to(tl.int32), 0)
            if nbad > 0:  # invalid class ids or box: poison the cls target so the loss is NaN
                tl.atomic_add(zrow, float("nan"), sem="relaxed")
        # ---- ticket: the pair {b, B-1-b} (the middle sample of an odd batch pairs with itself) is complete
        # when all its pooling programs have added; the CTA barrier puts every thread's adds before the
        # ticket's release, and the last program's acquire makes all of them visible to it
        bp = n_cls - 1 - b
        pair = tl.minimum(b, bp)
        tl.debug_barrier()
        done = tl.atomic_add(ticket_ptr + pair, 1, sem="acq_rel")
        if done == tl.where(b == bp, CLS_CHUNKS, 2 * CLS_CHUNKS) - 1:
            _cls_pair(pair, xc_ptr, gc_ptr, zc_ptr, part_ptr, cnt_ptr, loss_ptr, n_items, gt_ptr, mix_ptr, n_cls, N, C,
                      smoothing, lam_arg, cls_scale, GT, MIX_FROM_PTR, BLOCK_LOOP, VEC_CLS, VEC_Z, FAST, STRIPES,
                      KERNEL_SUM)
    else:
        # ---- one token row: sample b, output cell (p, q)
        row = pid - n_pool
        b, p, q = _row_cell(row, b_offset, N, L)
        row64 = row.to(tl.int64)
        Ca = (C // VEC) * VEC  # == C; written so the compiler sees the alignment (vector loads and stores)
        x_row = x_ptr + row64 * Ca
        g_row = grad_ptr + row64 * Ca
        item = b_offset * N + row  # the row's loss item: its row in the whole batch
        # 1. the row is requested first; its latency overlaps the geometry and the tap loads
        x = _row_load(x_row, Ca, BLOCK_C, SINGLE)
        yb, ys, yg, r_lo, xb, xs, xg, c_lo, ncols, n_ent, flip, ok, inv_g = _sample_geometry(
            box_ptr, flip_ptr, b, S, L, p, q, K, ORIGINAL)
        val_b = val_ptr + b.to(tl.int64) * K * S * S
        idx_b = idx_ptr + b.to(tl.int64) * K * S * S
        # 2. all taps of the cell in one sorted block: the small one for the common 2 x 2-pixel cell, the
        #    large one for cells of 3 pixels along an axis; a larger cell (a box beyond the image) takes the
        #    general path in this program
        if n_ent <= TS1:
            _token_row_sorted(x, x_row, g_row, item, part_ptr, cnt_ptr, loss_ptr, n_items, n_ent, ncols, r_lo, c_lo,
                              yb, ys, yg, xb, xs, xg, inv_g, val_b, idx_b, flip, ok, Ca, smoothing, scale, S, K,
                              BLOCK_C, SINGLE, TS1, FAST, STRIPES, KERNEL_SUM)
        elif n_ent <= TS:
            _token_row_sorted(x, x_row, g_row, item, part_ptr, cnt_ptr, loss_ptr, n_items, n_ent, ncols, r_lo, c_lo,
                              yb, ys, yg, xb, xs, xg, inv_g, val_b, idx_b, flip, ok, Ca, smoothing, scale, S, K,
                              BLOCK_C, SINGLE, TS, FAST, STRIPES, KERNEL_SUM)
        else:
            _token_row_general(x_row, g_row, item, part_ptr, cnt_ptr, loss_ptr, n_items, n_ent, ncols, r_lo, c_lo, yb,
                               ys, yg, xb, xs, xg, inv_g, val_b, idx_b, flip, ok, Ca, smoothing, scale, S, K,
                               BLOCK_LOOP, TB, FAST, STRIPES, KERNEL_SUM)


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
_TB = None  # tap entries per block of the general path; None = _tap_block(K, S, L, num_warps)
_TS = None  # None = _sorted_block(K, S, L)
_TS1 = None  # None = _small_sorted_block(K)
_NUM_WARPS = None  # None = 1 for rows up to 1024 columns, else 8 (kernels/_tune.py sweeps it)
# Register cap of the kernel (maxnreg): 64 registers let 32 one-warp programs share an SM (the resident-block
# limit) without spills (72 uncapped: 28). 0 = no cap (the sweep compares both). See _reg_cap for more warps.
_MAXNREG = 64


def _reg_cap(num_warps):
    """maxnreg of the launch: _MAXNREG on one-warp launches; none on more warps (C > 1024), v5's rule. v6 capped
    those too (64, or 48 + 2 per kept column per thread) and measured 1.87 ms at C 21,841 against 1.24 ms
    for the same kernel uncapped (79 registers, no spills)."""
    if num_warps == 1 and _MAXNREG:
        return {"maxnreg": _MAXNREG}
    return {}


def _tap_block(K, S, L, num_warps):
    """Entries per block of the general path (cells with more taps than the large sorted block). One warp:
    16, so a [TB, TB] equality mask is 8 values per thread and the path fits the register cap. More warps:
    4k, growing (to 64 at most) for coarse grids (up to (ceil(S/L) + 1)^2 pixels per cell) to keep the
    number of [TB, TB] block pairs of the O(T^2) dedupe small."""
    if _TB:
        return _TB
    if num_warps == 1 and not _INTERPRET:  # (the interpreter has no registers: fewer, larger blocks)
        return 16
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
    """Kernel inputs in kernel layout plus the small buffers the atomics add into, in one int32 allocation
    zeroed by one fill launch: zc [B, C] (fp32 pooled cls logits; first, so its rows start 16-byte aligned),
    the loss (fp32 scalar), one ticket counter per MixToken pair (int32 [B]), then from the next 128-byte line
    on `stripes` lines of the loss's partial sums (word 0: fp32 partial, word 1: int32 item count) and one line
    for the count of closed stripes.

    The inputs are passed as they are whenever the kernel can read them directly (any float box dtype, any
    integer flip dtype are converted on load), so no cast or copy kernels run.

    stripes (a power of two, default _STRIPES) and kernel_sum (default True: the launch itself sums the
    partials into the scalar through per-stripe counts; False: torch sums them after the launch, one more
    small launch). True is the configuration `tokenlabel bench loss` measured on the H100 (2026-11-25: S/224
    bf16 fwd+bwd 0.0589 ms). In CUDA-graph timings of the same job the torch sum was faster (fwd+bwd S/224
    49.4 vs 51.9 us, S/384 64.4 vs 68.2, C 21,841 1,247 vs 1,295: the in-kernel sum's release count and fence
    cost each row two L2 round trips before its stores), but its bench row, where the extra launch also costs
    host time, is not measured yet; kernels/NOTES.md "v7 measured".
    """

    def __init__(self, label_values, label_indices, boxes, flips, B, N, C, stripes=None, kernel_sum=True):
        dev = label_values.device
        stripes = _STRIPES if stripes is None else stripes
        if not (isinstance(stripes, int) and 1 <= stripes <= 4096 and stripes & (stripes - 1) == 0):
            raise ValueError(f"stripes must be a power of two in [1, 4096], got {stripes!r}")
        line = _LINE.value
        head = B * C + 1 + B
        base = -(-head // line) * line  # the stripes start on a 128-byte line (the allocation is aligned)
        buf = torch.zeros(base + (stripes + 1) * line, device=dev, dtype=torch.int32)
        fbuf = buf.view(torch.float32)
        self.zc = fbuf[:B * C].view(B, C)
        self.loss = fbuf[B * C]
        self.tickets = buf[B * C + 1:head]
        self.counts = buf[base:]  # word 1 of each stripe's line; the line after the stripes: closed stripes
        self.partials = fbuf[base:]  # word 0 of each stripe's line
        self.stripes = stripes
        self.kernel_sum = bool(kernel_sum)
        self.n_items = B * N + (B + 1) // 2  # loss items: the token rows, then the cls pairs {b, B-1-b}
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
        self.tb = _tap_block(K, S, math.isqrt(N), self.num_warps)
        self.ts = _sorted_block(K, S, math.isqrt(N))
        self.ts1 = _small_sorted_block(K)
        self.tbc = 128
        self.cls_chunks = triton.cdiv(S * S * K, self.tbc)
        # rows walked in a loop (the cls pair: 4 rows at once; the general token rows) take blocks of 2 x VEC_Z
        # columns per thread (8 when rows are 16-byte aligned: vector loads; 2 when every column needs its own
        # address), so these rare paths fit the token rows' register cap without spills (checked in SASS)
        self.block_loop = min(triton.next_power_of_2(C), 2 * _row_vec(C, 4) * 32 * self.num_warps)

    def stripe_partials(self):
        """The partial sums (a strided view: word 0 of each stripe's line)."""
        return self.partials[:self.stripes * _LINE.value:_LINE.value]

    def total_loss(self):
        """The loss after the launches: the scalar the kernel stored, or (kernel_sum False) one torch sum."""
        return self.loss if self.kernel_sum else self.stripe_partials().sum()


_workspace = _Workspace


def launch_token_rows(x, grad, w, b_offset, rows, N, C, smoothing, scale, original, cls=None):
    """The kernel over ``rows`` token rows of ``x`` (samples from b_offset on); their scaled losses go into
    w's partial sums (loss items b_offset * N + row), and whichever launch completes the forward's last item
    stores the total into w.loss (w.kernel_sum). ``cls`` = (cls logits [B, C], their gradient, gt_classes or
    None, mix tensor or None, lam, cls_weight, ground_truth): the same launch also pools the cls targets of
    the whole batch and writes the cls rows' loss and gradient (in one launch per forward; None: token rows
    only)."""
    K, S = w.values.shape[1], w.values.shape[-1]
    L = math.isqrt(N)
    if cls is not None:
        x_cls, grad_cls, gt_classes, mix_tensor, lam, cls_weight, ground_truth = cls
        n_cls = x_cls.shape[0]
        gt = gt_classes if (ground_truth and gt_classes is not None) else w.zc  # placeholder when unused
        mix = mix_tensor if mix_tensor is not None else w.zc
        cls_args = (x_cls, grad_cls, gt, mix)
        cls_vals = (float(lam), float(cls_weight) / n_cls)
        vec_cls = _row_vec(C, x_cls.element_size())
        cls_kw = dict(GT=bool(ground_truth and gt_classes is not None), MIX_FROM_PTR=mix_tensor is not None)
    else:  # placeholders the kernel never reads
        n_cls = 0
        cls_args = (x, grad, w.zc, w.zc)
        cls_vals = (1.0, 0.0)
        vec_cls = _row_vec(C, x.element_size())  # (as the token rows: vector accesses in the unused cls code)
        cls_kw = dict(GT=False, MIX_FROM_PTR=False)
    _token_rows_kernel[(n_cls * w.cls_chunks + rows,)](
        x, grad, w.loss, w.partials, w.counts, w.zc, w.tickets, w.values, w.indices, w.boxes, w.flips, *cls_args,
        n_cls, w.n_items, b_offset, C, float(smoothing), float(scale), *cls_vals, N=N, L=L, S=S, K=K,
        VEC=_row_vec(C, x.element_size()), ORIGINAL=bool(original), BLOCK_C=w.block_c, SINGLE=w.single,
        TS1=min(w.ts1, w.ts), TS=w.ts, TB=w.tb, FAST=not _INTERPRET, CLS_CHUNKS=w.cls_chunks, TBC=w.tbc,
        BLOCK_LOOP=w.block_loop, VEC_CLS=vec_cls, VEC_Z=_row_vec(C, 4), STRIPES=w.stripes,
        KERNEL_SUM=w.kernel_sum, num_warps=w.num_warps, **cls_kw, **_reg_cap(w.num_warps))


def token_label_ce_forward(cls_logits, aux_logits, label_values, label_indices, boxes, flips, mix_tensor,
                           gt_classes, lam, smoothing, dense_weight, cls_weight, ground_truth, original,
                           grad_cls=None, grad_aux=None, stripes=None, kernel_sum=True):
    """The workspace fill and one launch. Returns (loss fp32 scalar, grad_cls, grad_aux); inputs already
    validated. ``stripes`` / ``kernel_sum``: see _Workspace (timing comparisons only; the defaults are what
    the autograd paths use).

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
    w = _workspace(label_values, label_indices, boxes, flips, B, N, C, stripes=stripes, kernel_sum=kernel_sum)
    launch_token_rows(x_aux, grad_aux, w, 0, B * N, N, C, smoothing, dense_weight / (B * N), original,
                      cls=(x_cls, grad_cls, gt_classes, mix_tensor, lam, cls_weight, ground_truth))
    return w.total_loss(), grad_cls, grad_aux.view(B, N, C)


def _traced(grad):
    # traced (torch.compile builds the backward graph lazily, on fake/functional tensor subclasses, where
    # is_compiling() may be False): plain math the compiler fuses; also the path for non-Triton devices
    return torch.compiler.is_compiling() or type(grad) is not torch.Tensor or not (grad.is_cuda or _INTERPRET)


def _go_ptr(grad_output):
    # the loss is an fp32 scalar, so grad_output normally is one too: no reshape, no cast kernel
    return grad_output if grad_output.dtype == torch.float32 else grad_output.to(torch.float32)


# The scale kernel's grid: a few programs per SM walk blocks of the gradients. When grad_output is 1 every
# program only reads it and exits, so fewer programs cost less. When both sizes are multiples of 16 (Triton
# then specialises them and the accesses become 16-byte vectors; 40 registers bf16, 80 fp32 at 8 warps):
# 2 programs per SM with 16,384-element blocks, the same bytes in flight as v5's 8 x 4,096 when grad_output
# is not 1. Otherwise v5's grid (a 16,384 block of element-wise masked accesses takes 231-254 registers).
def _scale_grid(na, nb, device):
    if na % 16 == 0 and nb % 16 == 0:
        return 16384, 2 * sm_count(device)
    return 4096, 8 * sm_count(device)


def _scale_launch(grad_a, grad_b, grad_output):
    na, nb = grad_a.numel(), grad_b.numel()
    block, programs = _scale_grid(na, nb, grad_a.device)
    blocks = triton.cdiv(na, block) + triton.cdiv(nb, block)
    _scale2_kernel[(max(1, min(blocks, programs)),)](grad_a, na, grad_b, nb, _go_ptr(grad_output), BLOCK=block,
                                                      num_warps=8)


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
