"""RandAugment as timm v0.4.5 does it (the reference's ``rand-m9-mstd0.5-inc1``), in two engines
that share one parameter draw:

* ``apply_pil``: PIL primitives, one image at a time (the PIL DataLoader fallback, run in workers);
* ``apply_torch``: batched tensor ops on any device, grouping the samples of a batch by the op
  each layer chose: the reference for the Triton kernels of ra_kernel.py (which the DALI pipeline
  runs on the GPU) and the engine of CPU runs.

Semantics (timm ``RandAugment`` / ``AugmentOp``): ``num_layers`` ops drawn uniformly *with
replacement* from the op list; each fires with p = 0.5; magnitude N(m, mstd) clipped to [0, 10],
drawn per op; a random sign for the signed ops; geometric ops interpolate randomly between bilinear
and bicubic and fill with the ImageNet mean (124, 116, 104). The spatial ops (Rotate, ShearX/Y,
TranslateXRel/YRel) are affines given as the 3x3 matrix M that maps *output* pixel coordinates to
*input* pixel coordinates (continuous, origin at the image corner: PIL's ``Image.transform``
convention); the loader uses the same M to warp the label maps (sampling.warp_label_maps).

Our pipelines apply RandAugment to the resized crop, as timm's own order does (RRC -> flip ->
RandAugment); the reference applies it to the full flipped image before the crop. The ops and their
parameters are drawn identically, but the spatial ops act in the crop's frame: a translation is
0.45*m/10 of the *crop* side, and rotations/shears pivot on the crop centre rather than the image
centre. The label map follows exactly either way, because its warp is the crop-frame affine
conjugated into the full-image frame (sampling.warp_label_maps). RandAugment runs before the flip
here; with symmetric random signs the distribution is the same as flipping first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

FILL = (124, 116, 104)
MAX_LEVEL = 10.0
DRAWS_PER_LAYER = 6  # op, fire, gauss x2, sign, interpolation

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
(AUTOCONTRAST, EQUALIZE, INVERT, ROTATE, POSTERIZE, SOLARIZE, SOLARIZE_ADD, COLOR, CONTRAST, BRIGHTNESS,
 SHARPNESS, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y) = range(len(OPS))
GEOMETRIC = (ROTATE, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y)
ENHANCE = (COLOR, CONTRAST, BRIGHTNESS, SHARPNESS)


@dataclass(frozen=True)
class RandAugmentSpec:
    magnitude: float = 9.0
    num_layers: int = 2
    magnitude_std: float = 0.5
    increasing: bool = True
    prob: float = 0.5


def parse(spec):
    """'rand-m9-mstd0.5-inc1' (timm's grammar: m, n, mstd, inc) -> RandAugmentSpec; None/'' -> None."""
    if spec is None or spec == "" or spec is False:
        return None
    if isinstance(spec, RandAugmentSpec):
        return spec
    parts = str(spec).split("-")
    if parts[0] != "rand":
        raise ValueError(f"randaugment must look like 'rand-m9-mstd0.5-inc1', got {spec!r}")
    kw = {}
    for p in parts[1:]:
        try:
            if p.startswith("mstd"):
                kw["magnitude_std"] = float(p[4:])
            elif p.startswith("inc"):
                kw["increasing"] = bool(int(p[3:]))
            elif p.startswith("m"):
                kw["magnitude"] = float(p[1:])
            elif p.startswith("n"):
                kw["num_layers"] = int(p[1:])
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"randaugment {spec!r}: cannot read section {p!r} (known: m, n, mstd, inc)") from None
    return RandAugmentSpec(**kw)


