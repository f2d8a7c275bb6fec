"""What both pipelines share: the dataset listing, the epoch order, and every random draw.

One Python sampler owns the order and one geometry generator owns the augmentation draws, so the
DALI pipeline and the PIL fallback see the same samples in the same order with the same crop box,
flip, interpolation, RandAugment ops and erasing box.

Random draws are *counter based*: uniform number ``t`` of sample ``idx`` at epoch ``e`` is a hash
of ``(seed, e, idx, stream, t)`` (SplitMix64 finaliser). No generator state is carried between
samples, so the same sample at the same epoch gets the same crop wherever it lands (batch
position, shard, resumed run), and a whole batch is drawn with a few vectorised numpy lines.

Layout of one sample's uniform draws (stream ``_GEOMETRY``)::

    [0, 40)        RandomResizedCrop: 10 tries x (area, log-ratio, top, left)
    40             flip (u < 0.5)
    41             interpolation when "random" (u < 0.5: bilinear, else bicubic)
    then           RandAugment: per layer 6 draws (see randaugment.draw_params)
    then           random erasing: 1 (apply) + 10 tries x (area, log-ratio, top, left)
"""
from __future__ import annotations

import io
import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_GEOMETRY, _ORDER = 1, 2

RRC_TRIES = 10
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
ERASE_TRIES = 10
ERASE_AREA = (0.02, 1.0 / 3.0)
ERASE_LOG_RATIO = (math.log(0.3), math.log(1.0 / 0.3))
INTERP_BILINEAR, INTERP_BICUBIC = 0, 1


# ---------------------------------------------------------------------------------- dataset
@dataclass
class Dataset:
    """Image paths (relative to ``root``) with their class ids; classes = sorted folder names."""
    root: Path
    relpaths: list
    targets: np.ndarray
    classes: list

    def __len__(self):
        return len(self.relpaths)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.relpaths[i])


