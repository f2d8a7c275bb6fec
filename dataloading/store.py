"""LabelStore: memory-mapped top-k label maps for a whole dataset.

A store is a directory::

    meta.json      format, version, num_classes C, k, size S, count N, dtypes, provenance (teacher, ...)
    paths.json     the image paths, posix and relative to the dataset root; row i <-> paths[i]
    values.npy     [N, k, S, S] float16   teacher logits, top-k per location, sorted descending
    indices.npy    [N, k, S, S] int16     class ids (int32 when C > 32767)
    done.npy       [N] uint8              1 = this row holds a finished label map

The three arrays are plain ``.npy`` files opened with ``np.lib.format.open_memmap``: opening a store
reads only the ``.npy`` headers and the small JSON files, never the maps, and any row can be read
at random. The path index (a dict from path to row) is built the first time it is needed.

Writers put a row's values and indices first, flush them, and only then set its ``done`` byte
(flushed too). A killed writer can therefore leave a row half-written but never marked done, and
never touches rows that were already done: resuming means redoing exactly the rows not done.
"""
from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

FORMAT = "tokenlabel-labelstore"
VERSION = 1
INT16_MAX_CLASSES = 32767  # ids 0..32766 fit int16; above that the ids are stored as int32

_META, _PATHS, _VALUES, _INDICES, _DONE = "meta.json", "paths.json", "values.npy", "indices.npy", "done.npy"
_FILES = (_META, _PATHS, _VALUES, _INDICES, _DONE)


def index_dtype_for(num_classes: int) -> np.dtype:
    """Narrowest integer dtype that holds class ids in [0, num_classes)."""
    return np.dtype(np.int16) if num_classes <= INT16_MAX_CLASSES else np.dtype(np.int32)


