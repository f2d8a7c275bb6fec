"""LabelStore: round trip, O(1) open, index dtype, compatibility and corruption errors."""
import json
import os
import pickle
import threading

import numpy as np
import pytest
import torch

from tokenlabel.dataloading.store import LabelStore, index_dtype_for


def _paths(n, rng):
    return [f"n{c:08d}/n{c:08d}_{rng.integers(1 << 30)}_{i}.JPEG" for i, c in enumerate(rng.integers(0, 50, n))]


def _maps(rng, n, k, s, c):
    values = rng.standard_normal((n, k, s, s)).astype(np.float32) * 8
    indices = rng.integers(0, c, (n, k, s, s))
    return values, indices


@pytest.fixture
def rng(gen):
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))


@pytest.mark.parametrize("n,c,k,s", [(37, 1000, 5, 18), (1, 1001, 1, 12), (9, 40000, 3, 7)])
def test_round_trip_random_row_order(tmp_path, rng, n, c, k, s):
    paths = _paths(n, rng)
    store = LabelStore.create(tmp_path / "st", paths, num_classes=c, k=k, size=s)
    values, indices = _maps(rng, n, k, s, c)
    order = rng.permutation(n)
    # write in random order and random chunk sizes
    pos = 0
    while pos < n:
        m = int(rng.integers(1, 8))
        rows = order[pos:pos + m]
        store.write(rows, values[rows], torch.from_numpy(indices[rows]), mark_done=True)
        pos += m
    store.close()

    ro = LabelStore.open(tmp_path / "st")
    assert (len(ro), ro.num_classes, ro.k, ro.size) == (n, c, k, s)
    assert ro.paths == paths
    assert ro.index_dtype == index_dtype_for(c)
    assert ro.done.all() and ro.num_done == n
    query = rng.permutation(n)[: max(1, n // 2)]
    v, i = ro.read(query)
    np.testing.assert_array_equal(v, values[query].astype(np.float16))
    np.testing.assert_array_equal(i, indices[query])
    # by path, with either separator
    p = paths[int(query[0])]
    assert ro.row(p.replace("/", "\\")) == int(query[0])
    v1, i1 = ro.read_paths([p])
    np.testing.assert_array_equal(i1[0], indices[query[0]])
    # torch view
    tv, ti = ro.read_torch(query, index_dtype=torch.int64)
    assert tv.dtype == torch.float16 and ti.dtype == torch.int64 and tv.shape == (len(query), k, s, s)
    assert torch.equal(ti, torch.from_numpy(indices[query]))
    # pickling (spawned DataLoader workers) reopens the files read-only instead of copying the maps
    clone = pickle.loads(pickle.dumps(ro))
    assert len(pickle.dumps(ro)) < 1000 and clone.mode == "r"
    np.testing.assert_array_equal(clone.read(query)[1], indices[query])
    assert isinstance(ro.prefetch(), bool)
    # an int row still gives a batch of one
    assert ro.read(int(query[0]))[0].shape == (1, k, s, s)


def test_int32_indices_above_int16(tmp_path, rng):
    c = 32768  # ids up to 32767 need int32
    store = LabelStore.create(tmp_path / "st", ["a/b.jpg", "a/c.jpg"], num_classes=c, k=2, size=3)
    assert store.index_dtype == np.int32
    idx = rng.integers(32000, c, (2, 2, 3, 3))
    idx[0, 0, 0, 0] = c - 1
    store.write([0, 1], rng.standard_normal((2, 2, 3, 3)), idx)
    np.testing.assert_array_equal(LabelStore.open(tmp_path / "st").read([0, 1])[1], idx)
    assert LabelStore.create(tmp_path / "s2", ["x"], num_classes=32767, k=1, size=1).index_dtype == np.int16


def _rchar():
    # this thread's count: reads by other threads of the process (a producer thread or DALI's workers
    # left by an earlier test) would otherwise be counted as the store's
    with open(f"/proc/self/task/{threading.get_native_id()}/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("no rchar")


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc/self/task/<tid>/io")
def test_open_does_not_read_the_maps(tmp_path, rng):
    # 20,000 rows of [5, 64, 64]: each array is ~0.8 GB but sparse on disk (created, never written).
    n, k, s = 20000, 5, 64
    paths = [f"c{i % 10}/img_{i}.JPEG" for i in range(n)]
    st = LabelStore.create(tmp_path / "big", paths, num_classes=1000, k=k, size=s)
    row = int(rng.integers(n))
    v, i = _maps(rng, 1, k, s, 1000)
    st.write([row], v, i, mark_done=True)
    st.close()
    nbytes = n * k * s * s * 2
    assert os.path.getsize(tmp_path / "big" / "values.npy") > nbytes
    before = _rchar()
    ro = LabelStore.open(tmp_path / "big")
    got_v, got_i = ro.read([row])
    read_bytes = _rchar() - before
    assert isinstance(ro.values, np.memmap) and isinstance(ro.indices, np.memmap)
    # the JSON files and headers are read with read(); the maps come in through the mapping
    paths_bytes = os.path.getsize(tmp_path / "big" / "paths.json")
    assert read_bytes < paths_bytes + 200_000 < nbytes // 100
    np.testing.assert_array_equal(got_i, i)
    assert ro.num_done == 1 and ro.done[row]


def test_refuses_to_clobber(tmp_path):
    LabelStore.create(tmp_path / "st", ["a"], num_classes=3, k=1, size=2)
    with pytest.raises(FileExistsError, match="overwrite"):
        LabelStore.create(tmp_path / "st", ["a", "b"], num_classes=3, k=1, size=2)
    s = LabelStore.create(tmp_path / "st", ["a", "b"], num_classes=3, k=1, size=2, overwrite=True)
    assert len(s) == 2 and s.num_done == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="not a label store"):
        LabelStore.create(tmp_path / "other", ["a"], num_classes=3, k=1, size=2, overwrite=True)
    assert (tmp_path / "other" / "precious.txt").exists()


def test_bad_arguments(tmp_path, rng):
    with pytest.raises(ValueError, match="duplicate"):
        LabelStore.create(tmp_path / "d", ["a/b", "a//b"], num_classes=3, k=1, size=2)
    with pytest.raises(ValueError, match="relative"):
        LabelStore.create(tmp_path / "d", ["/abs/b"], num_classes=3, k=1, size=2)
    with pytest.raises(ValueError, match="k=4"):
        LabelStore.create(tmp_path / "d", ["a"], num_classes=3, k=4, size=2)
    st = LabelStore.create(tmp_path / "st", ["a", "b", "c"], num_classes=7, k=2, size=4)
    v, i = _maps(rng, 2, 2, 4, 7)
    with pytest.raises(ValueError, match=r"values must have shape \[n, k, S, S\] = \[2, 2, 4, 4\]"):
        st.write([0, 1], v[:, :1], i)
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        st.write([0, 1], v, i + 7)
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        st.write([0, 1], v, i - 7)
    with pytest.raises(ValueError, match="not finite"):
        st.write([0, 1], v * 1e6, i)
    with pytest.raises(ValueError, match="integer class ids"):
        st.write([0, 1], v, i.astype(bool))
    with pytest.raises(IndexError, match="3 rows"):
        st.write([0, 3], v, i)
    with pytest.raises(ValueError, match="repeat"):
        st.write([1, 1], v, i)
    assert st.num_done == 0  # nothing above wrote or marked anything
    ro = LabelStore.open(tmp_path / "st")
    with pytest.raises(PermissionError, match="read-only"):
        ro.write([0, 1], v, i)
    with pytest.raises(KeyError, match="'zz'"):
        ro.row("zz")


def test_missing_and_done(tmp_path, rng):
    st = LabelStore.create(tmp_path / "st", ["a/1", "a/2", "b/3"], num_classes=5, k=1, size=2)
    v, i = _maps(rng, 1, 1, 2, 5)
    st.write([1], v, i)  # written but not marked done: still missing
    assert st.missing(["a/1", "a/2", "b/3", "c/4"]) == ["a/1", "a/2", "b/3", "c/4"]
    st.mark_done([1])
    assert st.missing(["a/1", "a/2", "b/3", "c/4"]) == ["a/1", "b/3", "c/4"]
    assert list(LabelStore.open(tmp_path / "st").done) == [False, True, False]
    st.mark_not_done([1])
    assert LabelStore.open(tmp_path / "st").num_done == 0


def test_check_compatible(tmp_path):
    st = LabelStore.create(tmp_path / "st", ["a"], num_classes=10, k=3, size=6)
    st.check_compatible(num_classes=10, k=3, size=6)
    st.check_compatible()
    with pytest.raises(ValueError, match="num_classes: store has 10, run expects 11") as e:
        st.check_compatible(num_classes=11, k=3, size=7)
    assert "size: store has 6, run expects 7" in str(e.value) and "k:" not in str(e.value)
    with pytest.raises(ValueError, match="k: store has 3, run expects 5"):
        st.check_compatible(k=5)


def test_provenance_persists(tmp_path):
    st = LabelStore.create(tmp_path / "st", ["a"], num_classes=3, k=1, size=1, provenance={"teacher": "t"})
    st.set_provenance(img_size=64, mean=[0.5, 0.5, 0.5])
    p = LabelStore.open(tmp_path / "st").provenance
    assert p == {"teacher": "t", "img_size": 64, "mean": [0.5, 0.5, 0.5]}


@pytest.mark.parametrize("damage", ["missing_file", "truncated", "wrong_shape", "bad_meta", "paths_count"])
def test_corrupt_store_errors(tmp_path, damage):
    root = tmp_path / "st"
    LabelStore.create(root, ["a", "b"], num_classes=5, k=2, size=3).close()
    if damage == "missing_file":
        os.remove(root / "indices.npy")
        match = "missing"
    elif damage == "truncated":
        with open(root / "values.npy", "r+b") as f:
            f.truncate(os.path.getsize(root / "values.npy") - 10)
        match = "values.npy"
    elif damage == "wrong_shape":
        np.lib.format.open_memmap(root / "indices.npy", mode="w+", dtype=np.int16, shape=(3, 2, 3, 3)).flush()
        match = r"meta.json says int16 \[2, 2, 3, 3\]"
    elif damage == "bad_meta":
        (root / "meta.json").write_text("{not json")
        match = "unreadable"
    else:
        (root / "paths.json").write_text(json.dumps(["a"]))
        match = "count=2"
    with pytest.raises(ValueError, match=match):
        LabelStore.open(root)
    with pytest.raises(FileNotFoundError):
        LabelStore.open(tmp_path / "nowhere")
