"""MindSpore CKPT files read and written one tensor at a time.

A CKPT file is a concatenation of serialized ``Checkpoint`` protobuf messages (checkpoint.proto:
``Checkpoint{repeated Value value=1}``, ``Value{tag=1, TensorProto tensor=2}``,
``TensorProto{repeated int64 dims=1, string tensor_type=2, bytes tensor_content=3}``), one per tensor
(tensors over 512 MiB are split into consecutive values with the same tag), optionally followed by a
``b"crc_num"`` + 10-byte trailer. ``mindspore.save_checkpoint`` needs every tensor at once and
``mindspore.load_checkpoint`` parses the whole file (``f.read()`` + ``ParseFromString``), so neither
streams. :class:`CkptWriter` therefore writes the same records itself, one tensor at a time, with the
tensor bytes going straight from the array to the file; the output is byte-for-byte what
``mindspore.save_checkpoint`` writes for the same tensors (tested). :func:`iter_ckpt` walks the records
and reads each tensor's bytes straight into its array. Both only understand plain (not encrypted,
no MapParameter) checkpoints; string entries (``append_dict`` strings) are skipped by the readers.
A CKPT written by :class:`CkptWriter` gets a ``<file>.manifest.json`` sidecar (size, tensor count,
sha256) that :func:`~mindformers_sft.checkpoint.verify.verify` checks.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..errors import CheckpointError
from .atomic import _AtomicFile, _Committing, atomic_write_json
from .dtypes import from_ms_type, ms_type  # importing .dtypes registers numpy bfloat16
from .tensors import TensorInfo, TensorsLike, _as_bytes_view, _check_array, _iter_pairs

CKPT_SLICE_BYTES = 512 * 1024 * 1024       # MindSpore's slice size (serialization.SLICE_SIZE KB * 1024)
MANIFEST_SUFFIX = ".manifest.json"


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _ckpt_record_header(name: str, tensor_type: str, dims: Sequence[int], content_len: int) -> bytes:
    """Protobuf bytes of Checkpoint{value: Value{tag, tensor: TensorProto{dims, tensor_type, content}}}
    up to (not including) the content bytes, field order as protobuf serializes them."""
    tag = name.encode("utf-8")
    ttype = tensor_type.encode("utf-8")
    tp = b"".join(b"\x08" + _varint(int(d)) for d in dims)
    tp += b"\x12" + _varint(len(ttype)) + ttype + b"\x1a" + _varint(content_len)
    tp_len = len(tp) + content_len
    val = b"\x0a" + _varint(len(tag)) + tag + b"\x12" + _varint(tp_len)
    val_len = len(val) + tp_len
    return b"\x0a" + _varint(val_len) + val + tp


class CkptWriter(_Committing):
    """Write a MindSpore CKPT file tensor by tensor (atomically), identical to ``mindspore.save_checkpoint``.

    On close, a ``<path>.manifest.json`` (size, tensor count, sha256) is written beside it unless
    `manifest=False`; :func:`verify` uses it.
    """

    def __init__(self, path: str, manifest: bool = True):
        self.path = os.path.abspath(path)
        self.manifest = manifest
        self._af = _AtomicFile(self.path)
        self._names = set()
        self._sha = hashlib.sha256()
        self._size = 0
        self.nbytes = 0

    def __len__(self):
        return len(self._names)

    def _write(self, b):
        self._af.f.write(b)
        self._sha.update(b)
        self._size += len(b) if isinstance(b, bytes) else b.nbytes

    def add(self, name: str, arr: np.ndarray):
        arr = _check_array(name, arr, self.path)
        if name in self._names:
            raise CheckpointError(f"{self.path}: tensor '{name}' written twice")
        ttype = ms_type(arr.dtype, name, self.path)
        data = _as_bytes_view(arr)
        dims = list(arr.shape)
        try:
            if data.nbytes == 0:
                self._write(_ckpt_record_header(name, ttype, dims, 0))
            for i in range(0, data.nbytes, CKPT_SLICE_BYTES):
                chunk = data[i:i + CKPT_SLICE_BYTES]
                self._write(_ckpt_record_header(name, ttype, dims, chunk.nbytes))
                self._write(chunk)
        except BaseException:
            self.abort()
            raise
        self._names.add(name)
        self.nbytes += data.nbytes

    def close(self) -> str:
        man = self.path + MANIFEST_SUFFIX
        try:
            if os.path.exists(man):
                os.unlink(man)
            self._af.commit()
        except BaseException:
            self.abort()
            raise
        if self.manifest:
            atomic_write_json(man, {"file": os.path.basename(self.path), "format": "mindspore_ckpt",
                                    "bytes": self._size, "tensors": len(self._names),
                                    "sha256": self._sha.hexdigest()})
        return self.path

    def abort(self):
        self._af.abort()


def save_ckpt(tensors: TensorsLike, path: str, manifest: bool = True) -> str:
    """Write `tensors` (dict, or iterable of (name, array), or mindspore tensors) as a MindSpore CKPT file.

    Same bytes as ``mindspore.save_checkpoint([{'name': k, 'data': Tensor(v)} ...], path)``, but streamed
    and atomic.
    """
    with CkptWriter(path, manifest=manifest) as w:
        for k, v in _iter_pairs(tensors):
            w.add(k, v)
    return os.path.abspath(path)


class _CkptEntry(NamedTuple):
    name: str
    tensor_type: str
    dims: Tuple[int, ...]
    pieces: List[Tuple[int, int]]     # (file offset, length) of tensor_content slices


class _Reader:
    """Bounds-checked protobuf wire reading from a file."""

    def __init__(self, f, path: str, size: int):
        self.f, self.path, self.size = f, path, size

    def err(self, what: str, pos: int, name: str = "") -> CheckpointError:
        t = f" (tensor '{name}')" if name else ""
        return CheckpointError(f"{self.path}: not a valid MindSpore checkpoint: {what} at byte {pos}{t}; "
                               "the file is truncated, corrupt or encrypted")

    def varint(self, end: int, name: str = "") -> int:
        shift = result = 0
        start = self.f.tell()
        while True:
            if self.f.tell() >= end:
                raise self.err("unexpected end of data", start, name)
            b = self.f.read(1)
            if not b:
                raise self.err("unexpected end of file", start, name)
            result |= (b[0] & 0x7F) << shift
            if not b[0] & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise self.err("bad varint", start, name)

    def span(self, end: int, name: str = "") -> Tuple[int, int]:
        n = self.varint(end, name)
        start = self.f.tell()
        if start + n > end:
            raise self.err(f"a field of {n} bytes overruns its record", start, name)
        return start, start + n

    def skip(self, wire: int, end: int, name: str = ""):
        pos = self.f.tell()
        if wire == 0:
            self.varint(end, name)
        elif wire == 1:
            self.f.seek(pos + 8)
        elif wire == 2:
            _, e = self.span(end, name)
            self.f.seek(e)
        elif wire == 5:
            self.f.seek(pos + 4)
        else:
            raise self.err(f"unsupported protobuf wire type {wire}", pos, name)
        if self.f.tell() > end:
            raise self.err("field overruns its record", pos, name)


def _ckpt_records(f, path: str, size: int) -> Iterator[Tuple[str, str, Tuple[int, ...], int, int]]:
    """Yield (tag, tensor_type, dims, content offset, content length) of every Value record; stops at the
    optional crc trailer."""
    r = _Reader(f, path, size)
    pos = 0
    f.seek(0)
    while pos < size:
        if size - pos == 17:
            if f.read(7) == b"crc_num":
                return
            f.seek(pos)
        key = r.varint(size)
        if key != 0x0A:
            raise r.err(f"unexpected protobuf key {key:#x} (expected a Checkpoint.value record)", pos)
        vstart, vend = r.span(size)
        tag, ttype, dims, content = None, None, [], None
        while f.tell() < vend:
            fpos = f.tell()
            k = r.varint(vend, tag or "")
            field, wire = k >> 3, k & 7
            if field == 1 and wire == 2:
                s, e = r.span(vend)
                tag = f.read(e - s).decode("utf-8", errors="replace")
            elif field == 2 and wire == 2:
                ts, te = r.span(vend, tag or "")
                while f.tell() < te:
                    k2 = r.varint(te, tag or "")
                    f2, w2 = k2 >> 3, k2 & 7
                    if f2 == 1 and w2 == 0:
                        dims.append(r.varint(te, tag or ""))
                    elif f2 == 1 and w2 == 2:
                        ps, pe = r.span(te, tag or "")
                        while f.tell() < pe:
                            dims.append(r.varint(pe, tag or ""))
                    elif f2 == 2 and w2 == 2:
                        s, e = r.span(te, tag or "")
                        ttype = f.read(e - s).decode("utf-8", errors="replace")
                    elif f2 == 3 and w2 == 2:
                        s, e = r.span(te, tag or "")
                        content = (s, e - s)
                        f.seek(e)
                    else:
                        r.skip(w2, te, tag or "")
            elif field == 3 and wire == 2:
                raise CheckpointError(f"{path}: tensor '{tag}' is a MapParameter; only dense tensors are supported")
            else:
                r.skip(wire, vend, tag or "")
            if f.tell() > vend:
                raise r.err("field overruns its record", fpos, tag or "")
        if tag is None or ttype is None or content is None:
            raise r.err("a record without tag, tensor_type or tensor_content", vstart, tag or "")
        dims = tuple(d - (1 << 64) if d >= 1 << 63 else d for d in dims)
        yield tag, ttype, dims, content[0], content[1]
        pos = vend
        f.seek(pos)


def _ckpt_entries(path: str) -> Iterator[_CkptEntry]:
    """Tensors of a CKPT file (consecutive records with one tag merged), sizes checked, data not read."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path}: empty file (not a MindSpore checkpoint)")
    with open(path, "rb") as f:
        cur: Optional[_CkptEntry] = None
        for tag, ttype, dims, off, n in _ckpt_records(f, path, size):
            if cur is not None and tag == cur.name:
                if ttype != cur.tensor_type or dims != cur.dims:
                    raise CheckpointError(f"{path}: tensor '{tag}': its slices disagree on dtype/shape")
                cur.pieces.append((off, n))
                continue
            if cur is not None:
                yield _check_entry(cur, path)
            cur = _CkptEntry(tag, ttype, dims, [(off, n)])
        if cur is not None:
            yield _check_entry(cur, path)


