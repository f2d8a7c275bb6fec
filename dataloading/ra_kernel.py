"""The loader's GPU tail in Triton: RandAugment's layers, the flip, the ImageNet normalisation,
random erasing and the cast to the output dtype, batched, with every per-sample choice read from
one small device table (``build_table``) instead of per-op host copies.

Semantics are those of ``randaugment.apply_torch`` (the reference, itself tested against PIL),
followed by loader.finish_batch's flip, normalise and erasing. Per RandAugment layer that fired for
some sample the launcher runs

1. ``_lut_kernel`` (one program per sample; only when some sample's op in that layer is point-wise):
   the op as a 3 x 256 lookup table. AutoContrast (per-channel min/max), Equalize (per-channel
   256-bin histogram) and Contrast (mean of PIL's grey) first reduce over the whole image; Invert,
   Posterize, Solarize, SolarizeAdd and Brightness need no statistics.
2. ``_apply_kernel`` (one program per (pixel tile, sample)): reads the layer input (uint8, any
   strides: DALI's HWC or the PIL path's CHW) and writes the layer output: spatial ops as an affine
   resampling exactly like apply_torch's ``_affine`` (grid_sample, border padding, align_corners
   False, bilinear or bicubic with A = -0.75, +0.5 then floor, FILL outside the input), Color,
   Sharpness (3x3 smoothing, border pixels kept), the lookup table for the point-wise ops, and the
   identity where the sample's layer did not fire. Intermediate layers write uint8 (every op's
   output is a whole number in [0, 255], so nothing is lost); the last pass also applies the flip
   (it evaluates the op at the mirrored column), (x - 255 mean) / (255 std), random erasing (N(0,1)
   noise from Philox, ``tl.randn(seed, element index)``, inside the sample's box) and the cast.

So a batch with two fired layers costs one table copy and four launches (two without point-wise
ops), against one host->device copy per op group and some hundred small torch ops before.

Floating point: all kernels run with ``enable_fp_fusion=False`` and exactly rounded division
(``div_rn``), so each float operation rounds as the reference's separate torch ops do: the colour
ops, Sharpness and the normalisation are bit-exact. The spatial ops may differ by one grey level on
a small fraction of pixels: the sampling position goes through a 3x3 matrix product and
grid_sample's unnormalisation, which torch evaluates with its own operation order and fused
multiply-adds (einsum/BLAS, nvcc), so a value that lands within a few ulps of k + 0.5 can round
either way. Posterize takes its (always whole) bit count as an integer shift.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from . import randaugment as ra

HEAD = 8    # per-sample fields: flip, erase top, left, height, width, 3 spare
LAYER = 12  # per-layer fields: op, interp, arg, M[0, 0:3], M[1, 0:3] (output -> input pixel), 3 spare
LUT_OPS = (ra.AUTOCONTRAST, ra.EQUALIZE, ra.INVERT, ra.POSTERIZE, ra.SOLARIZE, ra.SOLARIZE_ADD, ra.CONTRAST,
           ra.BRIGHTNESS)
# two pixels per thread: ptxas (sm_90) gives the apply kernel 80 registers, no spills (4 pixels per
# thread: 192 registers; 8: spills); the LUT kernel 100
APPLY_BLOCK, APPLY_WARPS = 512, 8
LUT_BLOCK, LUT_WARPS = 1024, 8

_AUTOCONTRAST = tl.constexpr(ra.AUTOCONTRAST)
_EQUALIZE = tl.constexpr(ra.EQUALIZE)
_INVERT = tl.constexpr(ra.INVERT)
_ROTATE = tl.constexpr(ra.ROTATE)
_POSTERIZE = tl.constexpr(ra.POSTERIZE)
_SOLARIZE = tl.constexpr(ra.SOLARIZE)
_SOLARIZE_ADD = tl.constexpr(ra.SOLARIZE_ADD)
_COLOR = tl.constexpr(ra.COLOR)
_CONTRAST = tl.constexpr(ra.CONTRAST)
_BRIGHTNESS = tl.constexpr(ra.BRIGHTNESS)
_SHARPNESS = tl.constexpr(ra.SHARPNESS)
_SHEAR_X = tl.constexpr(ra.SHEAR_X)
_FILL0 = tl.constexpr(float(ra.FILL[0]))
_FILL1 = tl.constexpr(float(ra.FILL[1]))
_FILL2 = tl.constexpr(float(ra.FILL[2]))
assert ra.GEOMETRIC == (ra.ROTATE, ra.SHEAR_X, ra.SHEAR_Y, ra.TRANSLATE_X, ra.TRANSLATE_Y) == (3, 11, 12, 13, 14)


# ------------------------------------------------------------------------------------------ host side
@dataclass(frozen=True)
class Plan:
    """What the host knows about a batch's table: the layers that fired for some sample (one apply
    pass each) and, among them, those with a point-wise op somewhere (a LUT pass first)."""
    active: tuple = ()
    lut: tuple = ()


def table_width(num_layers: int) -> int:
    return HEAD + LAYER * max(1, num_layers)


def build_table(meta, *, height, width, train, augment):
    """numpy metadata of a batch -> (float32 [B, table_width(L)] kernel table, Plan).

    augment=False (the PIL path, which already augmented) or eval: no op, no flip. Train: the
    erasing box where ``meta["erase"]``. float32 holds every field exactly as apply_torch sees it
    (it casts args and matrices to float32 too; ops and boxes are small integers).
    """
    B = len(meta["sample_ids"])
    L = int(np.asarray(meta["ra_op"]).shape[1]) if (augment and train and "ra_op" in meta) else 0
    tab = np.zeros((B, table_width(L)), np.float32)
    if train:
        if augment:
            tab[:, 0] = np.asarray(meta["flips"], bool)
        erase = np.asarray(meta["erase"], bool)
        tab[:, 1:5] = np.where(erase[:, None], np.asarray(meta["erase_box"], np.int64), 0)
    active, lut = [], []
    if L == 0:
        tab[:, HEAD] = -1
    for l in range(L):
        ops = np.asarray(meta["ra_op"])[:, l].astype(np.int64)
        args = np.asarray(meta["ra_arg"], np.float64)[:, l]
        c = HEAD + LAYER * l
        tab[:, c] = ops
        tab[:, c + 1] = np.asarray(meta["ra_interp"])[:, l]
        tab[:, c + 2] = args
        tab[:, c + 3:c + 9] = ra.affine_matrices(ops, args, width, height)[:, :2, :].reshape(B, 6)
        if (ops >= 0).any():
            active.append(l)
        if np.isin(ops, LUT_OPS).any():
            lut.append(l)
    return tab, Plan(tuple(active), tuple(lut))


def finish_images(images, table, plan, *, dtype=torch.float32, seed=0, mean255=None, std255=None):
    """uint8 images [B, 3, H, W] (any strides) + the device table -> normalised [B, 3, H, W] ``dtype``.

    Applies the active RandAugment layers, the flip, the normalisation (``mean255``/``std255``:
    255 x the ImageNet mean/std by default) and random erasing with Philox stream ``seed``.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    B, _, H, W = images.shape
    if table.dtype != torch.float32 or table.dim() != 2 or table.shape[0] != B or table.device != images.device:
        raise ValueError(f"table must be float32 [B={B}, width] on {images.device}, got "
                         f"{table.dtype} {tuple(table.shape)} on {table.device}")
    if table.stride(1) != 1:
        raise ValueError("table must have unit stride along its rows")
    if B * 3 * H * W >= 2**31:
        raise ValueError(f"images: {B}x3x{H}x{W} elements exceed the int32 noise counter")
    if not 0 <= int(seed) < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    if mean255 is None or std255 is None:
        from .loader import IMAGENET_MEAN, IMAGENET_STD

        mean255 = [255 * m for m in IMAGENET_MEAN]
        std255 = [255 * s for s in IMAGENET_STD]
    # the reference normalises with float32 constants: pass the same float32 values
    mean = [float(np.float32(v)) for v in mean255]
    std = [float(np.float32(v)) for v in std255]
    dev = images.device
    out = torch.empty((B, 3, H, W), dtype=dtype, device=dev)
    if B == 0:
        return out
    n = H * W
    block = min(APPLY_BLOCK, triton.next_power_of_2(n))
    lut_block = min(LUT_BLOCK, triton.next_power_of_2(n))
    grid = (triton.cdiv(n, block), B)
    lut = torch.empty((B, 3, 256), dtype=torch.uint8, device=dev)
    x = images
    passes = list(plan.active) or [None]
    for k, l in enumerate(passes):
        final = k == len(passes) - 1
        layer_off = HEAD + LAYER * (0 if l is None else l)
        if l in plan.lut:
            _lut_kernel[(B,)](x, *x.stride(), table, table.stride(0), layer_off, lut, H, W,
                              BLOCK=lut_block, num_warps=LUT_WARPS, enable_fp_fusion=False)
        dst = out if final else torch.empty((B, 3, H, W), dtype=torch.uint8, device=dev)
        _apply_kernel[grid](x, *x.stride(), dst, *dst.stride(), table, table.stride(0), layer_off, lut, H, W,
                            int(seed), *mean, *std, HAS_OP=l is not None, FINAL=final, BLOCK=block,
                            num_warps=APPLY_WARPS, enable_fp_fusion=False)
        x = dst
    return out


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _blend(deg, x, a):
    # PIL Image.blend on uint8 (as randaugment._blend): deg + a (x - deg), clipped, truncated
    return tl.floor(tl.minimum(tl.maximum(deg + a * (x - deg), 0.0), 255.0))