def draw_params(spec: RandAugmentSpec, u: np.ndarray) -> dict:
    """u: [n, 6 * num_layers] uniforms -> ra_op int8 [n,L] (-1: layer did not fire), ra_arg float64
    [n,L] (the op's argument: degrees, shear factor, translate fraction, bits, threshold, add,
    enhance factor), ra_interp int8 [n,L] (0 bilinear, 1 bicubic)."""
    n, L = u.shape[0], spec.num_layers
    u = u.reshape(n, L, DRAWS_PER_LAYER)
    op = np.minimum(np.floor(u[..., 0] * len(OPS)), len(OPS) - 1).astype(np.int64)
    fire = u[..., 1] <= spec.prob
    mag = np.full((n, L), float(spec.magnitude))
    if spec.magnitude_std > 0:
        z = np.sqrt(-2.0 * np.log1p(-u[..., 2])) * np.cos(2.0 * math.pi * u[..., 3])
        mag = mag + spec.magnitude_std * z
    mag = np.clip(mag, 0.0, MAX_LEVEL)
    lvl = mag / MAX_LEVEL
    sign = np.where(u[..., 4] > 0.5, -1.0, 1.0)
    arg = np.zeros((n, L))
    arg = np.where(op == ROTATE, 30.0 * lvl * sign, arg)
    arg = np.where((op == SHEAR_X) | (op == SHEAR_Y), 0.3 * lvl * sign, arg)
    arg = np.where((op == TRANSLATE_X) | (op == TRANSLATE_Y), 0.45 * lvl * sign, arg)
    arg = np.where(op == SOLARIZE_ADD, np.floor(lvl * 110.0), arg)
    enh = np.isin(op, ENHANCE)
    if spec.increasing:
        arg = np.where(op == POSTERIZE, 4 - np.floor(lvl * 4), arg)
        arg = np.where(op == SOLARIZE, 256 - np.floor(lvl * 256), arg)
        arg = np.where(enh, 1.0 + sign * lvl * 0.9, arg)
    else:
        arg = np.where(op == POSTERIZE, np.floor(lvl * 4), arg)
        arg = np.where(op == SOLARIZE, np.floor(lvl * 256), arg)
        arg = np.where(enh, lvl * 1.8 + 0.1, arg)
    interp = (u[..., 5] >= 0.5).astype(np.int8)
    return dict(ra_op=np.where(fire, op, -1).astype(np.int8), ra_arg=arg, ra_interp=interp)


def affine_matrix(op: int, arg: float, width: int, height: int) -> np.ndarray:
    """3x3 M (output pixel -> input pixel, continuous coords) of a spatial op; identity otherwise."""
    M = np.eye(3)
    if op == SHEAR_X:
        M[0, 1] = arg
    elif op == SHEAR_Y:
        M[1, 0] = arg
    elif op == TRANSLATE_X:
        M[0, 2] = arg * width
    elif op == TRANSLATE_Y:
        M[1, 2] = arg * height
    elif op == ROTATE:
        # PIL Image.rotate(deg): rotation about the centre (w/2, h/2), counter-clockwise on screen
        a = -math.radians(arg)
        c, s = round(math.cos(a), 15), round(math.sin(a), 15)
        cx, cy = width / 2.0, height / 2.0
        M[0] = [c, s, c * -cx + s * -cy + cx]
        M[1] = [-s, c, -s * -cx + c * -cy + cy]
    return M


def affine_matrices(ops, args, width, height) -> np.ndarray:
    """[n,3,3]: affine_matrix of each (op, arg), vectorised; identity for the other ops. Equal bit for
    bit to affine_matrix (rotations go through it: their cos/sin are rounded to 15 decimals)."""
    ops = np.asarray(ops).reshape(-1)
    args = np.asarray(args, np.float64).reshape(-1)
    M = np.repeat(np.eye(3)[None], len(ops), axis=0)
    for op, r, c, scale in ((SHEAR_X, 0, 1, 1), (SHEAR_Y, 1, 0, 1), (TRANSLATE_X, 0, 2, width),
                            (TRANSLATE_Y, 1, 2, height)):
        sel = ops == op
        M[sel, r, c] = args[sel] * scale if scale != 1 else args[sel]
    for b in np.nonzero(ops == ROTATE)[0]:
        M[b] = affine_matrix(ROTATE, float(args[b]), width, height)
    return M


def composed_affine(ra_op, ra_arg, width, height) -> np.ndarray:
    """[n,3,3]: the product M_1 M_2 ... of the fired spatial ops (output -> input of the chain)."""
    ra_op = np.asarray(ra_op)
    n, L = ra_op.shape
    out = np.repeat(np.eye(3)[None], n, axis=0)
    for b, l in zip(*np.nonzero(np.isin(ra_op, GEOMETRIC))):
        out[b] = out[b] @ affine_matrix(int(ra_op[b, l]), float(ra_arg[b, l]), width, height)
    return out


