"""Rows kept on disk, read one at a time: RAM per process does not grow with the dataset.

A row cache is a small directory of flat int32 files: ``input_ids.bin`` and ``labels.bin`` hold fixed-width rows
(S+1 values each, so row i is at byte i*(S+1)*4), and packed data adds ``asl.bin`` (actual_seq_len values, rows
of varying length) with ``asl.idx`` (int64 start offsets, N+1). ``meta.json`` (written last, atomically) records
the row count and widths; a cache without it is incomplete and is rebuilt.

Reads use ``os.pread`` on an open descriptor rather than ``mmap``: a mapped page that was read stays in the
process's RSS until the kernel drops it, so an epoch over a mapped file would show the whole file in RSS; a
pread copies one row into a fresh buffer and keeps nothing (the page cache is the kernel's, shared by ranks).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import numpy as np

from ..errors import DataError

_I32 = 4


def _index(obj, key, one):
    """numpy-style indexing over rows read one at a time: an int, a slice, a list/array of ints, a tuple."""
    if isinstance(key, tuple):
        rows = _index(obj, key[0], one)
        rest = key[1:]
        return rows[rest] if np.ndim(key[0]) == 0 and not isinstance(key[0], slice) else rows[(slice(None),) + rest]
    if isinstance(key, slice):
        return np.stack([one(k) for k in range(*key.indices(obj.rows))]) if len(range(*key.indices(obj.rows))) \
            else np.zeros((0, obj.width), np.int32)
    if np.ndim(key) > 0:
        key = np.asarray(key)
        if key.dtype == bool:
            key = np.nonzero(key)[0]
        return np.stack([_index(obj, int(k), one) for k in key]) if len(key) else np.zeros((0, obj.width), np.int32)
    i = int(key)
    if i < 0:
        i += obj.rows
    if not 0 <= i < obj.rows:
        raise IndexError(f"row {i} out of range for {obj.rows} rows")
    return one(i)


class _AsArray:
    """Anything else numpy arrays offer (comparisons, ``.sum()``, ...) works on the whole array read into memory:
    for tools and tests on small data; the trainer only reads rows by index. Subclasses set ``rows`` and ``width``."""

    ndim = 2
    dtype = np.dtype(np.int32)

    @property
    def shape(self):
        return (self.rows, self.width)

    def __len__(self):
        return self.rows

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(np.asarray(self), name)

    def __eq__(self, other):
        return np.asarray(self) == other

    def __ne__(self, other):
        return np.asarray(self) != other

    def __lt__(self, other):
        return np.asarray(self) < other

    def __gt__(self, other):
        return np.asarray(self) > other

    __hash__ = None


class RowFile(_AsArray):
    """An array-like [N, W] of int32 over a flat file (``shape``, ``ndim``, ``len``, ``[i]``, ``np.asarray``)."""

    def __init__(self, path: str, rows: int, width: int):
        self.path, self.rows, self.width = path, int(rows), int(width)
        self._fd: Optional[int] = None
        need = self.rows * self.width * _I32
        have = os.path.getsize(path)
        if have != need:
            raise DataError(f"{path}: row cache holds {have} bytes, expected {need} ({rows} rows x {width} int32)")

    def _read(self, start: int, count: int) -> np.ndarray:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        nbytes = count * self.width * _I32
        buf = os.pread(self._fd, nbytes, start * self.width * _I32)
        if len(buf) != nbytes:
            raise DataError(f"{self.path}: short read at row {start} (file truncated while in use?)")
        return np.frombuffer(bytearray(buf), np.int32).reshape(count, self.width)

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.rows)
            return self._read(start, max(0, stop - start))
        return _index(self, key, lambda i: self._read(i, 1)[0])

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)

    def __getstate__(self):                      # picklable (worker processes): reopen lazily
        d = dict(self.__dict__)
        d["_fd"] = None
        return d

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class RaggedRows(_AsArray):
    """actual_seq_len rows of varying length, each padded with its last value to the widest row (as before)."""

    def __init__(self, values: str, index: str, rows: int, width: int):
        self.values = RowFile(values, os.path.getsize(values) // _I32, 1)
        self.index = index
        self.rows, self.width = int(rows), int(width)
        self._idx = RowFile(index, (self.rows + 1) * 2, 1)   # int64 offsets read as pairs of int32

    def _row(self, i: int) -> np.ndarray:
        lo, hi = (int(x) for x in self._idx._read(2 * i, 4).reshape(-1).view(np.int64))
        r = self.values._read(lo, hi - lo).reshape(-1) if hi > lo else np.zeros(0, np.int32)
        return np.concatenate([r, np.full(self.width - len(r), r[-1] if len(r) else 0, np.int32)])

    def __getitem__(self, key):
        return _index(self, key, self._row)

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)


class RowCacheWriter:
    """Streams rows (dicts with input_ids, labels[, actual_seq_len]) into a cache directory; ``close()`` makes it
    visible atomically (a temporary directory renamed into place), so ranks writing the same cache do not clash."""

    def __init__(self, directory: str, source: str = ""):
        self.directory, self.source = directory, source
        self.tmp = f"{directory}.tmp{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        self._f = {k: open(os.path.join(self.tmp, k + ".bin"), "wb") for k in ("input_ids", "labels", "asl")}
        self._idx = open(os.path.join(self.tmp, "asl.idx"), "wb")
        self._idx.write(np.zeros(1, np.int64).tobytes())
        self.rows, self.width, self.asl_width, self._asl_pos, self.packed = 0, None, 0, 0, None

    def add(self, row: dict):
        ids = np.asarray(row["input_ids"], np.int32).reshape(-1)
        lab = np.asarray(row["labels"], np.int32).reshape(-1)
        if self.width is None:
            self.width = len(ids)
            self.packed = "actual_seq_len" in row
        for c, r in (("input_ids", ids), ("labels", lab)):
            if len(r) != self.width:
                raise DataError(f"{self.source}: column {c!r} has rows of different lengths "
                                f"{sorted({self.width, len(r)})} (row {self.rows}); expected every row to be "
                                "seq_length + 1 long")
            self._f[c].write(r.tobytes())
        if self.packed:
            a = np.asarray(row.get("actual_seq_len", ()), np.int32).reshape(-1)
            self._f["asl"].write(a.tobytes())
            self._asl_pos += len(a)
            self.asl_width = max(self.asl_width, len(a))
            self._idx.write(np.int64(self._asl_pos).tobytes())
        self.rows += 1

    def abort(self):
        for f in list(self._f.values()) + [self._idx]:
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def close(self) -> str:
        for f in list(self._f.values()) + [self._idx]:
            f.close()
        meta = {"rows": self.rows, "width": self.width or 0, "packed": bool(self.packed),
                "asl_width": self.asl_width, "source": self.source}
        with open(os.path.join(self.tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
        if os.path.isdir(self.directory):              # another rank finished the same cache first
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            try:
                os.replace(self.tmp, self.directory)
            except OSError:
                shutil.rmtree(self.tmp, ignore_errors=True)
        return self.directory


def open_cache(directory: str):
    """(input_ids, labels, actual_seq_len or None, meta) of a finished cache, or None when there is none."""
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    n, w = meta["rows"], meta["width"]
    ids = RowFile(os.path.join(directory, "input_ids.bin"), n, w)
    lab = RowFile(os.path.join(directory, "labels.bin"), n, w)
    asl = RaggedRows(os.path.join(directory, "asl.bin"), os.path.join(directory, "asl.idx"), n,
                     meta["asl_width"]) if meta["packed"] else None
    return ids, lab, asl, meta
