"""The Triton GPU tail (dataloading/ra_kernel.py) against its reference, randaugment.apply_torch +
loader.finish_batch's torch ops; and the one-buffer host->device packing (packing.py).

Tolerance: the colour ops, Sharpness, the flip and the normalisation must be bit-exact (the kernels
round every float operation as the reference's separate torch ops do). The spatial ops (Rotate,
ShearX/Y, TranslateX/YRel) may differ by exactly one grey level on at most 0.1% of a batch's values:
the sampling position comes out of a 3x3 matrix product and grid_sample's unnormalisation, which
torch evaluates in its own order (BLAS einsum; fused multiply-adds in CUDA), so an interpolated
value within a few ulps of k + 0.5 may round either way. Measured under the interpreter: about
1e-5 of the values of spatial-op samples.
On CUDA the reference itself runs cuDNN (Sharpness) and a CUDA mean (Contrast), so there the
non-spatial ops are allowed the same one-level differences on at most 1e-4 of the values.
"""
import numpy as np
import pytest
import torch

from tokenlabel.dataloading import packing
from tokenlabel.dataloading import ra_kernel as rk
from tokenlabel.dataloading import randaugment as ra
from tokenlabel.dataloading.loader import IMAGENET_MEAN, IMAGENET_STD, finish_batch
from tokenlabel.dataloading.sampling import draw_geometry

LIM = {ra.ROTATE: 30.0, ra.SHEAR_X: 0.3, ra.SHEAR_Y: 0.3, ra.TRANSLATE_X: 0.45, ra.TRANSLATE_Y: 0.45}


def _rng(gen):
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))