# ------------------------------------------------------------------------------------------ PIL
def apply_pil(img, ra_op, ra_arg, ra_interp):
    """Apply the drawn layers (one sample's rows of draw_params) to an RGB PIL image."""
    from PIL import Image, ImageEnhance, ImageOps

    for op, arg, ip in zip(ra_op, ra_arg, ra_interp):
        op = int(op)
        if op < 0:
            continue
        resample = Image.BICUBIC if ip else Image.BILINEAR
        if op in GEOMETRIC:
            M = affine_matrix(op, float(arg), img.size[0], img.size[1])
            img = img.transform(img.size, Image.AFFINE, tuple(M[:2].ravel()), resample=resample, fillcolor=FILL)
        elif op == AUTOCONTRAST:
            img = ImageOps.autocontrast(img)
        elif op == EQUALIZE:
            img = ImageOps.equalize(img)
        elif op == INVERT:
            img = ImageOps.invert(img)
        elif op == POSTERIZE:
            bits = int(arg)
            if bits < 8:  # ImageOps.posterize refuses 0 bits (which timm's increasing op can draw)
                mask = ~(2 ** (8 - max(bits, 0)) - 1) & 0xFF
                img = img.point([i & mask for i in range(256)] * len(img.getbands()))
        elif op == SOLARIZE:
            img = ImageOps.solarize(img, int(arg))
        elif op == SOLARIZE_ADD:
            add = int(arg)
            lut = [min(255, i + add) if i < 128 else i for i in range(256)]
            img = img.point(lut * len(img.getbands()))
        elif op == COLOR:
            img = ImageEnhance.Color(img).enhance(float(arg))
        elif op == CONTRAST:
            img = ImageEnhance.Contrast(img).enhance(float(arg))
        elif op == BRIGHTNESS:
            img = ImageEnhance.Brightness(img).enhance(float(arg))
        elif op == SHARPNESS:
            img = ImageEnhance.Sharpness(img).enhance(float(arg))
    return img


# ------------------------------------------------------------------------------------------ torch
_CONST = {}