def _check_entry(e: _CkptEntry, path: str) -> _CkptEntry:
    if e.tensor_type == "str":
        return e
    dtype = from_ms_type(e.tensor_type, e.name, path)
    dims = () if e.dims == (0,) else e.dims
    want = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = sum(n for _, n in e.pieces)
    if want != got:
        raise CheckpointError(f"{path}: tensor '{e.name}' has {got} bytes of data but shape {list(dims)} "
                              f"{e.tensor_type} needs {want}; the file is truncated or corrupt")
    return e._replace(dims=dims)


def ckpt_infos(path: str) -> "OrderedDict[str, TensorInfo]":
    """name -> TensorInfo of a CKPT file's tensors (string entries skipped), without reading tensor data."""
    out = OrderedDict()
    for e in _ckpt_entries(path):
        if e.tensor_type == "str":
            continue
        if e.name in out:
            raise CheckpointError(f"{path}: tensor '{e.name}' appears twice")
        out[e.name] = TensorInfo(e.name, from_ms_type(e.tensor_type, e.name, path), e.dims, path)
    return out


def iter_ckpt(path: str, names: Optional[Iterable[str]] = None) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield (name, array) of a MindSpore CKPT file one tensor at a time (string entries skipped)."""
    wanted = set(names) if names is not None else None
    with open(path, "rb") as f:
        for e in _ckpt_entries(path):
            if e.tensor_type == "str" or (wanted is not None and e.name not in wanted):
                continue
            dtype = from_ms_type(e.tensor_type, e.name, path)
            buf = np.empty(sum(n for _, n in e.pieces), dtype=np.uint8)
            pos = 0
            for off, n in e.pieces:
                f.seek(off)
                got = f.readinto(memoryview(buf)[pos:pos + n])
                if got != n:
                    raise CheckpointError(f"{path}: tensor '{e.name}': file ended while reading its data")
                pos += n
            yield e.name, buf.view(dtype).reshape(e.dims)
            del buf