@triton.jit
def _equalize_lut(h, n):
    """PIL ImageOps.equalize's table from one channel's 256-bin histogram h of n pixels."""
    v = tl.arange(0, 256)
    top = tl.max(tl.where(h > 0, v, -1), 0)               # the largest value present
    last = tl.sum(tl.where(v == top, h, 0), 0)            # ... and its count
    step = (n - last) // 255
    nonzero = tl.sum((h > 0).to(tl.int32), 0)
    cum = tl.cumsum(h, 0) - h                             # pixels strictly below each value
    safe = tl.maximum(step, 1)
    lut = tl.minimum((safe // 2 + cum) // safe, 255)
    keep = (nonzero <= 1) | (step == 0)
    return tl.where(keep, v, lut).to(tl.float32)


@triton.jit
def _autocontrast_lut(v, lo, hi):
    """ImageOps.autocontrast for one channel with min lo and max hi (float32 scalars)."""
    # the reference's 255.0 / d is torch's __rtruediv__: reciprocal(d) * 255
    one = tl.full([256], 1.0, tl.float32)
    scale = tl.math.div_rn(one, one * tl.maximum(hi - lo, 1.0)) * 255.0
    y = tl.minimum(tl.maximum(tl.floor(v * scale - lo * scale), 0.0), 255.0)  # floor == trunc after the clamp
    return tl.where(hi > lo, y, v)


@triton.jit(do_not_specialize=["layer_off", "H", "W"])
def _lut_kernel(x_ptr, sxb, sxc, sxh, sxw, tab_ptr, tab_stride, layer_off, lut_ptr, H, W,
                BLOCK: tl.constexpr):
    """One program per sample: its point-wise op of this layer as lut[b, c, 0:256] (uint8).

    x_ptr/sx*: layer input, uint8, strides (sample, channel, row, column). tab_ptr: the float32
    table (row stride tab_stride); the layer's fields start at layer_off. Samples whose op is not
    point-wise (or that did not fire) leave their table unwritten: the apply kernel never reads it.
    """
    b = tl.program_id(0)
    row = tab_ptr + b * tab_stride + layer_off
    op = tl.load(row).to(tl.int32)
    arg = tl.load(row + 2)
    pointwise = ((op == _AUTOCONTRAST) | (op == _EQUALIZE) | (op == _INVERT) | (op == _POSTERIZE)
                 | (op == _SOLARIZE) | (op == _SOLARIZE_ADD) | (op == _CONTRAST) | (op == _BRIGHTNESS))
    if pointwise:
        vi = tl.arange(0, 256)
        v = vi.to(tl.float32)
        lut0 = v
        lut1 = v
        lut2 = v
        n = H * W
        if (op == _AUTOCONTRAST) | (op == _EQUALIZE) | (op == _CONTRAST):
            # 1. statistics of the whole image, BLOCK pixels at a time
            xb = x_ptr + b.to(tl.int64) * sxb
            h0 = tl.zeros([256], tl.int32)
            h1 = tl.zeros([256], tl.int32)
            h2 = tl.zeros([256], tl.int32)
            lo0 = tl.full([BLOCK], 255, tl.int32)
            lo1 = tl.full([BLOCK], 255, tl.int32)
            lo2 = tl.full([BLOCK], 255, tl.int32)
            hi0 = tl.zeros([BLOCK], tl.int32)
            hi1 = tl.zeros([BLOCK], tl.int32)
            hi2 = tl.zeros([BLOCK], tl.int32)
            gsum = tl.zeros([BLOCK], tl.int32)
            s = 0
            while s < n:  # while, not range: the interpreter cannot take a runtime bound in range()
                offs = s + tl.arange(0, BLOCK)
                m = offs < n
                p = (offs // W) * sxh + (offs % W) * sxw
                r = tl.load(xb + p, mask=m, other=0).to(tl.int32)
                g = tl.load(xb + sxc + p, mask=m, other=0).to(tl.int32)
                bl = tl.load(xb + 2 * sxc + p, mask=m, other=0).to(tl.int32)
                if op == _EQUALIZE:
                    h0 += tl.histogram(r, 256, mask=m)
                    h1 += tl.histogram(g, 256, mask=m)
                    h2 += tl.histogram(bl, 256, mask=m)
                elif op == _AUTOCONTRAST:
                    lo0 = tl.minimum(lo0, tl.where(m, r, 255))
                    lo1 = tl.minimum(lo1, tl.where(m, g, 255))
                    lo2 = tl.minimum(lo2, tl.where(m, bl, 255))
                    hi0 = tl.maximum(hi0, r)
                    hi1 = tl.maximum(hi1, g)
                    hi2 = tl.maximum(hi2, bl)
                else:
                    # PIL's RGB -> L, exact in integers: (19595 R + 38470 G + 7471 B + 2^15) >> 16
                    gsum += tl.where(m, (19595 * r + 38470 * g + 7471 * bl + 32768) >> 16, 0)
                s += BLOCK
            # 2. the table
            if op == _EQUALIZE:
                lut0 = _equalize_lut(h0, n)
                lut1 = _equalize_lut(h1, n)
                lut2 = _equalize_lut(h2, n)
            elif op == _AUTOCONTRAST:
                lut0 = _autocontrast_lut(v, tl.min(lo0, 0).to(tl.float32), tl.max(hi0, 0).to(tl.float32))
                lut1 = _autocontrast_lut(v, tl.min(lo1, 0).to(tl.float32), tl.max(hi1, 0).to(tl.float32))
                lut2 = _autocontrast_lut(v, tl.min(lo2, 0).to(tl.float32), tl.max(hi2, 0).to(tl.float32))
            else:
                # ImageEnhance.Contrast: blend with the rounded mean grey (PIL: int(mean + 0.5))
                total = tl.full([256], 0.0, tl.float32) + tl.sum(gsum, 0).to(tl.float32)
                mean = tl.floor(tl.math.div_rn(total, tl.full([256], 0.0, tl.float32) + n.to(tl.float32)) + 0.5)
                lut0 = _blend(mean, v, arg)
                lut1 = lut0
                lut2 = lut0
        elif op == _INVERT:
            lut0 = 255.0 - v
            lut1 = lut0
            lut2 = lut0
        elif op == _POSTERIZE:
            # keep the top `arg` bits (arg >= 8: unchanged)
            k = (8.0 - tl.minimum(tl.maximum(arg, 0.0), 8.0)).to(tl.int32)
            lut0 = ((vi >> k) << k).to(tl.float32)
            lut1 = lut0
            lut2 = lut0
        elif op == _SOLARIZE:
            lut0 = tl.where(v >= arg, 255.0 - v, v)
            lut1 = lut0
            lut2 = lut0
        elif op == _SOLARIZE_ADD:
            lut0 = tl.where(v < 128.0, tl.minimum(v + arg, 255.0), v)
            lut1 = lut0
            lut2 = lut0
        else:  # Brightness: blend with black
            lut0 = _blend(tl.zeros([256], tl.float32), v, arg)
            lut1 = lut0
            lut2 = lut0
        lb = lut_ptr + b * 768 + vi
        tl.store(lb, lut0.to(tl.uint8))
        tl.store(lb + 256, lut1.to(tl.uint8))
        tl.store(lb + 512, lut2.to(tl.uint8))


@triton.jit
def _cubic_row(ptr, c0, c1, c2, c3, w0, w1, w2, w3, m):
    # torch's cubic_interp1d: x0 w0 + x1 w1 + x2 w2 + x3 w3, left to right
    v0 = tl.load(ptr + c0, mask=m, other=0).to(tl.float32)
    v1 = tl.load(ptr + c1, mask=m, other=0).to(tl.float32)
    v2 = tl.load(ptr + c2, mask=m, other=0).to(tl.float32)
    v3 = tl.load(ptr + c3, mask=m, other=0).to(tl.float32)
    return v0 * w0 + v1 * w1 + v2 * w2 + v3 * w3


@triton.jit
def _cubic_weights(t):
    # torch's get_cubic_upsample_coefficients, A = -0.75 (Keys), in its operation order
    A = -0.75
    x1 = t + 1.0
    w0 = ((A * x1 - 5.0 * A) * x1 + 8.0 * A) * x1 - 4.0 * A
    w1 = ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0
    x2 = 1.0 - t
    w2 = ((A + 2.0) * x2 - (A + 3.0)) * x2 * x2 + 1.0
    x3 = x2 + 1.0
    w3 = ((A * x3 - 5.0 * A) * x3 + 8.0 * A) * x3 - 4.0 * A
    return w0, w1, w2, w3


@triton.jit
def _bicubic(ch, sxh, sxw, ix, iy, m, H, W):
    """grid_sample bicubic, border padding: the 4x4 taps clamped into the image."""
    fx = tl.floor(ix)
    fy = tl.floor(iy)
    wx0, wx1, wx2, wx3 = _cubic_weights(ix - fx)
    wy0, wy1, wy2, wy3 = _cubic_weights(iy - fy)
    x0 = fx.to(tl.int32)
    y0 = fy.to(tl.int32)
    c0 = tl.minimum(tl.maximum(x0 - 1, 0), W - 1) * sxw
    c1 = tl.minimum(tl.maximum(x0, 0), W - 1) * sxw
    c2 = tl.minimum(tl.maximum(x0 + 1, 0), W - 1) * sxw
    c3 = tl.minimum(tl.maximum(x0 + 2, 0), W - 1) * sxw
    r0 = _cubic_row(ch + tl.minimum(tl.maximum(y0 - 1, 0), H - 1) * sxh, c0, c1, c2, c3, wx0, wx1, wx2, wx3, m)
    r1 = _cubic_row(ch + tl.minimum(tl.maximum(y0, 0), H - 1) * sxh, c0, c1, c2, c3, wx0, wx1, wx2, wx3, m)
    r2 = _cubic_row(ch + tl.minimum(tl.maximum(y0 + 1, 0), H - 1) * sxh, c0, c1, c2, c3, wx0, wx1, wx2, wx3, m)
    r3 = _cubic_row(ch + tl.minimum(tl.maximum(y0 + 2, 0), H - 1) * sxh, c0, c1, c2, c3, wx0, wx1, wx2, wx3, m)
    return r0 * wy0 + r1 * wy1 + r2 * wy2 + r3 * wy3


@triton.jit
def _bilinear(ch, x0, y0, x1, y1, nw, ne, sw, se, m):
    # torch's order: nw, ne, sw, se accumulated onto 0
    acc = tl.load(ch + y0 + x0, mask=m, other=0).to(tl.float32) * nw
    acc += tl.load(ch + y0 + x1, mask=m, other=0).to(tl.float32) * ne
    acc += tl.load(ch + y1 + x0, mask=m, other=0).to(tl.float32) * sw
    acc += tl.load(ch + y1 + x1, mask=m, other=0).to(tl.float32) * se
    return acc


@triton.jit
def _affine(xb, sxc, sxh, sxw, lrow, i, j, m, H, W):
    """out(p) = in(M p) at output pixel centres p = (j + 0.5, i + 0.5) (randaugment._affine)."""
    interp = tl.load(lrow + 1)
    m00 = tl.load(lrow + 3)
    m01 = tl.load(lrow + 4)
    m02 = tl.load(lrow + 5)
    m10 = tl.load(lrow + 6)
    m11 = tl.load(lrow + 7)
    m12 = tl.load(lrow + 8)
    px = j.to(tl.float32) + 0.5
    py = i.to(tl.float32) + 0.5
    qx = m00 * px + m01 * py + m02
    qy = m10 * px + m11 * py + m12
    Wf = W.to(tl.float32)
    Hf = H.to(tl.float32)
    inside = (qx >= 0.0) & (qx < Wf) & (qy >= 0.0) & (qy < Hf)
    # the grid apply_torch builds (2 q / size - 1), then grid_sample's unnormalisation
    gx = tl.math.div_rn(2.0 * qx, tl.zeros_like(qx) + Wf) - 1.0
    gy = tl.math.div_rn(2.0 * qy, tl.zeros_like(qy) + Hf) - 1.0
    ix = ((gx + 1.0) * Wf - 1.0) * 0.5
    iy = ((gy + 1.0) * Hf - 1.0) * 0.5
    if interp == 0:
        # bilinear: border padding clips the source position first
        ix = tl.minimum(tl.maximum(ix, 0.0), Wf - 1.0)
        iy = tl.minimum(tl.maximum(iy, 0.0), Hf - 1.0)
        fx = tl.floor(ix)
        fy = tl.floor(iy)
        nw = (fx + 1.0 - ix) * (fy + 1.0 - iy)
        ne = (ix - fx) * (fy + 1.0 - iy)
        sw = (fx + 1.0 - ix) * (iy - fy)
        se = (ix - fx) * (iy - fy)
        xi = fx.to(tl.int32)
        yi = fy.to(tl.int32)
        # the right/lower neighbour past the edge has weight 0: clamp its address
        x0 = xi * sxw
        x1 = tl.minimum(xi + 1, W - 1) * sxw
        y0 = yi * sxh
        y1 = tl.minimum(yi + 1, H - 1) * sxh
        r = _bilinear(xb, x0, y0, x1, y1, nw, ne, sw, se, m)
        g = _bilinear(xb + sxc, x0, y0, x1, y1, nw, ne, sw, se, m)
        bl = _bilinear(xb + 2 * sxc, x0, y0, x1, y1, nw, ne, sw, se, m)
    else:
        r = _bicubic(xb, sxh, sxw, ix, iy, m, H, W)
        g = _bicubic(xb + sxc, sxh, sxw, ix, iy, m, H, W)
        bl = _bicubic(xb + 2 * sxc, sxh, sxw, ix, iy, m, H, W)
    r = tl.where(inside, tl.floor(tl.minimum(tl.maximum(r + 0.5, 0.0), 255.0)), _FILL0)
    g = tl.where(inside, tl.floor(tl.minimum(tl.maximum(g + 0.5, 0.0), 255.0)), _FILL1)
    bl = tl.where(inside, tl.floor(tl.minimum(tl.maximum(bl + 0.5, 0.0), 255.0)), _FILL2)
    return r, g, bl


@triton.jit
def _sharpen(ch, x, i, j, m, H, W, sxh, sxw, a):
    """ImageEnhance.Sharpness on one channel: blend with the 3x3 smoothed image (kernel
    [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded), whose border pixels are the input's."""
    im = tl.maximum(i - 1, 0) * sxh
    ic = i * sxh
    ip = tl.minimum(i + 1, H - 1) * sxh
    jm = tl.maximum(j - 1, 0) * sxw
    jc = j * sxw
    jp = tl.minimum(j + 1, W - 1) * sxw
    s = tl.load(ch + im + jm, mask=m, other=0).to(tl.float32)
    s += tl.load(ch + im + jc, mask=m, other=0).to(tl.float32)
    s += tl.load(ch + im + jp, mask=m, other=0).to(tl.float32)
    s += tl.load(ch + ic + jm, mask=m, other=0).to(tl.float32)
    s += tl.load(ch + ic + jp, mask=m, other=0).to(tl.float32)
    s += tl.load(ch + ip + jm, mask=m, other=0).to(tl.float32)
    s += tl.load(ch + ip + jc, mask=m, other=0).to(tl.float32)
    s += tl.load(ch + ip + jp, mask=m, other=0).to(tl.float32)
    s += 5.0 * x
    # s / 13 + 0.5 is never within 1/26 of a whole number, so any correctly summed float gives
    # the same floor as the reference's conv2d
    sm = tl.floor(tl.math.div_rn(s, tl.full(s.shape, 13.0, tl.float32)) + 0.5)
    interior = (i > 0) & (i < H - 1) & (j > 0) & (j < W - 1)
    return _blend(tl.where(interior, sm, x), x, a)


@triton.jit
def _cast(x, ty: tl.constexpr):
    """float32 -> ty, rounding to nearest even (as torch's .to()). bfloat16 is rounded by hand: the
    interpreter's own cast truncates, the GPU's rounds; this way both give torch's bits. Finite x."""
    if ty == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ty)


@triton.jit(do_not_specialize=["layer_off", "H", "W", "seed"])
def _apply_kernel(x_ptr, sxb, sxc, sxh, sxw, out_ptr, sob, soc, soh, sow, tab_ptr, tab_stride, layer_off, lut_ptr,
                  H, W, seed, mean0, mean1, mean2, std0, std1, std2,
                  HAS_OP: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (tile of BLOCK output pixels, sample), all three channels.

    x_ptr/sx*: layer input (uint8, any strides). out_ptr/so*: uint8 (FINAL=False) or the output
    dtype (FINAL=True). HAS_OP: apply the layer at table offset layer_off (else identity).
    FINAL: flip, normalise with mean*/std* (float32, 255 x ImageNet's), erase with Philox noise of
    stream ``seed`` at counter ((b * 3 + c) * H + row) * W + column, cast.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1)
    n = H * W
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    i = offs // W
    oj = offs % W               # output column
    row = tab_ptr + b * tab_stride
    j = oj                      # column the (unflipped) layer output is evaluated at
    if FINAL:
        flip = tl.load(row)
        j = tl.where(flip != 0.0, W - 1 - oj, oj)
    xb = x_ptr + b.to(tl.int64) * sxb
    pix = i * sxh + j * sxw
    r = tl.load(xb + pix, mask=m, other=0).to(tl.float32)
    g = tl.load(xb + sxc + pix, mask=m, other=0).to(tl.float32)
    bl = tl.load(xb + 2 * sxc + pix, mask=m, other=0).to(tl.float32)
    if HAS_OP:
        lrow = row + layer_off
        op = tl.load(lrow).to(tl.int32)
        arg = tl.load(lrow + 2)
        if (op == _ROTATE) | (op >= _SHEAR_X):
            r, g, bl = _affine(xb, sxc, sxh, sxw, lrow, i, j, m, H, W)
        elif op == _COLOR:
            # blend with PIL's grey (exact in integers)
            gray = ((19595 * r.to(tl.int32) + 38470 * g.to(tl.int32) + 7471 * bl.to(tl.int32) + 32768) >> 16).to(
                tl.float32)
            r = _blend(gray, r, arg)
            g = _blend(gray, g, arg)
            bl = _blend(gray, bl, arg)
        elif op == _SHARPNESS:
            r2 = _sharpen(xb, r, i, j, m, H, W, sxh, sxw, arg)
            g2 = _sharpen(xb + sxc, g, i, j, m, H, W, sxh, sxw, arg)
            bl = _sharpen(xb + 2 * sxc, bl, i, j, m, H, W, sxh, sxw, arg)
            r = r2
            g = g2
        elif op >= 0:
            lb = lut_ptr + b * 768
            r = tl.load(lb + r.to(tl.int32), mask=m, other=0).to(tl.float32)
            g = tl.load(lb + 256 + g.to(tl.int32), mask=m, other=0).to(tl.float32)
            bl = tl.load(lb + 512 + bl.to(tl.int32), mask=m, other=0).to(tl.float32)
    ob = out_ptr + b.to(tl.int64) * sob
    po = i * soh + oj * sow
    if FINAL:
        r = tl.math.div_rn(r - mean0, tl.zeros_like(r) + std0)
        g = tl.math.div_rn(g - mean1, tl.zeros_like(g) + std1)
        bl = tl.math.div_rn(bl - mean2, tl.zeros_like(bl) + std2)
        eh = tl.load(row + 3)
        if eh > 0.0:
            et = tl.load(row + 1)
            el = tl.load(row + 2)
            ew = tl.load(row + 4)
            fi = i.to(tl.float32)
            fj = oj.to(tl.float32)
            box = (fi >= et) & (fi < et + eh) & (fj >= el) & (fj < el + ew)
            ctr = b * 3 * n + offs
            r = tl.where(box, tl.randn(seed, ctr), r)
            g = tl.where(box, tl.randn(seed, ctr + n), g)
            bl = tl.where(box, tl.randn(seed, ctr + 2 * n), bl)
        ty = out_ptr.dtype.element_ty
        tl.store(ob + po, _cast(r, ty), mask=m)
        tl.store(ob + soc + po, _cast(g, ty), mask=m)
        tl.store(ob + 2 * soc + po, _cast(bl, ty), mask=m)
    else:
        tl.store(ob + po, r.to(tl.uint8), mask=m)
        tl.store(ob + soc + po, g.to(tl.uint8), mask=m)
        tl.store(ob + 2 * soc + po, bl.to(tl.uint8), mask=m)