def list_dataset(root) -> Dataset:
    """An ImageFolder tree (class index = sorted class folder) or a file list ("relpath class" lines).

    A file list's paths are relative to the folder holding the list; classes are named by their ids.
    """
    if root is None or str(root) == "":
        raise ValueError("root must be an ImageFolder directory or a file list, got nothing")
    root = Path(root)
    if not root.exists():
        raise ValueError(f"root {str(root)!r} does not exist (expected an ImageFolder directory or a file list)")
    if root.is_file():
        rel, tgt = [], []
        with open(root) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.rsplit(None, 1)
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
                    raise ValueError(f"file list {str(root)!r} line {n}: expected 'relpath class_id', got {line!r}")
                rel.append(parts[0])
                tgt.append(int(parts[1]))
        if not rel:
            raise ValueError(f"file list {str(root)!r} names no images")
        n_cls = max(tgt) + 1
        return Dataset(root.parent, rel, np.asarray(tgt, np.int64), [str(c) for c in range(n_cls)])
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"root {str(root)!r} holds no class folders (expected root/<class>/<image>)")
    rel, tgt = [], []
    for ci, c in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / c, followlinks=True):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMG_EXTENSIONS):
                    rel.append(os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/"))
                    tgt.append(ci)
    if not rel:
        raise ValueError(f"root {str(root)!r} has class folders {classes[:5]} but no images "
                         f"with extensions {IMG_EXTENSIONS}")
    return Dataset(root, rel, np.asarray(tgt, np.int64), classes)


# ---------------------------------------------------------------------------------- counter RNG
def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (bijective avalanche on uint64; wrap-around arithmetic is intended)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, idx, count: int, stream: int = _GEOMETRY) -> np.ndarray:
    """float64 [n, count] in [0, 1): a pure function of (seed, epoch, sample idx, stream, column)."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _mix(np.full(idx.shape, np.uint64(seed & 0xFFFFFFFFFFFFFFFF)) + _GOLDEN)
        key = _mix(key ^ (np.uint64(epoch & 0xFFFFFFFFFFFFFFFF) * _GOLDEN))
        key = _mix(key ^ (np.uint64(stream) * np.uint64(0xD1B54A32D192ED03)))
        key = _mix(key ^ (idx * np.uint64(0xFF51AFD7ED558CCD)))
        ctr = (np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN)[None, :]
        bits = _mix(key[:, None] + ctr)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


# ---------------------------------------------------------------------------------- sampler
class EpochSampler:
    """Sample order for one shard: a permutation of the dataset drawn from (seed, epoch).

    drop_last=False: the permutation is padded by wrap-around to a multiple of num_shards, so every
    shard gets ceil(N / num_shards) samples and every sample is seen at least once per epoch across
    shards (exactly once when N is divisible); the last batch may be short.
    drop_last=True: the tail of the permutation is dropped to a multiple of num_shards, and each
    shard drops its own last incomplete batch.
    Shard ``s`` takes positions s, s + num_shards, ... of the (padded) permutation.
    """

    def __init__(self, n: int, batch_size: int, shard_id=0, num_shards=1, seed=0, drop_last=True, shuffle=True):
        if n < 1:
            raise ValueError(f"the dataset is empty (n={n})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_shards < 1 or not 0 <= shard_id < num_shards:
            raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, num_shards={num_shards}")
        self.n, self.batch_size, self.shard_id, self.num_shards = n, batch_size, shard_id, num_shards
        self.seed, self.drop_last, self.shuffle = seed, drop_last, shuffle
        if drop_last:
            self.per_shard = n // num_shards
            self.num_batches = self.per_shard // batch_size
        else:
            self.per_shard = -(-n // num_shards)
            self.num_batches = -(-self.per_shard // batch_size)
        if self.num_batches == 0:
            raise ValueError(f"{n} images over {num_shards} shard(s) give no full batch of {batch_size} "
                             f"with drop_last=True: lower batch_size or set drop_last=False")

    def order(self, epoch: int) -> np.ndarray:
        """Dataset indices this shard visits in ``epoch`` (length num_batches * batch_size or less)."""
        if self.shuffle:
            perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch, _ORDER]))).permutation(self.n)
        else:
            perm = np.arange(self.n)
        total = self.per_shard * self.num_shards
        if total > self.n:
            perm = np.concatenate([perm, perm[: total - self.n]])
        mine = perm[:total][self.shard_id :: self.num_shards]
        if self.drop_last:
            mine = mine[: self.num_batches * self.batch_size]
        return mine.astype(np.int64)

    def batches(self, epoch: int, start_batch: int = 0):
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch={start_batch} outside [0, {self.num_batches}]")
        order = self.order(epoch)
        B = self.batch_size
        for b in range(start_batch, self.num_batches):
            yield order[b * B : (b + 1) * B]


# ---------------------------------------------------------------------------------- geometry
def random_resized_crop(u: np.ndarray, heights, widths):
    """timm v0.4.5 RandomResizedCrop.get_params, vectorised: -> int64 [n, 4] (top, left, height, width).

    u: [n, 40] uniforms (10 tries of area, log-ratio, top, left). The first try that fits wins;
    otherwise the centre crop clamped to the ratio range (timm's fallback).
    """
    H = np.asarray(heights, np.float64)[:, None]
    W = np.asarray(widths, np.float64)[:, None]
    u = u[:, : 4 * RRC_TRIES].reshape(-1, RRC_TRIES, 4)
    area = H * W * (RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * u[..., 0])
    lr0, lr1 = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    ratio = np.exp(lr0 + (lr1 - lr0) * u[..., 1])
    w = np.round(np.sqrt(area * ratio))
    h = np.round(np.sqrt(area / ratio))
    ok = (w <= W) & (h <= H) & (w >= 1) & (h >= 1)
    top = np.floor(u[..., 2] * (H - h + 1))
    left = np.floor(u[..., 3] * (W - w + 1))
    first = np.argmax(ok, axis=1)
    any_ok = ok.any(axis=1)
    r = np.arange(len(first))
    out = np.stack([top[r, first], left[r, first], h[r, first], w[r, first]], axis=1)
    # centre fallback
    H1, W1 = H[:, 0], W[:, 0]
    in_ratio = W1 / H1
    fw = np.where(in_ratio < RRC_RATIO[0], W1, np.where(in_ratio > RRC_RATIO[1], np.round(H1 * RRC_RATIO[1]), W1))
    fh = np.where(in_ratio < RRC_RATIO[0], np.round(W1 / RRC_RATIO[0]), H1)
    fh, fw = np.clip(fh, 1, H1), np.clip(fw, 1, W1)
    fb = np.stack([(H1 - fh) // 2, (W1 - fw) // 2, fh, fw], axis=1)
    out = np.where(any_ok[:, None], out, fb)
    return out.astype(np.int64)


def erasing_boxes(u: np.ndarray, size: int, probability: float):
    """timm RandomErasing (mode 'pixel', count 1) boxes on the size x size output.

    u: [n, 41]. -> (apply bool [n], int64 [n, 4] (top, left, height, width)); no box -> apply False.
    """
    n = u.shape[0]
    apply = u[:, 0] < probability
    t = u[:, 1 : 1 + 4 * ERASE_TRIES].reshape(n, ERASE_TRIES, 4)
    area = size * size * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * t[..., 0])
    ratio = np.exp(ERASE_LOG_RATIO[0] + (ERASE_LOG_RATIO[1] - ERASE_LOG_RATIO[0]) * t[..., 1])
    h = np.round(np.sqrt(area * ratio))
    w = np.round(np.sqrt(area / ratio))
    ok = (w < size) & (h < size) & (w >= 1) & (h >= 1)
    top = np.floor(t[..., 2] * (size - h + 1))
    left = np.floor(t[..., 3] * (size - w + 1))
    first = np.argmax(ok, axis=1)
    r = np.arange(n)
    box = np.stack([top[r, first], left[r, first], h[r, first], w[r, first]], axis=1).astype(np.int64)
    return apply & ok.any(axis=1), box


def draw_geometry(seed, epoch, idx, heights, widths, *, image_size, interpolation="random",
                  randaugment=None, random_erasing=0.25):
    """All per-sample random choices of a training batch. Returns a dict of numpy arrays:

    crop int64 [n,4] (top, left, height, width) pixels of the decoded image; boxes float32 [n,4]
    the same normalised by (H, W, H, W); flips bool [n]; interp int8 [n]; RandAugment params
    (ra_op int8 [n,L], ra_arg float64 [n,L], ra_interp int8 [n,L]; op -1 = layer did not fire);
    erase bool [n], erase_box int64 [n,4].
    """
    from . import randaugment as ra

    spec = ra.parse(randaugment) if isinstance(randaugment, (str, type(None))) else randaugment
    n_ra = 0 if spec is None else ra.DRAWS_PER_LAYER * spec.num_layers
    n_u = 4 * RRC_TRIES + 2 + n_ra + 1 + 4 * ERASE_TRIES
    u = uniforms(seed, epoch, idx, n_u)
    H = np.asarray(heights, np.int64)
    W = np.asarray(widths, np.int64)
    crop = random_resized_crop(u, H, W)
    boxes = (crop / np.stack([H, W, H, W], axis=1)).astype(np.float32)
    flips = u[:, 40] < 0.5
    if interpolation == "random":
        interp = np.where(u[:, 41] < 0.5, INTERP_BILINEAR, INTERP_BICUBIC).astype(np.int8)
    else:
        interp = np.full(len(H), INTERP_BICUBIC if interpolation == "bicubic" else INTERP_BILINEAR, np.int8)
    out = dict(crop=crop, boxes=boxes, flips=flips, interp=interp, sizes=np.stack([H, W], 1))
    base = 42
    if spec is not None:
        out.update(ra.draw_params(spec, u[:, base : base + n_ra]))
    base += n_ra
    out["erase"], out["erase_box"] = erasing_boxes(u[:, base:], image_size, random_erasing)
    return out


def eval_geometry(heights, widths, image_size, crop_pct):
    """timm's eval transform, as integers: Resize(int(image_size / crop_pct)) of the shorter side
    (the longer side truncated, torchvision's rule), then CenterCrop(image_size) at
    round((side - image_size) / 2). -> int64 [n, 4] (resized_h, resized_w, crop_top, crop_left)."""
    H = np.asarray(heights, np.int64)
    W = np.asarray(widths, np.int64)
    scale = int(math.floor(image_size / crop_pct))
    oh = np.where(W <= H, (scale * H / W).astype(np.int64), scale)
    ow = np.where(W <= H, scale, (scale * W / H).astype(np.int64))
    top = np.round((oh - image_size) / 2.0).astype(np.int64)
    left = np.round((ow - image_size) / 2.0).astype(np.int64)
    return np.stack([oh, ow, top, left], axis=1)


def crop_to_output_affine(crop, size_hw, image_size):
    """T [n,3,3]: full-image normalised (x=u_col, y=v_row, 1) -> crop-output pixel coords (x, y, 1).

    x_pix = (u - left/W) / (w/W) * image_size, y_pix = (v - top/H) / (h/H) * image_size.
    """
    crop = np.asarray(crop, np.float64)
    H, W = np.asarray(size_hw, np.float64).T
    top, left, h, w = crop.T
    T = np.zeros((len(crop), 3, 3))
    T[:, 0, 0] = image_size * W / w
    T[:, 0, 2] = -image_size * left / w
    T[:, 1, 1] = image_size * H / h
    T[:, 1, 2] = -image_size * top / h
    T[:, 2, 2] = 1.0
    return T


def warp_label_maps(values, indices, M_out, crop, size_hw, image_size):
    """Warp full-image label maps by an image affine given in crop-output pixel coordinates.

    The image op is out(x) = in(M x) with M [n,3,3] mapping output pixel coords (continuous,
    origin at the top-left corner, PIL's convention) to input pixel coords of the crop. The label
    map covers the whole decoded image, and the loss crops it with T (crop_to_output_affine). The
    warped map L' must satisfy L'(T^-1 x) = L(T^-1 M x) for every output x, i.e. in the map's
    full-image normalised frame L'(p) = L(T^-1 M T p): the affine conjugated by the crop.
    Sampling is nearest-neighbour at each label cell's centre; cells whose source falls outside
    the image get value 0 (= logit of an absent class) and the nearest index (as the reference's
    scipy.ndimage order-0 warp with cval 0 for values, mode "nearest" for indices).
    Samples whose M is the identity are returned untouched. values/indices: [n,k,S,S] numpy.
    """
    M_out = np.asarray(M_out, np.float64)
    n, k, S, _ = values.shape
    ident = np.all(np.abs(M_out - np.eye(3)[None]) < 1e-12, axis=(1, 2))
    if ident.all():
        return values, indices
    values, indices = values.copy(), indices.copy()
    sel = np.nonzero(~ident)[0]
    T = crop_to_output_affine(np.asarray(crop)[sel], np.asarray(size_hw)[sel], image_size)
    G = np.linalg.inv(T) @ M_out[sel] @ T  # [m,3,3]
    c = (np.arange(S) + 0.5) / S
    gy, gx = np.meshgrid(c, c, indexing="ij")
    P = np.stack([gx.ravel(), gy.ravel(), np.ones(S * S)])  # [3, S*S] (x, y, 1)
    q = G @ P  # [m, 3, S*S]
    col = np.floor(q[:, 0] * S).astype(np.int64)
    row = np.floor(q[:, 1] * S).astype(np.int64)
    inside = (col >= 0) & (col < S) & (row >= 0) & (row < S)
    flat = (np.clip(row, 0, S - 1) * S + np.clip(col, 0, S - 1))[:, None, :]  # [m, 1, S*S]
    m = len(sel)
    v = np.take_along_axis(values[sel].reshape(m, k, S * S), flat, axis=2)
    v[np.broadcast_to(~inside[:, None, :], v.shape)] = 0
    values[sel] = v.reshape(m, k, S, S)
    indices[sel] = np.take_along_axis(indices[sel].reshape(m, k, S * S), flat, axis=2).reshape(m, k, S, S)
    return values, indices


# ---------------------------------------------------------------------------------- image files
_warned = set()
_warn_lock = threading.Lock()
_TRUNCATED_LOCK = threading.Lock()


def warn_once(path: str, why: str):
    with _warn_lock:
        if path in _warned:
            return
        _warned.add(path)
    warnings.warn(f"skipping unreadable image {path!r}: {why}; another sample takes its place", RuntimeWarning,
                  stacklevel=3)


def pil_open_rgb(data_or_path):
    """Decode fully with PIL to RGB (any mode: L, P, CMYK, RGBA, I;16...); truncated JPEGs are
    decoded as far as they go. Raises on files PIL cannot decode at all."""
    from PIL import Image, ImageFile

    def src():
        return io.BytesIO(data_or_path) if isinstance(data_or_path, (bytes, bytearray, memoryview)) else data_or_path

    im = Image.open(src())
    try:
        im.load()
    except OSError:
        # a truncated file: decode what is there (the rest is grey); a garbage file still raises.
        # LOAD_TRUNCATED_IMAGES is a module global: flip it under a lock (the DALI producer decodes
        # fallbacks in threads), on a freshly opened image.
        im.close()
        with _TRUNCATED_LOCK:
            prev = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = True
            try:
                im = Image.open(src())
                im.load()
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = prev
    with im:
        if im.mode == "RGB":
            return im.copy()
        if im.mode in ("RGBA", "LA", "P", "PA"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(bg, im).convert("RGB")
        if im.mode.startswith("I") or im.mode == "F":
            a = np.asarray(im, dtype=np.float64)
            a = np.clip(a / max(a.max(), 1.0) * 255.0, 0, 255).astype(np.uint8)
            return Image.fromarray(a, "L").convert("RGB")
        return im.convert("RGB")


def _jpeg_complete(data: bytes) -> bool:
    tail = data[-64:].rstrip(b"\x00\r\n \t")
    return tail.endswith(b"\xff\xd9")


def probe_paths(paths):
    """probe_bytes for each file (run in a worker process by the DALI backend, so that first
    sightings do not queue on the training process's GIL): a list of (height, width, kind), or
    None where the file cannot be read or probed (the caller retries it and warns)."""
    out = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                out.append(probe_bytes(f.read()))
        except Exception:  # noqa: BLE001 - reported by the caller's own attempt
            out.append(None)
    return out


def probe_bytes(data: bytes):
    """Cheap header look: -> (height, width, kind) with kind "jpeg" (hand to the GPU decoder as is),
    "fallback" (decode with PIL: PNG/GIF/CMYK/truncated/odd modes) or raises when PIL cannot read
    even the header."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        fmt, mode = im.format, im.mode
    if w < 1 or h < 1:
        raise ValueError(f"image has size {w}x{h}")
    ok = fmt == "JPEG" and mode in ("RGB", "L") and _jpeg_complete(data)
    return h, w, "jpeg" if ok else "fallback"
