"""End-to-end loader tests on small real-JPEG folders: PIL backend always, DALI (CPU, device_id=None)
where DALI imports, DALI "mixed" on the GPU with -m gpu."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from test_loader_util import dali_or_skip, folder, make_folder, make_store, to_uint8  # noqa: F401
from tokenlabel.dataloading import build_loader

BACKENDS = ["torch", "dali"]


def _build(root, backend, **kw):
    if backend == "dali":
        dali_or_skip()
    kw.setdefault("device", "cpu")
    kw.setdefault("num_workers", 0 if backend == "torch" else 2)
    return build_loader(root, backend=backend, **kw)


def _epoch(loader, epoch, start_batch=0):
    loader.set_epoch(epoch, start_batch)
    return list(loader)


@pytest.mark.parametrize("backend", BACKENDS)
def test_format_labels_follow_images(folder, tmp_path, backend, gen):
    root, rel = folder
    seed = int(torch.randint(0, 1000, (1,), generator=gen))
    make_store(str(tmp_path / "store"), rel, num_classes=7, k=2, size=6)
    loader = _build(root, backend, labels=str(tmp_path / "store"), batch_size=5, image_size=32, seed=seed)
    assert len(loader) == len(rel) // 5 and loader.num_classes == 7 and loader.classes == ["c0", "c1", "c2"]
    assert loader.dataset_size == len(rel)
    batches = _epoch(loader, 1)
    assert len(batches) == len(loader)
    for b in batches:
        B = 5
        assert b["images"].shape == (B, 3, 32, 32) and b["images"].dtype == torch.float32
        assert b["classes"].dtype == torch.int64 and b["boxes"].shape == (B, 4) and b["boxes"].dtype == torch.float32
        assert b["flips"].dtype == torch.bool
        assert b["label_values"].shape == (B, 2, 6, 6) and b["label_values"].dtype == torch.float16
        assert b["label_indices"].dtype == torch.int64
        ids = b["sample_ids"].numpy()
        # dataset index == store row here; RandAugment may have zeroed (warped out) some cells
        v0 = b["label_values"][:, 0].float().numpy()
        for j, i in enumerate(ids):
            assert b["classes"][j] == int(rel[i].split("/")[0][1:])
            vals = v0[j][v0[j] != 0]
            assert (vals == i).all() and (len(vals) > 0 or i == 0)
    seen = np.concatenate([b["sample_ids"].numpy() for b in batches])
    assert len(np.unique(seen)) == len(seen)  # one epoch: no repeats
    order2 = np.concatenate([b["sample_ids"].numpy() for b in _epoch(loader, 2)])
    assert not np.array_equal(seen, order2)


DEVICES = [("torch", "cpu"), ("dali", "cpu"), pytest.param("torch", "cuda", marks=pytest.mark.gpu),
           pytest.param("dali", "cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("backend,device", DEVICES)
def test_same_epoch_same_batches_and_exact_resume(folder, backend, device):
    """An epoch repeated, and resumed at batch 2, gives the same batches bit for bit, with the default loader (on
    CUDA, with one decoder: hw_decoder_load=0.0). Lanes of different decoders (the hardware engines and the hybrid
    path: (1.0, 0.0), and "auto", the default on CUDA) keep everything but the pixels exact: which lane decodes a
    batch depends on timing and the two round differently (chroma upsampling), so there the pixels are within the
    decoders' rounding (a repeat differed on 1 run in 5 on an H100, 2026-12-05, when the lanes were the default)."""
    root, rel = folder
    dali_cuda = (backend, device) == ("dali", "cuda")
    one = dict(hw_decoder_load=0.0) if dali_cuda else {}  # DALI on CUDA: one decoder (the default is "auto")
    loader = _build(root, backend, batch_size=4, image_size=24, seed=3, device=device, **one)
    full = _epoch(loader, 5)
    again = _epoch(loader, 5)
    resumed = _epoch(loader, 5, start_batch=2)
    loader.close()
    assert len(resumed) == len(full) - 2
    _same(again, full)
    _same(resumed, full[2:])
    if dali_cuda:  # the lanes and the default ("auto"), twice, against the one decoder
        for kw in (dict(hw_decoder_load=(1.0, 0.0)), {}, {}):
            lanes = _build(root, backend, batch_size=4, image_size=24, seed=3, device=device, **kw)
            got = _epoch(lanes, 5) + _epoch(lanes, 5, start_batch=2)
            lanes.close()
            _same_up_to_decoding(got, full + full[2:])


def test_shards_partition_an_epoch(folder):
    root, rel = folder  # 18 images, 3 shards
    ids = []
    for s in range(3):
        loader = _build(root, "torch", batch_size=4, image_size=16, shard_id=s, num_shards=3, drop_last=False)
        assert len(loader) == 2
        ids.append(np.concatenate([b["sample_ids"].numpy() for b in _epoch(loader, 0)]))
    allids = np.concatenate(ids)
    assert sorted(allids.tolist()) == list(range(len(rel)))


