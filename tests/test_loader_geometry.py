"""Sampler, counter RNG, RandomResizedCrop, label-map warp and RandAugment engines (no DALI needed)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tokenlabel.dataloading import randaugment as ra
from tokenlabel.dataloading.sampling import (EpochSampler, crop_to_output_affine, draw_geometry,
                                             random_resized_crop, uniforms, warp_label_maps)


def _seed(gen):
    return int(torch.randint(0, 2**31 - 1, (1,), generator=gen))


def _rrc_scalar(u, H, W):
    # timm v0.4.5 RandomResizedCropAndInterpolation.get_params with the given uniforms
    area = H * W
    for t in range(10):
        a, r, ui, uj = u[4 * t: 4 * t + 4]
        target = (0.08 + 0.92 * a) * area
        ar = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r)
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 1 <= w <= W and 1 <= h <= H:
            return int(ui * (H - h + 1)), int(uj * (W - w + 1)), h, w
    in_ratio = W / H
    if in_ratio < 3 / 4:
        w, h = W, int(round(W / (3 / 4)))
    elif in_ratio > 4 / 3:
        h, w = H, int(round(H * 4 / 3))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


def test_rrc_matches_timm_get_params(gen):
    s = _seed(gen)
    rng = np.random.default_rng(s)
    n = 400
    H = rng.integers(1, 600, n)
    W = rng.integers(1, 600, n)
    W[:20] = H[:20] * 5  # extreme ratios exercise the centre fallback
    u = uniforms(s, 3, np.arange(n), 40)
    got = random_resized_crop(u, H, W)
    want = np.array([_rrc_scalar(u[i], H[i], W[i]) for i in range(n)])
    np.testing.assert_array_equal(got, want)
    assert (got[:, 0] >= 0).all() and (got[:, 0] + got[:, 2] <= H).all()
    assert (got[:, 1] >= 0).all() and (got[:, 1] + got[:, 3] <= W).all()


def test_uniforms_are_per_sample_pure(gen):
    s = _seed(gen)
    idx = np.array([5, 99, 3, 7])
    a = uniforms(s, 2, idx, 8)
    b = uniforms(s, 2, idx[::-1], 8)[::-1]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, uniforms(s, 3, idx, 8))
    big = uniforms(s, 0, np.arange(20000), 4)
    assert abs(big.mean() - 0.5) < 0.01 and big.min() >= 0 and big.max() < 1


@pytest.mark.parametrize("n,shards,B,drop", [(103, 4, 8, False), (96, 3, 8, False), (103, 4, 8, True)])
def test_sampler_partition_and_resume(gen, n, shards, B, drop):
    s = _seed(gen)
    orders = [EpochSampler(n, B, shard_id=i, num_shards=shards, seed=s, drop_last=drop).order(4) for i in range(shards)]
    assert len({len(o) for o in orders}) == 1
    allids = np.concatenate(orders)
    if drop:
        assert len(np.unique(allids)) == len(allids)
    else:
        assert set(allids.tolist()) == set(range(n))
        if n % shards == 0:
            assert len(allids) == n
    sm = EpochSampler(n, B, shard_id=1, num_shards=shards, seed=s, drop_last=drop)
    full = list(sm.batches(4))
    assert len(full) == sm.num_batches
    resumed = list(sm.batches(4, start_batch=2))
    assert all(np.array_equal(a, b) for a, b in zip(full[2:], resumed)) and len(resumed) == len(full) - 2
    again = EpochSampler(n, B, shard_id=1, num_shards=shards, seed=s, drop_last=drop)
    assert np.array_equal(again.order(4), sm.order(4))
    assert not np.array_equal(sm.order(5), sm.order(4))


def test_draw_geometry_distribution(gen):
    s = _seed(gen)
    n = 4000
    H, W = np.full(n, 300), np.full(n, 400)
    g = draw_geometry(s, 0, np.arange(n), H, W, image_size=224, randaugment="rand-m9-mstd0.5-inc1")
    area = g["boxes"][:, 2] * g["boxes"][:, 3]
    assert 0.075 <= area.min() and area.max() <= 1.0 and 0.38 < area.mean() < 0.5
    assert 0.45 < g["flips"].mean() < 0.55 and 0.45 < g["interp"].mean() < 0.55
    fired = g["ra_op"] >= 0
    assert 0.45 < fired.mean() < 0.55
    counts = np.bincount(g["ra_op"][fired], minlength=15)
    assert counts.min() > 0.5 * counts.mean()
    assert 0.2 < g["erase"].mean() < 0.3
    eb = g["erase_box"][g["erase"]]
    assert (eb[:, 0] + eb[:, 2] <= 224).all() and (eb[:, 1] + eb[:, 3] <= 224).all()


def test_label_warp_identity_and_translate(gen):
    s = _seed(gen)
    rng = np.random.default_rng(s)
    S = 8
    v = rng.standard_normal((1, 2, S, S)).astype(np.float16)
    i = rng.integers(0, 50, (1, 2, S, S))
    crop = np.array([[0, 0, 80, 80]])
    hw = np.array([[80, 80]])
    v2, i2 = warp_label_maps(v, i, np.eye(3)[None], crop, hw, 40)
    assert v2 is v and i2 is i
    # translate by one label cell to the right in output pixels: out(x) = in(x + 5)
    M = ra.affine_matrix(ra.TRANSLATE_X, 5 / 40, 40, 40)[None]
    v3, i3 = warp_label_maps(v, i, M, crop, hw, 40)
    np.testing.assert_array_equal(v3[0, :, :, :-1], v[0, :, :, 1:])
    np.testing.assert_array_equal(i3[0, :, :, :-1], i[0, :, :, 1:])
    assert (v3[0, :, :, -1] == 0).all()


def _pattern(S, h, w, rng):
    """Image whose pixel colour encodes its label cell (S x S grid over the whole image)."""
    palette = rng.permutation(np.array(np.meshgrid(np.arange(0, 256, 36), np.arange(0, 256, 36),
                                                   np.arange(0, 256, 36))).reshape(3, -1).T)[: S * S]
    rows = np.minimum((np.arange(h) + 0.5) / h * S, S - 1).astype(int)
    cols = np.minimum((np.arange(w) + 0.5) / w * S, S - 1).astype(int)
    cell = rows[:, None] * S + cols[None, :]
    return palette[cell].astype(np.uint8), palette


@pytest.mark.parametrize("op", [ra.ROTATE, ra.SHEAR_X, ra.SHEAR_Y, ra.TRANSLATE_X, ra.TRANSLATE_Y])
def test_geometric_op_keeps_label_map_aligned(gen, op):
    """Crop + resize a pattern image, apply a spatial RandAugment op to the crop, warp the full map;
    the map sampled where each output pixel looks (through the crop box) must name the pixel's colour."""
    s = _seed(gen)
    rng = np.random.default_rng(s)
    S, H, W, out = 20, 240, 300, 96
    img, palette = _pattern(S, H, W, rng)
    crop = np.array([[30, 60, 150, 180]])  # top, left, h, w
    arg = {ra.ROTATE: 25.0, ra.SHEAR_X: 0.25, ra.SHEAR_Y: -0.25, ra.TRANSLATE_X: 0.25, ra.TRANSLATE_Y: -0.25}[op]  # whole label cells: no blend at cell centres
    arg *= rng.choice([-1, 1])
    t, l, h, w = crop[0]
    x = Image.fromarray(img).resize((out, out), Image.NEAREST, box=(l, t, l + w, t + h))
    xt = torch.from_numpy(np.asarray(x).copy()).permute(2, 0, 1)[None].float()
    y = ra.apply_torch(xt.clone(), np.array([[op]]), np.array([[arg]]), np.array([[0]]))
    y = y[0].permute(1, 2, 0).numpy()
    values = np.zeros((1, 1, S, S), np.float16)
    values[:] = 1
    indices = np.arange(S * S).reshape(1, 1, S, S)
    M = ra.composed_affine(np.array([[op]]), np.array([[arg]]), out, out)
    wv, wi = warp_label_maps(values, indices, M, crop, np.array([[H, W]]), out)
    # the loss reads the warped map at each cell centre p, where the crop shows output pixel T p
    T = crop_to_output_affine(crop, np.array([[H, W]]), out)[0]
    agree = total = unwarped = 0
    for r in range(S):
        for c in range(S):
            px, py, _ = T @ np.array([(c + 0.5) / S, (r + 0.5) / S, 1.0])
            iy, ix = int(py), int(px)
            if not (1 <= ix < out - 1 and 1 <= iy < out - 1) or wv[0, 0, r, c] == 0:
                continue
            # only cell centres whose 3x3 pixel neighbourhood shows one label cell: within a pixel of a
            # cell edge, the image's own pixel rounding (nearest resize, then the op) decides, not the warp
            patch = y[iy - 1: iy + 2, ix - 1: ix + 2].reshape(-1, 3)
            d = np.abs(palette[None].astype(np.float64) - patch[:, None]).sum(2)  # [9, S*S]
            near = d.argmin(1)
            if d.min(1).max() > 6 or (near != near[0]).any():  # fill, a blend, or a cell edge
                continue
            total += 1
            agree += wi[0, 0, r, c] == near[0]
            unwarped += indices[0, 0, r, c] == near[0]
    assert total > 25 and agree == total, (agree, total)
    assert unwarped / total < 0.6, (unwarped, total)  # the op really moved the content