def normalize_relpath(path: str) -> str:
    """A path as the store keys it: posix separators, relative, no '.' or '..' parts."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"image path must be a non-empty string, got {path!r}")
    p = path.replace("\\", "/")
    if p.startswith("/"):
        raise ValueError(f"image path {path!r} must be relative to the dataset root")
    p = posixpath.normpath(p)
    if p == "." or p.startswith("../") or p == "..":
        raise ValueError(f"image path {path!r} must stay inside the dataset root")
    return p


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class LabelStore:
    """Memory-mapped top-k label maps with an index from image path to row.

    Create with :meth:`create`, open with :meth:`open`. ``len(store)`` is the number of rows.
    """

    def __init__(self, path, meta: dict, paths: list[str], values, indices, done, mode: str):
        self.path = Path(path)
        self.mode = mode
        self._meta = meta
        self._paths = paths
        self._index: dict[str, int] | None = None
        self._values = values
        self._indices = indices
        self._done = done

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, path, paths: Sequence[str], num_classes: int, k: int, size: int,
               overwrite: bool = False, provenance: dict | None = None) -> "LabelStore":
        """Make an empty store (all rows not done) for ``paths`` and open it in mode ``"r+"``.

        Refuses an existing store unless ``overwrite=True``, and refuses a non-empty directory
        that is not a store in any case (nothing of the user's is deleted).
        """
        path = Path(path)
        for name, v in (("num_classes", num_classes), ("k", k), ("size", size)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        num_classes, k, size = int(num_classes), int(k), int(size)
        if k > num_classes:
            raise ValueError(f"k={k} must be at most num_classes={num_classes}")
        rel = [normalize_relpath(p) for p in paths]
        if not rel:
            raise ValueError("paths is empty: a label store needs at least one image")
        if len(set(rel)) != len(rel):
            seen, dup = set(), []
            for p in rel:
                if p in seen:
                    dup.append(p)
                seen.add(p)
            raise ValueError(f"paths has {len(dup)} duplicate(s), e.g. {dup[:3]}")

        if path.exists():
            if not path.is_dir():
                raise ValueError(f"label store path {str(path)!r} exists and is not a directory")
            entries = set(os.listdir(path))
            if entries:
                if _META not in entries:
                    raise ValueError(f"{str(path)!r} is a non-empty directory that is not a label store; "
                                     "refusing to write into it")
                if not overwrite:
                    raise FileExistsError(f"label store {str(path)!r} already exists "
                                          "(pass overwrite=True / --overwrite to replace it)")
                # meta first: a crash mid-removal leaves a directory that no longer opens as a store
                for name in _FILES:
                    if (path / name).exists():
                        (path / name).unlink()
        path.mkdir(parents=True, exist_ok=True)

        n = len(rel)
        shape = (n, k, size, size)
        idt = index_dtype_for(num_classes)
        # open_memmap(w+) writes the header and extends the file: the maps start sparse (zeros).
        np.lib.format.open_memmap(path / _VALUES, mode="w+", dtype=np.float16, shape=shape).flush()
        np.lib.format.open_memmap(path / _INDICES, mode="w+", dtype=idt, shape=shape).flush()
        np.lib.format.open_memmap(path / _DONE, mode="w+", dtype=np.uint8, shape=(n,)).flush()
        _atomic_write_json(path / _PATHS, rel)
        meta = {
            "format": FORMAT, "version": VERSION,
            "num_classes": num_classes, "k": k, "size": size, "count": n,
            "values_dtype": "float16", "indices_dtype": idt.name,
            "provenance": dict(provenance or {}),
        }
        _atomic_write_json(path / _META, meta)  # last: its presence marks a complete store
        return cls.open(path, mode="r+")

    @classmethod
    def open(cls, path, mode: str = "r") -> "LabelStore":
        """Open an existing store. ``mode="r"`` read-only, ``"r+"`` to write rows.

        Reads the JSON files and the .npy headers only (O(1) in the size of the maps).
        """
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"label store {str(path)!r} does not exist (or is not a directory)")
        missing = [f for f in _FILES if not (path / f).is_file()]
        if missing:
            raise ValueError(f"label store {str(path)!r} is incomplete or corrupt: missing {missing}")
        try:
            meta = json.loads((path / _META).read_text())
            paths = json.loads((path / _PATHS).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"label store {str(path)!r}: unreadable meta.json/paths.json ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{str(path / _META)!r} is not a tokenlabel label-store meta file")
        if meta.get("version") != VERSION:
            raise ValueError(f"label store {str(path)!r} has version {meta.get('version')}, "
                             f"this code reads version {VERSION}")
        try:
            n, k, s, c = (int(meta[x]) for x in ("count", "k", "size", "num_classes"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"label store {str(path)!r}: meta.json lacks a valid field ({e})") from None
        if not isinstance(paths, list) or len(paths) != n:
            raise ValueError(f"label store {str(path)!r}: paths.json holds "
                             f"{len(paths) if isinstance(paths, list) else type(paths).__name__} "
                             f"entries, meta says count={n}")
        idt = np.dtype(meta.get("indices_dtype", index_dtype_for(c).name))
        values = _open_array(path / _VALUES, mode, (n, k, s, s), np.dtype(np.float16))
        indices = _open_array(path / _INDICES, mode, (n, k, s, s), idt)
        done = _open_array(path / _DONE, mode, (n,), np.dtype(np.uint8))
        return cls(path, meta, paths, values, indices, done, mode)

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return int(self._meta["count"])

    def __repr__(self) -> str:
        return (f"LabelStore({str(self.path)!r}, count={len(self)}, num_classes={self.num_classes}, "
                f"k={self.k}, size={self.size}, done={self.num_done}, mode={self.mode!r})")

    @property
    def num_classes(self) -> int:
        return int(self._meta["num_classes"])

    @property
    def k(self) -> int:
        return int(self._meta["k"])

    @property
    def size(self) -> int:
        return int(self._meta["size"])

    @property
    def paths(self) -> list[str]:
        """Image paths (posix, relative to the dataset root) in row order. Do not mutate."""
        return self._paths

    @property
    def index_dtype(self) -> np.dtype:
        return self._indices.dtype

    @property
    def meta(self) -> dict:
        """A copy of the meta data (num_classes, k, size, count, dtypes, version, provenance)."""
        return json.loads(json.dumps(self._meta))

    @property
    def provenance(self) -> dict:
        return dict(self._meta.get("provenance", {}))

    def set_provenance(self, **info) -> None:
        """Merge ``info`` (JSON-serialisable: teacher name, preprocessing, ...) into the meta."""
        self._require_writable()
        prov = dict(self._meta.get("provenance", {}))
        prov.update(info)
        meta = dict(self._meta, provenance=prov)
        _atomic_write_json(self.path / _META, meta)
        self._meta = meta

    @property
    def values(self) -> np.memmap:
        """The raw [N, k, S, S] float16 memmap (no copy)."""
        return self._values

    @property
    def indices(self) -> np.memmap:
        """The raw [N, k, S, S] int16/int32 memmap (no copy)."""
        return self._indices

    @property
    def done(self) -> np.ndarray:
        """Bool mask [N]: rows that hold a finished label map (a copy)."""
        return np.asarray(self._done) != 0

    @property
    def num_done(self) -> int:
        return int(np.count_nonzero(self._done))

    # ------------------------------------------------------------------ lookup
    def _lookup(self) -> dict[str, int]:
        if self._index is None:
            self._index = {p: i for i, p in enumerate(self._paths)}
        return self._index

    def __contains__(self, relpath) -> bool:
        try:
            return normalize_relpath(relpath) in self._lookup()
        except ValueError:
            return False

    def row(self, relpath: str) -> int:
        """Row of the image at ``relpath`` (relative to the dataset root, either separator)."""
        key = normalize_relpath(relpath)
        try:
            return self._lookup()[key]
        except KeyError:
            raise KeyError(f"image {key!r} has no row in label store {str(self.path)!r} "
                           f"({len(self)} images; paths are relative to the dataset root, "
                           f"e.g. {self._paths[0]!r})") from None

    def rows(self, relpaths: Iterable[str]) -> np.ndarray:
        """Rows of many images (int64 array); KeyError naming the first unknown path."""
        return np.fromiter((self.row(p) for p in relpaths), dtype=np.int64)

    def missing(self, relpaths: Iterable[str]) -> list[str]:
        """The paths among ``relpaths`` with no finished label map (unknown to the store, or not done)."""
        idx = self._lookup()
        out = []
        for p in relpaths:
            try:
                r = idx.get(normalize_relpath(p))
            except ValueError:
                r = None
            if r is None or not self._done[r]:
                out.append(p)
        return out

    def check_compatible(self, num_classes: int | None = None, k: int | None = None,
                         size: int | None = None) -> None:
        """ValueError naming every field (C, k, S) that disagrees with the run's expectation."""
        bad = []
        for name, want, have in (("num_classes", num_classes, self.num_classes),
                                 ("k", k, self.k), ("size", size, self.size)):
            if want is not None and int(want) != have:
                bad.append(f"{name}: store has {have}, run expects {int(want)}")
        if bad:
            raise ValueError(f"label store {str(self.path)!r} does not match this run: " + "; ".join(bad))

    # ------------------------------------------------------------------ read / write
    def _as_rows(self, rows, name="rows") -> np.ndarray:
        r = np.asarray(rows)
        if r.ndim == 0:
            r = r.reshape(1)
        if r.ndim != 1:
            raise ValueError(f"{name} must be an int or a 1-D sequence of ints, got shape {tuple(r.shape)}")
        if r.size == 0:
            return r.astype(np.int64)
        if r.dtype.kind not in "iu":
            raise ValueError(f"{name} must be integers, got dtype {r.dtype}")
        r = r.astype(np.int64, copy=False)
        n = len(self)
        if r.min() < -n or r.max() >= n:
            raise IndexError(f"{name} out of range for a store of {n} rows: min {r.min()}, max {r.max()}")
        return np.where(r < 0, r + n, r)

    def read(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(values float16 [n,k,S,S], indices int16/int32 [n,k,S,S]) for ``rows`` (an int gives n=1).

        Copies out of the memmap (numpy fancy indexing); rows may be in any order and repeat.
        """
        r = self._as_rows(rows)
        return np.asarray(self._values[r]), np.asarray(self._indices[r])

    def read_torch(self, rows, device=None, pin_memory: bool = False, index_dtype=None):
        """Like :meth:`read` but as torch tensors (values float16; indices int16/int32, or ``index_dtype``).

        ``pin_memory=True`` returns page-locked CPU tensors (for non_blocking copies); ``device``
        moves them there (non_blocking when pinned).
        """
        import torch

        v, i = self.read(rows)
        v, i = torch.from_numpy(v), torch.from_numpy(i)
        if index_dtype is not None:
            i = i.to(index_dtype)
        if pin_memory:
            v, i = v.pin_memory(), i.pin_memory()
        if device is not None:
            v, i = v.to(device, non_blocking=pin_memory), i.to(device, non_blocking=pin_memory)
        return v, i

    def prefetch(self) -> bool:
        """Ask the OS to read the maps into the page cache in the background (posix_fadvise
        WILLNEED); returns immediately. Random reads from a cold store are disk-bound (one page
        fault per row), so a training run calls this once at start-up. False where unsupported."""
        if not hasattr(os, "posix_fadvise"):
            return False
        for name in (_VALUES, _INDICES):
            fd = os.open(self.path / name, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        return True

    def read_paths(self, relpaths: Sequence[str]):
        """:meth:`read` by image path."""
        return self.read(self.rows(relpaths))

    def _require_writable(self):
        if self.mode != "r+":
            raise PermissionError(f"label store {str(self.path)!r} is open read-only; "
                                  "open it with mode='r+' to write")

    def write(self, rows, values, indices, mark_done: bool = False) -> None:
        """Write label maps into ``rows``; validates shapes, dtypes and class-id range.

        ``values``: [n,k,S,S] floats (stored as float16; must be finite there); ``indices``:
        [n,k,S,S] integer class ids in [0, C) (float arrays holding whole numbers, like the
        reference's fp16 ids, are accepted). Accepts numpy arrays or torch tensors.
        With ``mark_done=True`` the rows are flushed and then marked done.
        """
        self._require_writable()
        r = self._as_rows(rows)
        values, indices = _to_numpy(values), _to_numpy(indices)
        want = (len(r), self.k, self.size, self.size)
        for name, a in (("values", values), ("indices", indices)):
            if tuple(a.shape) != want:
                raise ValueError(f"{name} must have shape [n, k, S, S] = {list(want)} for {len(r)} rows, "
                                 f"got {list(a.shape)}")
        if len(np.unique(r)) != len(r):
            raise ValueError("rows must not repeat within one write")
        if values.dtype.kind != "f":
            raise ValueError(f"values must be floating point, got dtype {values.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below
            v16 = values.astype(np.float16)
        if not np.isfinite(v16).all():
            bad = int(np.count_nonzero(~np.isfinite(v16)))
            raise ValueError(f"values hold {bad} entries that are not finite in float16 "
                             f"(|x| > 65504, NaN or Inf); label maps must be finite logits")
        if indices.dtype.kind == "f":
            if not (np.isfinite(indices).all() and (np.round(indices) == indices).all()):
                raise ValueError("indices given as floats must hold whole class ids")
        elif indices.dtype.kind not in "iu":
            raise ValueError(f"indices must be integer class ids, got dtype {indices.dtype}")
        if indices.size:
            lo, hi = indices.min(), indices.max()
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"indices must be class ids in [0, {self.num_classes}), "
                                 f"got min {lo}, max {hi}")
        if len(r) == 0:
            return
        # numpy fancy-index assignment writes row by row into the mapping
        self._values[r] = v16
        self._indices[r] = indices.astype(self._indices.dtype)
        if mark_done:
            self.mark_done(r)

    def mark_done(self, rows) -> None:
        """Flush the maps, then mark ``rows`` as finished (and flush that too)."""
        self._require_writable()
        r = self._as_rows(rows)
        self._values.flush()
        self._indices.flush()
        self._done[r] = 1
        self._done.flush()

    def mark_not_done(self, rows) -> None:
        """Clear the done flag of ``rows`` (they will be redone by a resumed annotation)."""
        self._require_writable()
        r = self._as_rows(rows)
        self._done[r] = 0
        self._done.flush()

    def flush(self) -> None:
        if self.mode == "r+":
            self._values.flush()
            self._indices.flush()
            self._done.flush()

    def close(self) -> None:
        self.flush()
        # dropping the memmaps unmaps the files
        self._values = self._indices = self._done = None

    def __reduce__(self):
        # DataLoader/DALI workers started with spawn/forkserver get a fresh read-only mapping of the
        # same files instead of a pickled copy of the arrays.
        return (LabelStore.open, (str(self.path), "r"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def disk_bytes(self) -> int:
        """Bytes allocated on disk by the store's files (sparse parts not counted where the OS says)."""
        total = 0
        for f in _FILES:
            st = os.stat(self.path / f)
            total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
        return total


def _to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()
        return a.numpy()
    return np.asarray(a)


def _open_array(file: Path, mode: str, shape: tuple, dtype: np.dtype) -> np.memmap:
    """open_memmap with checks that name the file: header shape/dtype and the file's length."""
    try:
        arr = np.lib.format.open_memmap(file, mode=mode)
    except Exception as e:  # bad magic, truncated header, file shorter than the header says
        raise ValueError(f"label store file {str(file)!r} is corrupt or truncated ({type(e).__name__}: {e})") \
            from None
    if tuple(arr.shape) != tuple(shape) or arr.dtype != dtype:
        raise ValueError(f"label store file {str(file)!r} holds {arr.dtype} {list(arr.shape)}, "
                         f"meta.json says {dtype} {list(shape)}")
    expected = arr.offset + arr.nbytes
    actual = os.path.getsize(file)
    if actual != expected:
        raise ValueError(f"label store file {str(file)!r} has {actual} bytes, expected {expected} "
                         f"(truncated or appended to)")
    return arr