def _images(rng, B, H, W, hwc=True):
    """uint8 [B,3,H,W]: smooth colour fields + noise (so every op changes something); with hwc the
    memory is DALI's HWC layout seen through a permuted view."""
    low = rng.random((B, 3, max(2, H // 5), max(2, W // 5)))
    x = torch.nn.functional.interpolate(torch.from_numpy(low), size=(H, W), mode="bilinear") * 255
    x = torch.clamp(x + torch.from_numpy(rng.normal(0, 25, (B, 3, H, W))), 0, 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) if hwc else x.contiguous()


def _args(rng, ops):
    """A valid argument per op, spread over the whole range draw_params can produce."""
    args = np.zeros(ops.shape)
    for idx, op in np.ndenumerate(ops):
        if op in LIM:
            args[idx] = rng.uniform(-LIM[op], LIM[op])
        elif op in ra.ENHANCE:
            args[idx] = rng.uniform(0.1, 1.9)
        elif op == ra.POSTERIZE:
            args[idx] = rng.integers(0, 9)
        elif op == ra.SOLARIZE:
            args[idx] = rng.integers(0, 257)
        elif op == ra.SOLARIZE_ADD:
            args[idx] = rng.integers(0, 111)
    return args


def _ops_every_op(rng, B, L=2):
    """[B, L] ops: layer 0 has each of the 15 ops at least once, later layers random (some idle)."""
    ops = rng.integers(-1, len(ra.OPS), (B, L))
    ops[:, 0] = rng.permutation(np.resize(np.arange(-1, len(ra.OPS)), B))
    return ops


def _check(got, want, spatial_rows, nonspatial_frac=0.0):
    """got/want float [B,3,H,W] of whole grey levels; spatial_rows: samples that ran a spatial op."""
    d = (got.double() - want.double()).abs()
    spatial = torch.zeros(d.shape[0], dtype=torch.bool)
    spatial[spatial_rows] = True
    # Resampling may differ by one grey level (rounding order of the matrix and of grid_sample, FMA
    # contraction on the GPU); a later layer can amplify such a pixel (Contrast x1.9, Posterize or
    # Solarize thresholds, Equalize's table), so after a spatial op only the share of differing pixels
    # is bounded: at most 1e-3 of those pixels, and at least one pixel whatever the image size (at 11 x 9 px a
    # single pixel one level off is 1.1e-3 of three samples; CI drew one, about 1 run in 200).
    # Samples without a spatial op must agree to one level.
    if (~spatial).any():
        assert d[~spatial].max() <= 1, float(d[~spatial].max())
    n_s = int((d[spatial] > 0).sum()) if spatial.any() else 0
    frac_o = float((d[~spatial] > 0).double().mean()) if (~spatial).any() else 0.0
    assert n_s <= max(1, 1e-3 * d[spatial].numel()), (n_s, d[spatial].numel())
    assert frac_o <= nonspatial_frac, frac_o


def _meta(rng, B, ops, interp):
    return dict(sample_ids=np.arange(B), classes=rng.integers(0, 1000, B), ra_op=ops.astype(np.int8),
                ra_arg=_args(rng, ops), ra_interp=interp.astype(np.int8), flips=rng.random(B) < 0.5,
                boxes=rng.random((B, 4)).astype(np.float32), erase=np.zeros(B, bool),
                erase_box=np.zeros((B, 4), np.int64))


def _erased(meta, B, H, W):
    """bool [B,3,H,W]: the pixels inside each sample's erasing box."""
    inside = torch.zeros(B, 1, H, W, dtype=torch.bool)
    for i in np.nonzero(meta["erase"])[0]:
        t, l, h, w = meta["erase_box"][i]
        inside[i, :, t:t + h, l:l + w] = True
    return inside.expand(B, 3, H, W)


def _grey(images, inside):
    """Normalised images -> grey levels (float, rounded), 0 inside the erased boxes."""
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    return torch.where(inside, 0.0, images.float().cpu() * std + mean).round()


def _reference_uint8(x, meta):
    """apply_torch + flip: the layers' result in grey levels."""
    y = ra.apply_torch(x.float(), meta["ra_op"], meta["ra_arg"], meta["ra_interp"])
    f = torch.from_numpy(meta["flips"]).to(x.device).view(-1, 1, 1, 1)
    return torch.where(f, y.flip(-1), y)


def _kernel_uint8(x, meta):
    """The kernel with mean 0 and std 1: the same grey levels, flipped, as float32."""
    B, _, H, W = x.shape
    tab, plan = rk.build_table(meta, height=H, width=W, train=True, augment=True)
    return rk.finish_images(x, torch.from_numpy(tab).to(x.device), plan, seed=0, mean255=[0.0] * 3,
                            std255=[1.0] * 3)


@pytest.mark.parametrize("H,W,interp", [(20, 24, 0), (20, 24, 1), (13, 17, None)])
def test_kernel_matches_apply_torch_every_op(gen, H, W, interp):
    rng = _rng(gen)
    B = 16
    ops = _ops_every_op(rng, B)
    ip = rng.integers(0, 2, ops.shape) if interp is None else np.full(ops.shape, interp)
    meta = _meta(rng, B, ops, ip)
    x = _images(rng, B, H, W, hwc=interp != 1)
    got = _kernel_uint8(x, meta)
    want = _reference_uint8(x, meta)
    assert got.dtype == torch.float32 and got.shape == (B, 3, H, W) and got.is_contiguous()
    _check(got, want, np.nonzero(np.isin(ops, ra.GEOMETRIC).any(1))[0])
    # the ops really ran: most samples where an op fired differ from their (flipped) input. Some
    # legitimately do not (AutoContrast of an image already spanning 0..255, Invert twice,
    # Posterize 8 bits, ...): about 0.2 of ~16 samples per batch; more than half would be ~1e-10.
    flips = torch.from_numpy(meta["flips"]).view(-1, 1, 1, 1)
    changed = (got != torch.where(flips, x.flip(-1), x).float()).flatten(1).any(1)
    assert changed[torch.from_numpy((ops >= 0).any(1))].float().mean() > 0.5


def test_kernel_idle_and_three_layers(gen):
    """A layer where nothing fired is skipped, a point-wise layer between two spatial ones keeps
    its statistics on the intermediate image, and an all-idle batch is just flip + normalise."""
    rng = _rng(gen)
    B, H, W = 6, 11, 9
    x = _images(rng, B, H, W)
    ops = np.array([[ra.ROTATE, -1, ra.EQUALIZE], [ra.SHEAR_X, -1, ra.AUTOCONTRAST], [ra.SHARPNESS, -1, ra.CONTRAST],
                    [-1, -1, ra.TRANSLATE_Y], [ra.COLOR, -1, -1], [ra.POSTERIZE, -1, ra.SOLARIZE]])
    meta = _meta(rng, B, ops, rng.integers(0, 2, ops.shape))
    tab, plan = rk.build_table(meta, height=H, width=W, train=True, augment=True)
    assert plan.active == (0, 2) and plan.lut == (0, 2)
    _check(_kernel_uint8(x, meta), _reference_uint8(x, meta), [0, 1, 3])
    idle = _meta(rng, B, np.full((B, 2), -1), np.zeros((B, 2)))
    assert rk.build_table(idle, height=H, width=W, train=True, augment=True)[1].active == ()
    assert torch.equal(_kernel_uint8(x, idle), _reference_uint8(x, idle))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finish_batch_engines_agree(gen, dtype):
    """finish_batch: Triton engine (interpreted here) against the torch engine on a drawn batch:
    same metadata tensors, same pixels outside the erased boxes (to the tolerance above), and
    inside them N(0,1) noise that depends only on (seed, sample, channel, pixel)."""
    rng = _rng(gen)
    B, H, W = 12, 21, 21  # square: the erasing boxes are drawn on image_size x image_size
    x = _images(rng, B, H, W)
    meta = draw_geometry(int(rng.integers(0, 1000)), 3, np.arange(B), np.full(B, 90), np.full(B, 120), image_size=W,
                         randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.5)
    meta["ra_op"] = _ops_every_op(rng, B).astype(np.int8)  # the drawn args stay: ops may now mismatch them
    meta["ra_arg"] = _args(rng, meta["ra_op"])
    meta["classes"], meta["sample_ids"] = rng.integers(0, 1000, B), np.arange(B) + 7
    meta["label_values"] = rng.standard_normal((B, 2, 3, 3)).astype(np.float16)
    meta["label_indices"] = rng.integers(0, 1000, (B, 2, 3, 3))
    kw = dict(device="cpu", train=True, augment=True, dtype=dtype, seed=int(rng.integers(0, 2**31 - 1)))
    a = finish_batch(x, meta, engine="triton", **kw)
    b = finish_batch(x, meta, engine="torch", **kw)
    assert set(a) == set(b)
    for k in a:
        if k != "images":
            assert torch.equal(a[k], b[k]), k
    assert a["images"].dtype == dtype and a["images"].shape == (B, 3, H, W) and a["images"].is_contiguous()
    inside = _erased(meta, B, H, W)
    spatial = np.nonzero(np.isin(meta["ra_op"], ra.GEOMETRIC).any(1))[0]
    _check(_grey(a["images"], inside), _grey(b["images"], inside), spatial)
    # bit-exact (not just the same grey level) on the samples without a spatial op, bf16 included
    plain = torch.from_numpy(~np.isin(meta["ra_op"], ra.GEOMETRIC).any(1))
    zero = torch.zeros((), dtype=dtype)
    assert torch.equal(torch.where(inside, zero, a["images"])[plain], torch.where(inside, zero, b["images"])[plain])
    if inside.any():
        noise = a["images"][inside].float()
        assert noise.abs().max() < 7 and not torch.equal(noise, b["images"][inside].float())
    again = finish_batch(x, meta, engine="triton", **kw)
    assert torch.equal(again["images"], a["images"])  # the noise is a pure function of the seed


def test_erasing_noise_is_standard_normal(gen):
    rng = _rng(gen)
    B, H, W = 4, 32, 32
    x = _images(rng, B, H, W)
    meta = _meta(rng, B, np.full((B, 1), -1), np.zeros((B, 1)))
    meta["erase"] = np.ones(B, bool)
    meta["erase_box"] = np.tile([0, 0, H, W], (B, 1))
    tab, plan = rk.build_table(meta, height=H, width=W, train=True, augment=True)
    seed = int(rng.integers(0, 2**31 - 1))
    z = rk.finish_images(x, torch.from_numpy(tab), plan, seed=seed).double()
    n = z.numel()  # 12288 values
    # Every bound is 6 standard errors of its statistic for n independent N(0, 1) draws (a false
    # alarm about 2e-9 per check), far below the shift a biased or repeated counter gives.
    assert abs(float(z.mean())) < 6 / n**0.5
    assert abs(float(z.std()) - 1) < 6 / (2 * n) ** 0.5
    p1 = 0.6827  # P(|z| < 1)
    assert abs(float((z.abs() < 1).double().mean()) - p1) < 6 * (p1 * (1 - p1) / n) ** 0.5
    # channels, and samples, draw different counters: each value against the next channel's value at the
    # same pixel (all three channel pairs at once: n pairs), and against the next sample's
    for other_axis in (z.roll(1, dims=1), z.roll(1, dims=0)):
        c = np.corrcoef(z.flatten().numpy(), other_axis.flatten().numpy())[0, 1]
        assert abs(c) < 6 / n**0.5, c
    other = rk.finish_images(x, torch.from_numpy(tab), plan, seed=seed ^ 1).double()
    assert float((other - z).abs().mean()) > 0.5


def test_packing_one_buffer_roundtrip(gen):
    rng = _rng(gen)
    B = 5
    meta = draw_geometry(1, 0, np.arange(B), np.full(B, 50), np.full(B, 60), image_size=16,
                         randaugment="rand-m9-mstd0.5-inc1")
    meta["classes"], meta["sample_ids"] = rng.integers(0, 10, B), rng.integers(0, 99, B)
    meta["label_values"] = rng.standard_normal((B, 3, 4, 4)).astype(np.float16)
    meta["label_indices"] = rng.integers(0, 40000, (B, 3, 4, 4)).astype(np.int32)
    hb = packing.pack(meta, height=16, width=16, train=True, augment=True, pin=False)
    out = packing.to_device(hb, "cpu")
    storages = {t.untyped_storage().data_ptr() for t in out.values()}
    assert storages == {hb.buffer.untyped_storage().data_ptr()}  # everything in one buffer: one copy
    for k in ("classes", "sample_ids", "boxes", "flips", "label_values", "label_indices"):
        want = torch.from_numpy(np.asarray(meta[k]))
        assert out[k].dtype == want.dtype and torch.equal(out[k], want), k
    assert out["classes"].dtype == torch.int64 and out["flips"].dtype == torch.bool
    tab, plan = rk.build_table(meta, height=16, width=16, train=True, augment=True)
    assert torch.equal(out["ra_table"], torch.from_numpy(tab)) and hb.plan == plan
    ev = packing.to_device(packing.pack(dict(classes=meta["classes"], sample_ids=meta["sample_ids"]), height=16,
                                        width=16, train=False, augment=True, pin=False), "cpu")
    assert set(ev) == {"classes", "sample_ids", "ra_table"} and (ev["ra_table"][:, rk.HEAD] == -1).all()


def test_affine_matrices_equal_affine_matrix(gen):
    rng = _rng(gen)
    ops = rng.integers(-1, len(ra.OPS), 200)
    args = _args(rng, ops)
    M = ra.affine_matrices(ops, args, 224, 200)
    want = np.stack([ra.affine_matrix(int(o), float(a), 224, 200) for o, a in zip(ops, args)])
    assert np.array_equal(M, want)


def test_bad_inputs():
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    meta = _meta(np.random.default_rng(0), 2, np.full((2, 1), -1), np.zeros((2, 1)))
    tab, plan = rk.build_table(meta, height=4, width=4, train=True, augment=True)
    t = torch.from_numpy(tab)
    with pytest.raises(ValueError, match="images"):
        rk.finish_images(x.float(), t, plan)
    with pytest.raises(ValueError, match="table"):
        rk.finish_images(x, t[:1], plan)
    with pytest.raises(ValueError, match="seed"):
        rk.finish_images(x, t, plan, seed=-1)
    with pytest.raises(ValueError, match="engine"):
        finish_batch(x, meta, device="cpu", train=True, augment=True, dtype=torch.float32, seed=0, engine="numpy")


# ------------------------------------------------------------------------------------------ GPU
@pytest.fixture
def exact_reference(monkeypatch):
    """The torch reference in full float32 on CUDA: TF32 would round Sharpness's conv2d weights
    (cuDNN) and _affine's einsum (cuBLAS) to 10 mantissa bits, far beyond the tolerance. The
    kernels do not depend on these switches."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.gpu
def test_gpu_kernel_matches_apply_torch_b128_224(gen, exact_reference):
    rng = _rng(gen)
    B, S = 128, 224
    dev = torch.device("cuda")
    x = _images(rng, B, S, S).to(dev)
    for L in (2, 3):
        ops = _ops_every_op(rng, B, L)
        meta = _meta(rng, B, ops, rng.integers(0, 2, ops.shape))
        got = _kernel_uint8(x, meta).cpu()
        want = _reference_uint8(x, meta).cpu()
        _check(got, want, np.nonzero(np.isin(ops, ra.GEOMETRIC).any(1))[0], nonspatial_frac=1e-4)


@pytest.mark.gpu
def test_gpu_finish_batch_one_copy_and_agrees(gen, exact_reference):
    """On CUDA: one host->device copy for all metadata (profiled), and the Triton engine agrees with
    the torch engine outside the erased boxes."""
    from torch.profiler import ProfilerActivity, profile

    rng = _rng(gen)
    B, S = 128, 224
    x = _images(rng, B, S, S).cuda()
    meta = draw_geometry(3, 0, np.arange(B), np.full(B, 375), np.full(B, 500), image_size=S,
                         randaugment="rand-m9-mstd0.5-inc1")
    meta["classes"], meta["sample_ids"] = rng.integers(0, 1000, B), np.arange(B)
    meta["label_values"] = rng.standard_normal((B, 5, 14, 14)).astype(np.float16)
    meta["label_indices"] = rng.integers(0, 1000, (B, 5, 14, 14))
    kw = dict(device="cuda", train=True, augment=True, dtype=torch.float32, seed=5)
    finish_batch(x, meta, engine="triton", **kw)  # compile outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        a = finish_batch(x, meta, engine="triton", **kw)
        torch.cuda.synchronize()
    h2d = [e for e in prof.events() if "HtoD" in e.name or "Host to Device" in e.name]
    assert len(h2d) == 1, [e.name for e in h2d]
    b = finish_batch(x, meta, engine="torch", **kw)
    for k in a:
        if k != "images":
            assert torch.equal(a[k].cpu(), b[k].cpu()), k
    inside = _erased(meta, B, S, S)
    spatial = np.nonzero(np.isin(meta["ra_op"], ra.GEOMETRIC).any(1))[0]
    _check(_grey(a["images"], inside), _grey(b["images"], inside), spatial, nonspatial_frac=1e-4)