@pytest.mark.parametrize("backend,device", DEVICES)
def test_eval_shapes(folder, backend, device):
    root, rel = folder
    loader = _build(root, backend, batch_size=4, image_size=20, train=False, device=device)
    assert len(loader) == -(-len(rel) // 4)
    batches = _epoch(loader, 0)
    assert [b["images"].shape[0] for b in batches] == [4, 4, 4, 4, 2]
    assert set(batches[0]) == {"images", "classes", "sample_ids"}
    ids = np.concatenate([b["sample_ids"].cpu().numpy() for b in batches])
    assert ids.tolist() == list(range(len(rel)))  # eval: dataset order
    assert all(b["images"].device.type == device for b in batches)
    if backend == "dali":  # the same resize and centre crop as the PIL path
        ref = _epoch(_build(root, "torch", batch_size=4, image_size=20, train=False), 0)
        err = np.concatenate([np.abs(to_uint8(a["images"]) - to_uint8(b["images"])).mean(axis=(1, 2, 3))
                              for a, b in zip(batches, ref)])
        # nvJPEG (mixed) upsamples chroma and rounds its IDCT differently from libjpeg, which PIL uses:
        # on these 20 px images that alone gives up to ~3 grey levels; a misplaced crop gives far more.
        assert err.max() < (2.0 if device == "cpu" else 4.0), err


def _same(xs, ys):
    assert len(xs) == len(ys)
    for a, b in zip(xs, ys):
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k


def _same_up_to_decoding(xs, ys):
    """Everything but the pixels exact; the pixels within the hardware and hybrid decoders' rounding, by the mean
    absolute difference of each image in grey levels: their chroma upsampling gives a fraction of a level, which
    RandAugment's histogram ops (equalize, autocontrast) can widen on a few images; a wrong crop, flip or image
    gives tens of levels."""
    assert len(xs) == len(ys)
    err = []
    for a, b in zip(xs, ys):
        assert set(a) == set(b)
        for k in a:
            if k != "images":
                assert torch.equal(a[k], b[k]), k
        err.append(np.abs(to_uint8(a["images"]) - to_uint8(b["images"])).mean(axis=(1, 2, 3)))
    err = np.concatenate(err)
    assert np.median(err) < 3.0 and err.max() < 20.0, np.round(err, 2)


def test_dali_stream_runs_across_epochs(folder, tmp_path):
    """Consecutive epochs come from one producer stream (no restart, no pipeline rebuild) and equal
    what fresh loaders give; a resume or repeat restarts the stream there with the same batches, and
    an interrupted epoch continues where it stopped."""
    dali_or_skip()
    root, rel = folder
    make_store(str(tmp_path / "store"), rel, num_classes=5, k=2, size=6)
    kw = dict(labels=str(tmp_path / "store"), batch_size=4, image_size=24, seed=5)
    loader = _build(root, "dali", **kw)
    be = loader.backend
    got = [_epoch(loader, e) for e in (0, 1, 2)]
    assert be._generation == 1  # one stream for the three epochs
    pipe = be.pipe
    for e in (0, 1, 2):
        _same(got[e], _epoch(_build(root, "dali", **kw), e))
    _same(_epoch(loader, 1, start_batch=2), got[1][2:])
    assert be._generation == 2 and be.pipe is pipe  # restarted, the pipeline drained and kept
    loader.set_epoch(4)
    it = iter(loader)
    first = next(it)
    del it
    rest = _epoch(loader, 4, start_batch=1)
    assert be._generation == 3  # the stream that epoch 4 started carried on at batch 1
    _same([first] + rest, _epoch(_build(root, "dali", **kw), 4))


def test_dali_producer_ends_with_its_loader(folder):
    import gc

    dali_or_skip()
    root, rel = folder
    for close in (True, False):
        loader = _build(root, "dali", batch_size=4, image_size=16)
        _epoch(loader, 0)
        th = loader.backend._stream.thread
        assert th.is_alive()  # already preparing epoch 1
        if close:
            loader.close()
        else:
            del loader
            gc.collect()
        th.join(5)
        assert not th.is_alive()


def test_dali_crop_is_the_returned_box(folder):
    """DALI's decoded + resized crop equals a PIL crop of the returned box (flip applied as flagged),
    and clearly differs from a crop shifted by a few pixels or left unflipped."""
    dali_or_skip()
    root, rel = folder
    S = 48
    loader = _build(root, "dali", batch_size=6, image_size=S, randaugment=None, random_erasing=0.0,
                    interpolation="bilinear", seed=11)
    errs, shifted, unflipped = [], [], []
    for b in _epoch(loader, 0):
        imgs = to_uint8(b["images"])
        for j, i in enumerate(b["sample_ids"].tolist()):
            full = Image.open(os.path.join(root, rel[i])).convert("RGB")
            H, W = full.height, full.width
            t, l, h, w = (b["boxes"][j].double().numpy() * [H, W, H, W]).round().astype(int)

            def crop(dx, flip):
                # dx > 0: the box with its left edge moved in by dx pixels (stretched: a misaligned crop)
                c = np.asarray(full.resize((S, S), Image.BILINEAR, box=(l + dx, t, l + w, t + h)), np.float64)
                return c[:, ::-1] if flip else c

            f = bool(b["flips"][j])
            errs.append(np.abs(imgs[j] - crop(0, f)).mean())
            shifted.append(np.abs(imgs[j] - crop(max(2, w // 6), f)).mean())
            unflipped.append(np.abs(imgs[j] - crop(0, not f)).mean())
    errs, shifted, unflipped = map(np.array, (errs, shifted, unflipped))
    assert errs.mean() < 2.0 and errs.max() < 5.0, errs
    assert (shifted > errs).mean() > 0.9 and (unflipped > errs).mean() > 0.9


def test_dali_and_pil_agree(folder, tmp_path):
    """Same sampler and draws: the same samples, boxes, flips and label maps, and close pixels
    (different JPEG decoders / resize kernels / RandAugment engines on the same parameters)."""
    dali_or_skip()
    root, rel = folder
    make_store(str(tmp_path / "store"), rel, num_classes=5, k=3, size=8)
    kw = dict(labels=str(tmp_path / "store"), batch_size=6, image_size=40, seed=7)
    a = _epoch(_build(root, "dali", **kw), 2)
    b = _epoch(_build(root, "torch", **kw), 2)
    diffs = []
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in ("sample_ids", "classes", "boxes", "flips", "label_values", "label_indices"):
            assert torch.equal(x[k], y[k]), k
        assert x["images"].shape == y["images"].shape and x["images"].dtype == y["images"].dtype
        diffs.append((to_uint8(x["images"]) - to_uint8(y["images"])).__abs__().mean(axis=(1, 2, 3)))
    d = np.concatenate(diffs)
    assert np.median(d) < 2.0 and d.max() < 8.0, d


def _write_bad_files(root):
    d = os.path.join(root, "c1")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(a).save(os.path.join(d, "png_named.jpg"), format="PNG")
    Image.fromarray(a).convert("CMYK").save(os.path.join(d, "cmyk.jpg"), format="JPEG")
    Image.fromarray(a[..., 0]).save(os.path.join(d, "gray.jpg"), format="JPEG")
    Image.fromarray(a).save(os.path.join(d, "anim.jpg"), format="GIF")
    with open(os.path.join(d, "garbage.jpg"), "wb") as f:
        f.write(os.urandom(500))
    import io

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG")
    with open(os.path.join(d, "truncated.jpg"), "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    return {"c1/png_named.jpg", "c1/cmyk.jpg", "c1/gray.jpg", "c1/anim.jpg", "c1/truncated.jpg"}, "c1/garbage.jpg"


@pytest.mark.parametrize("backend,device", [("torch", "cpu"), ("dali", "cpu"),
                                            pytest.param("dali", "cuda", marks=pytest.mark.gpu)])
def test_bad_files_decoded_or_skipped(folder, backend, device):
    root, rel = folder
    decodable, garbage = _write_bad_files(root)
    loader = _build(root, backend, batch_size=4, image_size=24, drop_last=False, device=device)
    with pytest.warns(RuntimeWarning, match="garbage.jpg"):
        batches = _epoch(loader, 0)
    from tokenlabel.dataloading.sampling import list_dataset

    names = list_dataset(root).relpaths
    seen = {names[i] for b in batches for i in b["sample_ids"].tolist()}
    assert decodable <= seen and garbage not in seen
    assert sum(b["images"].shape[0] for b in batches) == len(names)  # batches stay full
    assert all(torch.isfinite(b["images"]).all() for b in batches)


def test_dali_fallback_files_decoded_once_and_cleaned_up(folder, monkeypatch):
    """DALI reads the files itself (fn.io.file.read); a file for the PIL fallback is decoded once into
    the backend's PNM cache, reused by later epochs, and the cache folder goes with loader.close()."""
    dali_or_skip()
    from tokenlabel.dataloading import dali_pipeline, sampling

    root, rel = folder
    decodable, garbage = _write_bad_files(root)
    calls = []
    real = sampling.pil_open_rgb

    def counting(data):
        calls.append(1)
        return real(data)

    monkeypatch.setattr(sampling, "pil_open_rgb", counting)
    loader = _build(root, "dali", batch_size=4, image_size=16, drop_last=False)
    with pytest.warns(RuntimeWarning, match="garbage.jpg"):
        first = _epoch(loader, 0)
    n_first = len(calls)
    second = _epoch(loader, 1)
    assert n_first >= 4 and len(calls) == n_first  # png_named, cmyk, anim, truncated (+ gray if odd)
    for batches in (first, second):
        assert sum(b["images"].shape[0] for b in batches) == len(sampling.list_dataset(root))
    be = loader.backend
    cache = be._fallback_tmp
    assert cache is not None and sorted(os.listdir(cache)) == sorted(f"{j}.ppm" for j in be._fallback)
    loader.close()
    assert not os.path.exists(cache)
    third = _epoch(loader, 2)  # usable after close: the fallbacks are decoded again
    assert sum(b["images"].shape[0] for b in third) == len(sampling.list_dataset(root))
    assert len(calls) > n_first
    loader.close()


def test_dali_worker_processes_give_the_same_batches(folder, tmp_path, monkeypatch):
    """First sightings probed and batch metadata computed in worker processes (the GPU default) or in
    the producer's threads (the CPU default): the same batches, boxes, label maps, RandAugment table and
    bad-file handling; the workers go with close()."""
    dali_or_skip()
    root, rel = folder
    _write_bad_files(root)
    store = str(tmp_path / "labels")
    make_store(store, rel, num_classes=5, k=2, size=6)
    out = {}
    from tokenlabel.dataloading import sampling

    for workers in (0, 2):
        monkeypatch.setattr(sampling, "_warned", set())  # warn_once is per process
        loader = _build(root, "dali", batch_size=4, image_size=16, drop_last=False, labels=store,
                        missing_labels="class")  # the bad files have no maps: trained on their class
        loader.backend.worker_processes = workers
        with pytest.warns(RuntimeWarning, match="garbage.jpg"):
            batches = _epoch(loader, 0)
        out[workers] = [{k: v.tolist() for k, v in b.items()} for b in batches]
        assert "label_values" in batches[0]
        assert (loader.backend._procs is not None) == (workers > 0)
        loader.close()
        assert loader.backend._procs is None
    assert out[0] == out[2]
    from tokenlabel.dataloading.dali_pipeline import DaliBackend

    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="worker_processes"):
            DaliBackend(loader.backend.source, loader.backend.sampler, "cpu", worker_processes=bad)


def test_missing_labels_and_incompatible_store(folder, tmp_path):
    root, rel = folder
    make_store(str(tmp_path / "part"), rel[:-3], num_classes=5, k=2, size=6)
    with pytest.raises(ValueError, match="no label map.*" + rel[-1].replace(".", r"\.")):
        build_loader(root, labels=str(tmp_path / "part"), backend="torch", device="cpu", batch_size=4)
    loader = build_loader(root, labels=str(tmp_path / "part"), backend="torch", device="cpu", batch_size=4,
                          num_workers=0, missing_labels="class", randaugment=None)
    got = 0
    for b in _epoch(loader, 0):
        for j, i in enumerate(b["sample_ids"].tolist()):
            if i >= len(rel) - 3:
                got += 1
                assert (b["label_values"][j, 0] == 20).all() and (b["label_values"][j, 1] == 0).all()
                assert (b["label_indices"][j, 0] == b["classes"][j]).all()
    assert got > 0
    make_store(str(tmp_path / "full"), rel, num_classes=5, k=2, size=6)
    for kw, name in ((dict(label_size=8), "size"), (dict(label_k=3), "k"), (dict(num_classes=1000), "num_classes")):
        with pytest.raises(ValueError, match=name):
            build_loader(root, labels=str(tmp_path / "full"), backend="torch", device="cpu", **kw)


def test_dali_missing_gives_install_hint(folder, monkeypatch):
    import sys

    root, rel = folder
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match=r"dali-cu13.*dali-cu12"):
        build_loader(root, backend="dali", device="cpu", batch_size=4)


def test_bad_roots(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_loader(str(tmp_path / "nope"), backend="torch", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        build_loader(str(tmp_path / "empty"), backend="torch", device="cpu")
    (tmp_path / "empty" / "a").mkdir()
    with pytest.raises(ValueError, match="no images"):
        build_loader(str(tmp_path / "empty"), backend="torch", device="cpu")
    with pytest.raises(ValueError, match="backend"):
        build_loader(str(tmp_path / "empty"), backend="tf", device="cpu")


def test_file_list_root(folder, tmp_path):
    root, rel = folder
    lst = os.path.join(root, "list.txt")
    with open(lst, "w") as f:
        for p in rel[::2]:
            f.write(f"{p} {int(p.split('/')[0][1:]) + 10}\n")
    loader = _build(lst, "torch", batch_size=3, image_size=16, train=False)
    assert loader.num_classes == 13 and loader.dataset_size == len(rel[::2])
    b = _epoch(loader, 0)[0]
    assert b["classes"].tolist() == [int(p.split("/")[0][1:]) + 10 for p in rel[::2][:3]]


def test_pil_workers_and_bf16(folder):
    root, rel = folder
    loader = _build(root, "torch", batch_size=4, image_size=16, num_workers=2, dtype=torch.bfloat16,
                    label_index_dtype=torch.int32)
    ref = _build(root, "torch", batch_size=4, image_size=16, num_workers=0)
    a, b = _epoch(loader, 1), _epoch(ref, 1)
    assert a[0]["images"].dtype == torch.bfloat16
    for x, y in zip(a, b):
        assert torch.equal(x["sample_ids"], y["sample_ids"])
        assert torch.allclose(x["images"].float(), y["images"], atol=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_throughput_runs(folder, tmp_path, backend):
    from tokenlabel.dataloading.loader import loader_throughput

    if backend == "dali":
        dali_or_skip()
    root, rel = folder
    make_store(str(tmp_path / "store"), rel, num_classes=5, k=2, size=6)
    r = loader_throughput(root, str(tmp_path / "store"), backend, batch_size=4, image_size=16, num_batches=6,
                          warmup=1, device="cpu", num_workers=0 if backend == "torch" else 2)
    assert r > 0


def test_decode_device_knob(folder):
    """decode_device says where DALI decodes and resizes: "cpu" is the only choice without CUDA (and the default
    there); "gpu" without CUDA, an unknown value, the hardware decoder's share with CPU decoding, or the knob on
    the PIL backend is a ValueError that names it."""
    dali_or_skip()
    root, _ = folder
    loader = _build(root, "dali", batch_size=4, image_size=16, decode_device="cpu")
    assert loader.backend.decode_device == "cpu"
    assert sum(b["images"].shape[0] for b in _epoch(loader, 0)) > 0
    loader.close()
    assert _build(root, "dali", batch_size=4, image_size=16).backend.decode_device == "cpu"
    for bad, msg in (("gpu", "decode_device='gpu' needs a CUDA device"), ("mixed", "decode_device must be"),
                     (0, "decode_device must be")):
        with pytest.raises(ValueError, match=msg):
            _build(root, "dali", batch_size=4, image_size=16, decode_device=bad)
    with pytest.raises(ValueError, match="hw_decoder_load=0.5 is the GPU decoder's knob"):
        _build(root, "dali", batch_size=4, image_size=16, decode_device="cpu", hw_decoder_load=0.5)
    with pytest.raises(ValueError, match="decode_device applies to backend='dali' only"):
        _build(root, "torch", batch_size=4, image_size=16, decode_device="cpu")


def test_resize_device_knob(folder):
    """resize_device says where DALI resizes the decoded crop: where it was decoded by default ("cpu" without
    CUDA); "gpu" without CUDA, an unknown value, or the knob on the PIL backend is a ValueError that names it."""
    dali_or_skip()
    root, _ = folder
    loader = _build(root, "dali", batch_size=4, image_size=16, decode_device="cpu", resize_device="cpu")
    assert loader.backend.resize_device == "cpu"
    assert all(b["images"].shape[1:] == (3, 16, 16) for b in _epoch(loader, 0))
    loader.close()
    if not torch.cuda.is_available():
        assert _build(root, "dali", batch_size=4, image_size=16).backend.resize_device == "cpu"
        with pytest.raises(ValueError, match="resize_device='gpu' needs a CUDA device"):
            _build(root, "dali", batch_size=4, image_size=16, resize_device="gpu")
    for bad in ("mixed", 1, "GPU"):
        with pytest.raises(ValueError, match="resize_device must be 'gpu' or 'cpu'"):
            _build(root, "dali", batch_size=4, image_size=16, resize_device=bad)
    with pytest.raises(ValueError, match="resize_device applies to backend='dali' only"):
        _build(root, "torch", batch_size=4, image_size=16, resize_device="cpu")


def test_dense_paths_round_trip(gen):
    """The file paths reach DALI as one zero-padded uint8 array plus lengths; cutting each row to its length
    gives back the exact bytes (any length, non-ASCII names)."""
    from tokenlabel.dataloading.dali_pipeline import _dense_paths, _encode_path

    n = int(torch.randint(1, 40, (1,), generator=gen))
    lens = torch.randint(1, 300, (n,), generator=gen).tolist()
    alphabet = "a\u00e9 b\u00fc/_x.Z"
    names = ["/d/" + "".join(alphabet[int(j)] for j in torch.randint(0, len(alphabet), (k,), generator=gen))
             for k in lens]
    enc = [_encode_path(x) for x in names]
    padded, ln = _dense_paths(enc)
    assert padded.dtype == np.uint8 and padded.shape == (n, max(len(e) for e in enc))
    assert ln.dtype == np.int32 and ln.shape == (n, 1)
    for row, k, e in zip(padded, ln[:, 0], enc):
        assert np.array_equal(row[:k], e) and not row[k:].any()


def test_dali_reads_the_named_file(tmp_path):
    """Paths of different lengths, with spaces and non-ASCII characters, in one batch: every sample is decoded
    from its own file (solid colours, so any crop shows which file it came from)."""
    dali_or_skip()
    root = tmp_path / "data"
    names = ["c0/a.jpg", "c0/a much longer name with spaces.jpg", "c1/\u00e9t\u00e9 \u00fcber.jpg",
             "c1/" + "n" * 120 + ".jpg"]
    colours = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20)]
    for name, col in zip(names, colours):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 40), col).save(root / name, quality=95)
    for train in (True, False):
        loader = _build(str(root), "dali", batch_size=4, image_size=16, train=train, randaugment=None,
                        random_erasing=0.0, drop_last=False)
        from tokenlabel.dataloading.sampling import list_dataset

        rel = list_dataset(str(root)).relpaths
        (b,) = _epoch(loader, 0)
        imgs = to_uint8(b["images"]).mean(axis=(1, 2))
        for j, i in enumerate(b["sample_ids"].tolist()):
            assert np.abs(imgs[j] - colours[names.index(rel[i])]).max() < 8, (train, rel[i], imgs[j])
        loader.close()


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_batches_on_device(folder, tmp_path, backend):
    root, rel = folder
    make_store(str(tmp_path / "store"), rel, num_classes=5, k=2, size=6)
    loader = _build(root, backend, labels=str(tmp_path / "store"), batch_size=4, image_size=32, device="cuda",
                    num_workers=2)
    for b in _epoch(loader, 0):
        for k, v in b.items():
            assert v.is_cuda, k
        v0 = b["label_values"][:, 0].float().cpu().numpy()
        for j, i in enumerate(b["sample_ids"].tolist()):
            vals = v0[j][v0[j] != 0]
            assert (vals == i).all()


@pytest.mark.gpu
def test_gpu_dali_mixed_matches_pil(folder, tmp_path):
    dali_or_skip()
    root, rel = folder
    make_store(str(tmp_path / "store"), rel, num_classes=5, k=3, size=8)
    kw = dict(labels=str(tmp_path / "store"), batch_size=6, image_size=40, seed=7, device="cuda")
    a = _epoch(_build(root, "dali", **kw), 2)
    b = _epoch(_build(root, "torch", **kw), 2)
    d = []
    for x, y in zip(a, b):
        for k in ("sample_ids", "classes", "boxes", "flips", "label_values", "label_indices"):
            assert torch.equal(x[k], y[k]), k
        d.append((to_uint8(x["images"]) - to_uint8(y["images"])).__abs__().mean(axis=(1, 2, 3)))
    assert np.median(np.concatenate(d)) < 6.0
    loader = _build(root, "dali", batch_size=6, image_size=40, device="cuda", randaugment=None, random_erasing=0.0,
                    interpolation="bilinear")
    for bt in _epoch(loader, 0):
        imgs = to_uint8(bt["images"])
        for j, i in enumerate(bt["sample_ids"].tolist()):
            full = Image.open(os.path.join(root, rel[i])).convert("RGB")
            H, W = full.height, full.width
            t, l, h, w = (bt["boxes"][j].double().cpu().numpy() * [H, W, H, W]).round().astype(int)
            c = np.asarray(full.resize((40, 40), Image.BILINEAR, box=(l, t, l + w, t + h)), np.float64)
            if bool(bt["flips"][j]):
                c = c[:, ::-1]
            assert np.abs(imgs[j] - c).mean() < 6.0


@pytest.mark.gpu
@pytest.mark.parametrize("resize_device", ["cpu", "gpu"])
def test_gpu_dali_cpu_decoding_matches_gpu_decoding(folder, tmp_path, resize_device):
    """decode_device="cpu" on CUDA, the resize on either device: the same samples, boxes, flips and label
    maps as nvJPEG decoding, the images on the GPU and within a few levels (libjpeg-turbo against nvJPEG, the
    resize on either device). resize_device="cpu" with GPU decoding is refused."""
    dali_or_skip()
    root, rel = folder
    make_store(str(tmp_path / "store"), rel, num_classes=5, k=3, size=8)
    kw = dict(labels=str(tmp_path / "store"), batch_size=6, image_size=40, seed=3, device="cuda")
    with pytest.raises(ValueError, match="resize_device='cpu' needs decode_device='cpu'"):
        _build(root, "dali", decode_device="gpu", resize_device="cpu", **kw)
    gpu = _build(root, "dali", **kw)
    assert (gpu.backend.decode_device, gpu.backend.resize_device) == ("gpu", "gpu")
    a = _epoch(gpu, 1)
    loader = _build(root, "dali", decode_device="cpu", resize_device=resize_device, **kw)
    assert (loader.backend.decode_device, loader.backend.resize_device) == ("cpu", resize_device)
    b = _epoch(loader, 1)
    assert len(a) == len(b) > 0
    d = []
    for x, y in zip(a, b):
        assert y["images"].is_cuda and y["images"].shape == x["images"].shape
        for k in ("sample_ids", "classes", "boxes", "flips", "label_values", "label_indices"):
            assert torch.equal(x[k], y[k]), k
        d.append(np.abs(to_uint8(x["images"]) - to_uint8(y["images"])).mean(axis=(1, 2, 3)))
    assert np.median(np.concatenate(d)) < 3.0


@pytest.mark.parametrize("lanes", [False, True, "direct"])
def test_dali_decoder_failure_recovers(folder, monkeypatch, lanes):
    """A file the header check lets through but DALI cannot decode: the batch is redone with the PIL
    decoder (which skips the file with a warning) and the epoch completes with full batches. One pipeline, the
    lanes, and "auto" with the engines' lane off (the consumer runs the failing pipeline itself)."""
    dali_or_skip()
    from tokenlabel.dataloading import sampling

    root, rel = folder
    with open(os.path.join(root, "c0", "zz_bad.jpg"), "wb") as f:
        f.write(b"\xff\xd8" + os.urandom(3000) + b"\xff\xd9")
    real = sampling.probe_bytes

    def lenient(data):
        try:
            return real(data)
        except Exception:  # noqa: BLE001
            return 40, 40, "jpeg"

    monkeypatch.setattr(sampling, "probe_bytes", lenient)
    kw = (dict(hw_decoder_load="auto", dali_threads=(1, 2)) if lanes == "direct" else LANES if lanes else {})
    loader = _build(root, "dali", batch_size=4, image_size=16, drop_last=False, **kw)
    if lanes == "direct":
        _engines_off_for_good(loader.backend.assist)
    with pytest.warns(RuntimeWarning) as rec:
        batches = _epoch(loader, 0)
    msgs = " ".join(str(w.message) for w in rec)
    assert "DALI could not decode" in msgs and "zz_bad.jpg" in msgs
    from tokenlabel.dataloading.sampling import list_dataset

    names = list_dataset(root).relpaths
    seen = [names[i] for b in batches for i in b["sample_ids"].tolist()]
    assert "c0/zz_bad.jpg" not in seen and len(seen) == len(names)
    again = _epoch(loader, 1)  # the loader stays usable
    assert sum(b["images"].shape[0] for b in again) == len(names)
    if lanes == "direct":
        assert loader.backend.lane_batches[0] == 0, loader.backend.lane_batches


def _engines_off_for_good(a):
    """Switch "auto"'s engines' lane off before the first stream, never to be tried again."""
    a.on, a.probe = False, 10**9
    a.probe_first = a.probe_max = 10**9


class _DiesInAChild:
    """Stands for garbage that holds CUDA (a dropped DALI pipeline): finalised in a forked child, it kills
    the child, as DALI's destructor does there (CUDA_ERROR_NOT_INITIALIZED, std::terminate)."""

    def __init__(self):
        self.parent = os.getpid()
        self.me = self  # a reference cycle: only the cyclic collector frees it

    def __del__(self):
        if os.getpid() != self.parent:
            os._exit(17)


def test_dali_worker_processes_survive_inherited_garbage(folder):
    """Garbage the parent had not collected when the workers forked is never finalised in a worker: the
    collector runs in the child and the pool stays usable (it used to break the second loader's pool)."""
    import gc

    dali_or_skip()
    root, _ = folder
    loader = _build(root, "dali", batch_size=4, image_size=16, drop_last=False)
    be = loader.backend
    be.worker_processes = 2
    was = gc.isenabled()
    gc.disable()  # keep the cycle as uncollected garbage until the fork
    try:
        _DiesInAChild()
        pool = be._process_pool()
    finally:
        if was:
            gc.enable()
    # a full collection inside each worker (more tasks than workers: every child gets at least one)
    assert all(f.result() >= 0 for f in [pool.submit(gc.collect) for _ in range(8)])
    assert pool.submit(os.getpid).result() != os.getpid()
    loader.close()


@pytest.mark.gpu
def test_gpu_default_decoder_settings(folder):
    """On CUDA with nvJPEG decoding the default is "auto": the engines' lane (4 threads, 2 ahead) beside the hybrid
    one (12 threads, 4 ahead), switched by its share; one pipeline on the hybrid path is 4 ahead; with CPU decoding,
    no hardware share and 2 ahead; lanes asked for get 4 threads for the engines' lane, 12 for the hybrid one, 2
    ahead each; explicit settings are kept."""
    dali_or_skip()
    root, _ = folder
    kw = dict(batch_size=4, image_size=16, device="cuda")
    loader = _build(root, "dali", **kw)
    b = loader.backend
    cores = os.cpu_count()
    assert (b.hw_decoder_load, b.num_threads, b.lane_prefetch) == ("auto", (min(4, cores), min(12, cores)), (2, 4))
    assert b.assist.on and b.reorder_limit == 16
    batches = _epoch(loader, 0) + _epoch(loader, 1)
    assert batches and all(x["images"].is_cuda for x in batches)
    assert b.assist.delivered >= len(batches) and sum(b.lane_batches) == b.assist.delivered
    loader.close()
    b = _build(root, "dali", hw_decoder_load=0.0, **kw).backend
    assert (b.hw_decoder_load, b.num_threads, b.prefetch) == (0.0, min(12, cores), 4)
    b = _build(root, "dali", decode_device="cpu", **kw).backend
    assert (b.hw_decoder_load, b.prefetch) == (0.0, 2)
    b = _build(root, "dali", hw_decoder_load=(1.0, 0.0), **kw).backend
    assert (b.hw_decoder_load, b.prefetch) == ((1.0, 0.0), 2)
    assert b.num_threads == (min(4, os.cpu_count()), min(12, os.cpu_count()))
    b = _build(root, "dali", hw_decoder_load=0.9, prefetch=3, **kw).backend
    assert (b.hw_decoder_load, b.prefetch) == (0.9, 3)
    loader = _build(root, "dali", hw_decoder_load=(1.0, 0.0), **kw)
    batches = _epoch(loader, 0)
    assert batches and all(b["images"].is_cuda for b in batches)
    # the lanes' stream runs on past the epoch (into the next, up to the reorder window) while the consumer reads
    assert sum(loader.backend.lane_batches) >= len(batches), loader.backend.lane_batches
    loader.close()


def test_hw_decoder_load(folder):
    """DALI's hardware-decoder share: 0.0 by default without CUDA (CPU decoding), a number in [0, 1] reaches the
    pipeline; anything else, or the knob on the PIL backend, is a ValueError
    that names it."""
    dali_or_skip()
    root, _ = folder
    assert _build(root, "dali", batch_size=4, image_size=16).backend.hw_decoder_load == 0.0
    loader = _build(root, "dali", batch_size=4, image_size=16, hw_decoder_load=0.9, dali_threads=3)
    assert (loader.backend.hw_decoder_load, loader.backend.num_threads) == (0.9, 3)
    assert _build(root, "dali", batch_size=4, image_size=16, hw_decoder_load=np.float32(0.5)).backend.hw_decoder_load == 0.5
    assert sum(b["images"].shape[0] for b in _epoch(loader, 0)) > 0  # the graph takes the knob
    loader.close()
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="hw_decoder_load"):
            _build(root, "dali", batch_size=4, image_size=16, hw_decoder_load=bad)
    with pytest.raises(ValueError, match="hw_decoder_load.*dali"):
        _build(root, "torch", batch_size=4, image_size=16, hw_decoder_load=0.5)


def test_prefetch_depth(folder):
    """DALI's prefetch depth reaches the pipeline; anything but an integer >= 1 is a ValueError that names it."""
    dali_or_skip()
    root, _ = folder
    loader = _build(root, "dali", batch_size=4, image_size=16, prefetch=4)
    assert loader.backend.prefetch == 4
    assert sum(b["images"].shape[0] for b in _epoch(loader, 0)) > 0
    loader.close()
    assert _build(root, "dali", batch_size=4, image_size=16, prefetch=np.int64(3)).backend.prefetch == 3
    assert _build(root, "dali", batch_size=4, image_size=16).backend.prefetch == 2  # CPU decoding's default
    for bad in (0, -1, 2.5, True, "2"):
        with pytest.raises(ValueError, match="prefetch must be an integer >= 1"):
            _build(root, "dali", batch_size=4, image_size=16, prefetch=bad)
    with pytest.raises(ValueError, match="prefetch applies to backend='dali' only"):
        _build(root, "torch", batch_size=4, image_size=16, prefetch=4)


def test_close_waits_for_the_worker_processes(folder):
    """close() leaves none of the loader's worker processes, nor the process pool's queue-feeder thread, behind
    (the GPU default runs the batch metadata in forked workers): an interpreter exiting right after close()
    must not race them. The loader still works after close()."""
    dali_or_skip()
    import multiprocessing
    import threading

    root, _ = folder
    loader = _build(root, "dali", batch_size=4, image_size=16)
    loader.backend.worker_processes = 2   # as on a GPU box (made on first use)
    before = {p.pid for p in multiprocessing.active_children()}
    assert len(_epoch(loader, 0)) > 0
    spawned = {p.pid for p in multiprocessing.active_children()} - before
    assert len(spawned) == 2
    loader.close()
    assert not spawned & {p.pid for p in multiprocessing.active_children()}
    assert "QueueFeederThread" not in {t.name for t in threading.enumerate()}
    assert len(_epoch(loader, 1)) > 0     # a later epoch makes them again
    loader.close()



def test_torch_close_stops_the_persistent_workers(folder):
    """The PIL DataLoader's persistent workers stop at close(), their queue-feeder threads with them (not at the
    interpreter's exit, where a feeder thread raced its closing pipe); a later epoch starts new ones and the loader
    gives the same batches as before."""
    import multiprocessing
    import threading

    root, _ = folder
    loader = _build(root, "torch", batch_size=4, image_size=16, num_workers=2)
    before = {p.pid for p in multiprocessing.active_children()}
    first = _epoch(loader, 0)
    spawned = {p.pid for p in multiprocessing.active_children()} - before
    assert len(spawned) == 2
    loader.close()
    assert not spawned & {p.pid for p in multiprocessing.active_children()}
    assert not [t for t in threading.enumerate() if t.name == "QueueFeederThread" and t.is_alive()]
    again = _epoch(loader, 0)
    assert [b["classes"].tolist() for b in again] == [b["classes"].tolist() for b in first]
    loader.close()
    loader.close()  # twice is fine


# ---------------------------------------------------------------------------------------------- lanes
LANES = dict(hw_decoder_load=(1.0, 0.0), dali_threads=(1, 2))  # on the CPU the loads are unused: two pipelines


def _one_pipeline_epochs(root, rel, tmp_path, seed, epochs):
    """(the loader arguments with a label store, {epoch: the batches of one DALI pipeline}) for the lanes tests."""
    dali_or_skip()
    make_store(str(tmp_path / "store"), rel, num_classes=5, k=2, size=6)
    kw = dict(labels=str(tmp_path / "store"), batch_size=2, image_size=24, seed=seed)
    one = _build(root, "dali", **kw)
    want = {e: _epoch(one, e) for e in epochs}
    one.close()
    return kw, want


def test_dali_lanes_give_the_one_pipeline_batches(folder, tmp_path):
    """Two DALI pipelines sharing the batches (whichever asks first) deliver exactly the batches of one
    pipeline, in order, epoch after epoch from one stream, on a resume and after an interrupted epoch; both
    pipelines took part, and the stream keeps their pipelines when it restarts."""
    root, rel = folder
    kw, want = _one_pipeline_epochs(root, rel, tmp_path, 11, (0, 1, 3))
    loader = _build(root, "dali", **kw, **LANES)
    be = loader.backend
    assert be.lanes_spec == ((1.0, 1), (0.0, 2)) and be.reorder_limit == 16
    got = [_epoch(loader, e) for e in (0, 1)]
    assert be._generation == 1  # one stream for both epochs
    _same(got[0], want[0])
    _same(got[1], want[1])
    assert sum(be.lane_batches) >= 2 * len(loader) and min(be.lane_batches) > 0, be.lane_batches
    pipes = [lane.pipe for lane in be._lanes]
    _same(_epoch(loader, 1, start_batch=3), want[1][3:])
    assert be._generation == 2 and [lane.pipe for lane in be._lanes] == pipes  # drained and kept
    loader.set_epoch(3)
    it = iter(loader)
    first = next(it)
    del it
    _same([first] + _epoch(loader, 3, start_batch=1), want[3])
    be.reorder_limit = 1  # one batch in flight at a time: still every batch, in order
    _same(_epoch(loader, 0), want[0])
    be.reorder_limit = 0
    with pytest.raises(ValueError, match="reorder_limit must be an int >= 1"):
        _epoch(loader, 7)  # another epoch than the stream's next: a new stream, which checks the limit
    loader.close()
    three = _build(root, "dali", **kw, hw_decoder_load=(1.0, 1.0, 0.0), dali_threads=(1, 1, 1))  # the fallback
    assert three.backend.reorder_limit == 24
    _same(_epoch(three, 1), want[1])
    assert len(three.backend.lane_batches) == 3 and sum(three.backend.lane_batches) >= len(three)
    three.close()


def test_dali_lanes_end_with_their_loader(folder):
    import gc

    dali_or_skip()
    root, rel = folder
    for close in (True, False):
        loader = _build(root, "dali", batch_size=4, image_size=16, **LANES)
        _epoch(loader, 0)
        st = loader.backend._stream
        threads = [st.thread, *st.pumps]
        assert len(st.pumps) == 2 and all(t.is_alive() for t in threads)  # already preparing epoch 1
        if close:
            loader.close()
        else:
            del loader, st
            gc.collect()
        for t in threads:
            t.join(10)
            assert not t.is_alive(), t.name


def test_dali_lanes_raise_the_producers_error(folder, monkeypatch):
    """An error while preparing a batch reaches the training loop as it is, after the batches before it."""
    dali_or_skip()
    from tokenlabel.dataloading.dali_pipeline import DaliBackend

    root, rel = folder
    real = DaliBackend._prepare

    def prepare(self, epoch, b, idx):
        if b == 2:
            raise OSError("label store unreadable at batch 2")
        return real(self, epoch, b, idx)

    monkeypatch.setattr(DaliBackend, "_prepare", prepare)
    loader = _build(root, "dali", batch_size=4, image_size=16, **LANES)
    loader.set_epoch(0)
    got = []
    with pytest.raises(OSError, match="unreadable at batch 2"):
        for batch in loader:
            got.append(batch)
    assert len(got) == 2
    loader.close()


def test_dali_lanes_bad_settings(folder):
    dali_or_skip()
    root, rel = folder
    cases = [(dict(hw_decoder_load=(1.0, 0.0), dali_threads=(4,)), r"one count per hw_decoder_load entry"),
             (dict(hw_decoder_load=(1.0,) * 5), r"2\.\.4"),
             (dict(hw_decoder_load=()), r"2\.\.4"),
             (dict(hw_decoder_load=(1.0, 1.5)), r"\[0, 1\].*\(1\.0, 1\.5\)"),
             (dict(hw_decoder_load=(1.0, 0.0), dali_threads=(4, 0)), r"positive int"),
             (dict(hw_decoder_load=(0.0, 0.5), decode_device="cpu"), r"GPU decoder's knob"),
             (dict(hw_decoder_load="auto", decode_device="cpu"), r"auto is the GPU decoder's knob"),
             (dict(hw_decoder_load="Auto"), r"a sequence of them, or 'auto', got 'Auto'"),
             (dict(hw_decoder_load="auto", dali_threads=(4,)), r"one count per hw_decoder_load entry")]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            _build(root, "dali", batch_size=4, image_size=16, **kw)


def test_assist_switches_the_engines_lane_by_its_share():
    """hw_decoder_load="auto"'s switch: kept on while the engines' lane delivers >= min_share of the last ``window``
    deliveries (counted after ``settle`` deliveries; checked every window // 4 once the window is full), off below
    it; tried again after ``probe`` deliveries, which double while the tries fail (up to probe_max) and reset when
    one holds."""
    from tokenlabel.dataloading.dali_pipeline import _Assist

    a = _Assist(lane=0, settle=2, window=4, min_share=0.5, probe=(3, 12))
    assert a.on and a.probe == 3
    # settle: two deliveries by lane 0 are not counted; then 1 of 4 from lane 0: 25% < 50%: off
    for lane in (0, 0, 1, 0, 1):
        a.record(lane)
        assert a.on
    a.record(1)
    assert not a.on and a.shares == [0.25] and a.switches == 1 and a.probe == 3
    a.record(1), a.record(1)
    assert not a.on
    a.record(1)  # back on after 3 (a try)
    assert a.on and a.switches == 2
    for lane in (1, 1, 1, 1, 0, 1):  # the try fails (1 of 4 after the settle): off, the next try after 6
        a.record(lane)
    assert not a.on and a.probe == 6 and a.shares[-1] == 0.25
    for _ in range(5):
        a.record(1)
    assert not a.on
    a.record(1)
    assert a.on
    for lane in (0, 0, 0, 1, 0, 1):  # this try holds: 2 of 4 (50%): on, and the interval is reset
        a.record(lane)
    assert a.on and a.probe == 3 and a.shares[-1] == 0.5
    for lane in (0, 1) * 5:  # the last 4 checked after every delivery (window // 4 = 1): 50% each time, stays on
        a.record(lane)
    assert a.on and a.shares[-10:] == [0.5] * 10
    a.record(1)  # the last 4 now hold one delivery of lane 0: off, the next try after probe_first (not a try)
    assert not a.on and a.shares[-1] == 0.25 and a.probe == 3
    for want in (6, 12, 12):  # failed tries double the interval up to probe_max
        while not a.on:
            a.record(1)
        for _ in range(6):
            a.record(1)
        assert not a.on and a.probe == want
    st = a.stats()
    assert st["delivered"] == a.delivered and st["switches"] == a.switches and 0 < st["on_batches"] < st["delivered"]
    b = _Assist(lane=1, settle=0, window=8, min_share=0.3, probe=(5, 5))  # checks every 2 once 8 are counted
    for lane in (1, 1, 0, 0, 0, 0, 0, 0):  # 2 of 8: 25% < 30%
        b.record(lane)
    assert not b.on and b.shares == [0.25]
    c = _Assist(lane=1, settle=0, window=8, min_share=0.3, probe=(5, 5))
    for lane in (1, 1, 1, 0, 0, 0, 0, 0, 0):  # 3 of 8 at the check; the 9th delivery is not a check
        c.record(lane)
    assert c.on and c.shares == [0.375]
    c.record(0)  # the check after two more: the last 8 hold 1 of lane 1
    assert not c.on and c.shares == [0.375, 0.125]


def test_dali_auto_lanes_pause_and_resume_with_the_one_pipeline_batches(folder, tmp_path):
    """hw_decoder_load="auto" with its switch made to flip often (the engines' lane paused after every window and
    tried again 3 deliveries later): the paused pipeline hands out what it holds and restarts, and the batches are
    exactly the one-pipeline batches, across epochs of one stream, a resume and a restart; the pauses happened."""
    root, rel = folder
    kw, want = _one_pipeline_epochs(root, rel, tmp_path, 5, (0, 1, 2))
    loader = _build(root, "dali", **kw, hw_decoder_load="auto", dali_threads=(1, 2))
    be = loader.backend
    assert be.hw_decoder_load == "auto" and be.lanes_spec == ((1.0, 1), (0.0, 2)) and be.lane_prefetch == (2, 2)
    a = be.assist
    a.settle, a.window, a.min_share, a.probe_first, a.probe_max = 1, 2, 1.0, 3, 3
    a.probe = 3
    got = [_epoch(loader, e) for e in (0, 1)]
    assert be._generation == 1
    _same(got[0], want[0])
    _same(got[1], want[1])
    _same(_epoch(loader, 2, start_batch=2), want[2][2:])  # a new stream: the switch's state carries over
    _same(_epoch(loader, 0), want[0])
    st = a.stats()
    assert st["switches"] >= 6 and 0 < st["on_batches"] < st["delivered"], st
    assert min(be.lane_batches) > 0, be.lane_batches
    loader.close()
    # the switch kept on (min_share 0): the plain lanes
    loader = _build(root, "dali", **kw, hw_decoder_load="auto", dali_threads=(1, 2))
    loader.backend.assist.min_share = 0.0
    _same(_epoch(loader, 1), want[1])
    assert loader.backend.assist.stats()["switches"] == 0
    loader.close()


def test_dali_auto_engines_off_the_consumer_runs_the_hybrid_pipeline(folder, tmp_path, monkeypatch):
    """"auto" with the engines' lane off: the consumer runs the other pipeline itself (as the one-pipeline path
    does, no pump thread in between) and gets exactly the one-pipeline batches, across epochs of one stream, a
    resume at a later batch (a new stream starting with the lane off) and a restart; switched on again mid-stream,
    the lanes' pump threads take both pipelines over."""
    from tokenlabel.dataloading import dali_pipeline as dp

    root, rel = folder
    kw, want = _one_pipeline_epochs(root, rel, tmp_path, 3, (0, 1, 2))
    ran = []
    real = dp._run_direct

    def counted(lane, dispatch, position):
        ran.append(position)
        return real(lane, dispatch, position)

    monkeypatch.setattr(dp, "_run_direct", counted)
    loader = _build(root, "dali", **kw, hw_decoder_load="auto", dali_threads=(1, 2))
    be = loader.backend
    _engines_off_for_good(be.assist)
    got = [_epoch(loader, e) for e in (0, 1)]
    _same(got[0], want[0])
    _same(got[1], want[1])
    assert be._generation == 1 and be.lane_batches[0] == 0
    n = len(loader)
    assert ran[:2 * n] == [(e, b) for e in (0, 1) for b in range(n)], ran  # each batch by the consumer
    _same(_epoch(loader, 2, start_batch=2), want[2][2:])
    _same(_epoch(loader, 0), want[0])
    assert be._generation == 3 and be.lane_batches[0] == 0
    # on again after 3 more batches: the pumps take over (the engines' lane delivers some)
    a = be.assist
    a.settle, a.window, a.min_share, a.probe, a.probe_first, a.probe_max = 0, 10**6, 0.0, 3, 3, 3
    a.off_for = 0
    before = len(ran)
    _same(_epoch(loader, 1), want[1])
    assert a.on and len(ran) - before == 3 and be.lane_batches[0] > 0, (ran, be.lane_batches)
    loader.close()


def test_dali_auto_lanes_end_while_paused(folder):
    """A loader whose engines' lane is paused (switched off for good) ends its threads when closed, and a
    producer error still reaches the consumer."""
    dali_or_skip()
    root, rel = folder
    loader = _build(root, "dali", batch_size=4, image_size=16, hw_decoder_load="auto", dali_threads=(1, 1))
    a = loader.backend.assist
    a.settle, a.window, a.min_share, a.probe_first, a.probe_max = 0, 1, 1.0, 10**9, 10**9
    a.probe = 10**9
    _epoch(loader, 0)
    _epoch(loader, 1)
    st = loader.backend._stream
    threads = [st.thread, *st.pumps]
    assert not a.on and a.switches == 1
    loader.close()
    for t in threads:
        t.join(10)
        assert not t.is_alive(), t.name


@pytest.mark.gpu
def test_gpu_dali_lanes(folder, tmp_path):
    """On CUDA, two nvJPEG pipelines sharing the batches: with the same load on both, exactly the one-pipeline
    batches; the hardware engines (1.0) beside the hybrid path (0.0) give the same samples, geometry and label
    maps and images within a few levels (the two decoders' chroma upsampling), with both pipelines taking
    part; the images stay valid after the lanes have moved on (their copies belong to the consumer)."""
    dali_or_skip()
    root, rel = folder
    make_store(str(tmp_path / "store"), rel, num_classes=5, k=3, size=8)
    kw = dict(labels=str(tmp_path / "store"), batch_size=2, image_size=40, seed=9, device="cuda")
    # one pipeline on the lanes' decoder (the hybrid path: lanes are the default on CUDA, so say so) and thread count
    one = _build(root, "dali", hw_decoder_load=0.0, dali_threads=2, **kw)
    want = [_epoch(one, e) for e in (0, 1)]
    one.close()
    same = _build(root, "dali", hw_decoder_load=(0.0, 0.0), dali_threads=(2, 2), **kw)
    got = [_epoch(same, e) for e in (0, 1)]
    assert min(same.backend.lane_batches) > 0, same.backend.lane_batches
    same.close()
    torch.cuda.synchronize()
    for e in (0, 1):
        _same(got[e], want[e])
    mixed = _build(root, "dali", hw_decoder_load=(1.0, 0.0), **kw)
    b = _epoch(mixed, 0)
    assert min(mixed.backend.lane_batches) > 0, mixed.backend.lane_batches
    mixed.close()
    d = []
    for x, y in zip(want[0], b):
        assert y["images"].is_cuda
        for k in ("sample_ids", "classes", "boxes", "flips", "label_values", "label_indices"):
            assert torch.equal(x[k], y[k]), k
        d.append(np.abs(to_uint8(x["images"]) - to_uint8(y["images"])).mean(axis=(1, 2, 3)))
    assert np.median(np.concatenate(d)) < 3.0


@pytest.mark.gpu
def test_gpu_dali_auto_engines_off_is_the_hybrid_pipeline(folder, tmp_path):
    """On CUDA, "auto" with the engines' lane off for good: the consumer runs the hybrid pipeline itself, copying
    each batch out on the lane's stream without a host wait, and the batches equal one hybrid pipeline's bit for bit
    (same threads, same depth), over two epochs, a resume and a restart; the images stay valid after the loader has
    moved on and run the pipeline again (each copy is done before DALI reuses its buffers)."""
    dali_or_skip()
    root, rel = folder
    make_store(str(tmp_path / "store"), rel, num_classes=5, k=3, size=8)
    kw = dict(labels=str(tmp_path / "store"), batch_size=2, image_size=40, seed=4, device="cuda")
    one = _build(root, "dali", hw_decoder_load=0.0, dali_threads=2, prefetch=4, **kw)
    want = [_epoch(one, e) for e in (0, 1, 2)]
    one.close()
    auto = _build(root, "dali", hw_decoder_load="auto", dali_threads=(1, 2), **kw)
    assert auto.backend.lane_prefetch == (2, 4)
    _engines_off_for_good(auto.backend.assist)
    got = [_epoch(auto, e) for e in (0, 1)]
    got.append(_epoch(auto, 2, start_batch=1))
    again = _epoch(auto, 0)
    assert auto.backend.lane_batches[0] == 0, auto.backend.lane_batches
    auto.close()
    torch.cuda.synchronize()
    _same(got[0], want[0])
    _same(got[1], want[1])
    _same(got[2], want[2][1:])
    _same(again, want[0])