def to_device(a, device, dtype=None):
    """numpy -> tensor on ``device`` without a host sync (pinned + non_blocking on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype is not None:
        t = t.to(dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _const(name, values, device, dtype=torch.float32):
    key = (name, str(device), dtype)
    if key not in _CONST:
        _CONST[key] = to_device(np.asarray(values, np.float64), device, dtype)
    return _CONST[key]


def _blend(degenerate, x, factor):
    # PIL Image.blend on uint8: in1 + a * (in2 - in1), clipped, truncated
    return torch.clamp(degenerate + factor * (x - degenerate), 0, 255).floor()


def _gray(x):
    # PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16
    g = (x[:, 0] * 19595 + x[:, 1] * 38470 + x[:, 2] * 7471 + 32768) / 65536.0
    return g.floor().unsqueeze(1)


def _equalize(x):
    n, c, H, W = x.shape
    xi = x.reshape(n * c, H * W).long()
    hist = torch.zeros(n * c, 256, device=x.device, dtype=torch.int64)
    hist.scatter_add_(1, xi, torch.ones_like(xi))
    last = hist.gather(1, xi.max(1, keepdim=True).values)
    step = (H * W - last) // 255
    nonzero = (hist > 0).sum(1, keepdim=True)
    cum = torch.cumsum(hist, 1) - hist
    safe = torch.clamp(step, min=1)
    lut = torch.clamp((safe // 2 + cum) // safe, max=255)
    keep = (nonzero <= 1) | (step == 0)
    lut = torch.where(keep, torch.arange(256, device=x.device).expand_as(lut), lut)
    return lut.gather(1, xi).reshape(n, c, H, W).to(x.dtype)


def _autocontrast(x):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = 255.0 / torch.clamp(hi - lo, min=1)
    y = torch.clamp(torch.trunc(x * scale - lo * scale), 0, 255)
    return torch.where(hi > lo, y, x)


def _sharpness(x, factor):
    k = _const("smooth", np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13.0, x.device, x.dtype)
    sm = torch.nn.functional.conv2d(x.reshape(-1, 1, *x.shape[2:]), k[None, None]).reshape(
        x.shape[0], x.shape[1], x.shape[2] - 2, x.shape[3] - 2)
    deg = x.clone()
    deg[:, :, 1:-1, 1:-1] = torch.clamp(sm + 0.5, 0, 255).floor()
    return _blend(deg, x, factor)


def _affine(x, M, bicubic):
    """out(p) = in(M p) in pixel coords, fill outside; M [n,3,3] float64 numpy."""
    n, c, H, W = x.shape
    Mt = to_device(M, x.device, torch.float32)
    ys = torch.arange(H, device=x.device, dtype=torch.float32) + 0.5
    xs = torch.arange(W, device=x.device, dtype=torch.float32) + 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    P = torch.stack([gx, gy, torch.ones_like(gx)], -1).reshape(-1, 3)  # [HW, 3]
    Q = torch.einsum("nij,pj->npi", Mt, P)  # [n, HW, 3]
    qx, qy = Q[..., 0], Q[..., 1]
    inside = ((qx >= 0) & (qx < W) & (qy >= 0) & (qy < H)).reshape(n, 1, H, W)
    grid = torch.stack([2 * qx / W - 1, 2 * qy / H - 1], -1).reshape(n, H, W, 2)
    y = torch.nn.functional.grid_sample(x, grid, mode="bicubic" if bicubic else "bilinear",
                                        padding_mode="border", align_corners=False)
    y = torch.clamp(y + 0.5, 0, 255).floor()
    fill = _const("fill", FILL, x.device, x.dtype).view(1, 3, 1, 1)
    return torch.where(inside, y, fill)


def _apply_group(x, op, arg, bicubic):
    """One op on a sub-batch x [m,3,H,W] (float, whole numbers in [0,255]); arg float64 numpy [m]."""
    dev, dt = x.device, x.dtype
    a = to_device(np.asarray(arg, np.float64), dev, dt).view(-1, 1, 1, 1)
    if op in GEOMETRIC:
        H, W = x.shape[2:]
        M = np.stack([affine_matrix(op, float(v), W, H) for v in arg])
        return _affine(x, M, bicubic)
    if op == AUTOCONTRAST:
        return _autocontrast(x)
    if op == EQUALIZE:
        return _equalize(x)
    if op == INVERT:
        return 255.0 - x
    if op == POSTERIZE:
        q = torch.pow(2.0, 8.0 - torch.clamp(a, 0, 8))
        return torch.where(a >= 8, x, torch.floor(x / q) * q)
    if op == SOLARIZE:
        return torch.where(x >= a, 255.0 - x, x)
    if op == SOLARIZE_ADD:
        return torch.where(x < 128, torch.clamp(x + a, max=255), x)
    if op == COLOR:
        return _blend(_gray(x).expand_as(x), x, a)
    if op == CONTRAST:
        mean = torch.floor(_gray(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
        return _blend(mean.expand_as(x), x, a)
    if op == BRIGHTNESS:
        return _blend(torch.zeros_like(x), x, a)
    if op == SHARPNESS:
        return _sharpness(x, a)
    raise ValueError(f"unknown RandAugment op {op}")


def apply_torch(x, ra_op, ra_arg, ra_interp):
    """Batched RandAugment on x [n,3,H,W] float (whole numbers in [0,255]) on any device.

    Layer by layer, the samples that chose the same op are gathered, processed together and
    scattered back (the spatial ops share one group per interpolation: only their matrix differs);
    samples whose layer did not fire are untouched.
    """
    ra_op = np.asarray(ra_op)
    ra_arg = np.asarray(ra_arg)
    ra_interp = np.asarray(ra_interp)
    for l in range(ra_op.shape[1]):
        ops = ra_op[:, l]
        # all spatial ops are one grid_sample with a per-sample matrix: one group per interpolation
        geo = np.isin(ops, GEOMETRIC)
        for bic in (0, 1):
            rows = np.nonzero(geo & (ra_interp[:, l] == bic))[0]
            if len(rows):
                H, W = x.shape[2:]
                M = np.stack([affine_matrix(int(ops[r]), float(ra_arg[r, l]), W, H) for r in rows])
                ridx = to_device(rows.astype(np.int64), x.device)
                x[ridx] = _affine(x[ridx], M, bool(bic))
        for op in np.unique(ops[(ops >= 0) & ~geo]):
            rows = np.nonzero(ops == op)[0]
            ridx = to_device(rows.astype(np.int64), x.device)
            x[ridx] = _apply_group(x[ridx], int(op), ra_arg[rows, l], False)
    return x