def _rand_img(rng, n=4, h=37, w=45):
    low = rng.random((n, 3, h // 6, w // 6))
    x = torch.nn.functional.interpolate(torch.from_numpy(low), size=(h, w), mode="bilinear") * 255
    x += torch.from_numpy(rng.normal(0, 20, (n, 3, h, w)))
    return torch.clamp(x, 0, 255).round().float()


@pytest.mark.parametrize("op", range(len(ra.OPS)))
def test_torch_randaugment_matches_pil(gen, op):
    s = _seed(gen)
    rng = np.random.default_rng(s)
    x = _rand_img(rng)
    n = x.shape[0]
    ops = np.full((n, 1), op)
    lim = {ra.ROTATE: 30.0, ra.SHEAR_X: 0.3, ra.SHEAR_Y: 0.3, ra.TRANSLATE_X: 0.45, ra.TRANSLATE_Y: 0.45}
    if op in lim:
        args = rng.uniform(-lim[op], lim[op], (n, 1))
    elif op in ra.ENHANCE:
        args = rng.uniform(0.1, 1.9, (n, 1))
    elif op == ra.POSTERIZE:
        args = rng.integers(0, 5, (n, 1)).astype(float)
    elif op == ra.SOLARIZE:
        args = rng.integers(0, 257, (n, 1)).astype(float)
    elif op == ra.SOLARIZE_ADD:
        args = rng.integers(0, 111, (n, 1)).astype(float)
    else:
        args = np.zeros((n, 1))
    interp = rng.integers(0, 2, (n, 1))
    got = ra.apply_torch(x.clone(), ops, args, interp).permute(0, 2, 3, 1).numpy()
    for b in range(n):
        pil = Image.fromarray(x[b].permute(1, 2, 0).numpy().astype(np.uint8))
        want = np.asarray(ra.apply_pil(pil, ops[b], args[b], interp[b]), np.float64)
        err = np.abs(got[b] - want)
        if op in ra.GEOMETRIC:  # resampling kernels differ near edges: compare the bulk
            assert np.median(err) <= 2 and err.mean() < 8, (ra.OPS[op], args[b], err.mean())
        else:
            assert err.max() <= 1, (ra.OPS[op], args[b], err.max())
