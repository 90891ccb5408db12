"""Streaming, atomic tensor files: safetensors (single, HF-sharded) and MindSpore CKPT.

Readers yield ``(name, np.ndarray)`` one tensor at a time; bf16 tensors are numpy arrays of dtype
:data:`~mindformers_sft.checkpoint.dtypes.BF16` (MindSpore's numpy bfloat16). Writers take a dict or an
iterable of ``(name, array)``, never hold more than one tensor, and commit atomically (temp file in the
same directory, fsync, ``os.replace``): a reader sees the old file or the complete new one, never a
partial one.

safetensors
    Read with ``safetensors.safe_open(path, framework="np")`` (memory-mapped; a handle is reopened every
    ``REOPEN_BYTES`` so the mapped pages a long file leaves behind do not pile up in RSS). Written by
    :class:`SafetensorsWriter`: when the tensor list (name, dtype, shape) is known up front (a dict, or a
    ``spec``), the header is written first and every tensor goes straight to its offset; otherwise the data
    is spooled to a temp file and copied behind the header at the end. Files are standard safetensors
    (header padded to 8 bytes, offsets contiguous in header order) readable by ``safetensors``,
    ``mindspore.load_checkpoint(format="safetensors")`` and transformers.

MindSpore CKPT
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

Integrity
    :func:`verify` checks a file or directory without loading it: safetensors header/length/offsets,
    CKPT record structure and sizes, every shard of an HF index. A CKPT written by :class:`CkptWriter` gets a
    ``<file>.manifest.json`` sidecar (size, tensor count, sha256): it catches truncation exactly at a record
    boundary (which the structure alone cannot), and ``verify(deep=True)`` checks the sha256.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections import OrderedDict
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from safetensors import safe_open

from ..errors import CheckpointError, ConfigError
from .dtypes import from_ms_type, from_st_code, ms_type, st_code  # importing .dtypes registers numpy bfloat16

TensorsLike = Union[Dict[str, np.ndarray], Iterable[Tuple[str, np.ndarray]]]
SpecLike = Sequence[Tuple[str, object, Sequence[int]]]

REOPEN_BYTES = 512 * 1024 * 1024          # re-open a safetensors handle after this many bytes read
CKPT_SLICE_BYTES = 512 * 1024 * 1024       # MindSpore's slice size (serialization.SLICE_SIZE KB * 1024)
HF_WEIGHTS_NAME = "model.safetensors"
HF_INDEX_NAME = "model.safetensors.index.json"
MANIFEST_SUFFIX = ".manifest.json"
_COPY_CHUNK = 16 * 1024 * 1024


class TensorInfo(NamedTuple):
    """What a file says about one tensor, without its data."""
    name: str
    dtype: np.dtype
    shape: Tuple[int, ...]
    file: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


# --------------------------------------------------------------------------------------------- helpers
def parse_size(value: Union[str, int], key: str = "--max_shard_size") -> int:
    """Bytes of '5GB', '10MB', '500KiB', '1.5GB', '1024' (GB/MB/KB are powers of 10, GiB/MiB/KiB of 2, as HF)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"{key}: expected a positive size, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ConfigError(f"{key}: '{value}' is not a size; expected e.g. '5GB', '10MB', '512MiB' or bytes")
    unit = (m.group(2) or "b").lower().rstrip("b") or "b"
    mult = {"b": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12,
            "ki": 2 ** 10, "mi": 2 ** 20, "gi": 2 ** 30, "ti": 2 ** 40}[unit]
    n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise ConfigError(f"{key}: expected a positive size, got '{value}'")
    return n


def _iter_pairs(tensors: TensorsLike) -> Iterator[Tuple[str, np.ndarray]]:
    if isinstance(tensors, dict):
        return iter(tensors.items())
    return iter(tensors)


def _as_bytes_view(arr: np.ndarray) -> np.ndarray:
    """C-contiguous little-endian uint8 view of `arr` (copies only if it is not contiguous/little-endian)."""
    a = np.ascontiguousarray(arr)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and np.little_endian is False):
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.reshape(-1).view(np.uint8)


def _fsync_dir(d: str):
    try:
        fd = os.open(d or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_name(path: str, tag: str = "tmp") -> str:
    d, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".{tag}", dir=d)
    os.close(fd)
    return tmp


class _AtomicFile:
    """A binary file written under a temp name in the target's directory and renamed over it on commit."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        d = os.path.dirname(self.path)
        if not os.path.isdir(d):
            raise CheckpointError(f"{path}: output directory '{d}' does not exist")
        self.tmp = _temp_name(self.path)
        self.f = open(self.tmp, "r+b")

    def commit(self):
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.chmod(self.tmp, 0o666 & ~_umask())     # mkstemp makes 0600; give the usual permissions
        os.replace(self.tmp, self.path)
        _fsync_dir(os.path.dirname(self.path))

    def abort(self):
        try:
            self.f.close()
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


def atomic_write_bytes(path: str, data: bytes):
    af = _AtomicFile(path)
    try:
        af.f.write(data)
        af.commit()
    except BaseException:
        af.abort()
        raise


def atomic_write_json(path: str, obj) -> None:
    """Write `obj` as indented JSON atomically (config.json, index, manifests)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _check_array(name: str, arr, where: str) -> np.ndarray:
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{where}: tensor name {name!r} is not a non-empty string")
    if not isinstance(arr, np.ndarray):
        if hasattr(arr, "asnumpy"):          # mindspore.Tensor / Parameter
            arr = arr.asnumpy()
        elif isinstance(arr, np.generic):
            arr = np.asarray(arr)
        else:
            raise CheckpointError(f"{where}: tensor '{name}' is a {type(arr).__name__}, expected a numpy array")
    return arr


# ------------------------------------------------------------------------------------------ safetensors
def _open_st(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such safetensors file")
    try:
        return safe_open(path, framework="np")
    except Exception as e:  # SafetensorError: header too small / incomplete metadata / invalid offsets
        raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupt: {e})") from None


def safetensors_metadata(path: str) -> Optional[Dict[str, str]]:
    """The `__metadata__` dict of a safetensors file (None if it has none)."""
    with _open_st(path) as f:
        return f.metadata()


def safetensors_infos(path: str) -> "OrderedDict[str, TensorInfo]":
    """name -> TensorInfo of a safetensors file, in data (offset) order, without reading tensor data."""
    out = OrderedDict()
    with _open_st(path) as f:
        for k in (f.offset_keys() if hasattr(f, "offset_keys") else f.keys()):
            s = f.get_slice(k)
            out[k] = TensorInfo(k, from_st_code(s.get_dtype(), k, path), tuple(int(x) for x in s.get_shape()), path)
    return out


def iter_safetensors(path: str, names: Optional[Iterable[str]] = None,
                     reopen_bytes: int = REOPEN_BYTES) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield (name, array) of a safetensors file one tensor at a time, in offset order.

    `names` restricts (and must be a subset of) the file's tensors. Each array is a private copy.
    """
    infos = safetensors_infos(path)
    if names is not None:
        wanted = set(names)
        missing = wanted - set(infos)
        if missing:
            raise CheckpointError(f"{path}: no tensor '{sorted(missing)[0]}' in this file")
        keys = [k for k in infos if k in wanted]
    else:
        keys = list(infos)
    f = None
    read = 0
    try:
        for k in keys:
            if f is None or read >= reopen_bytes:
                if f is not None:
                    f.__exit__(None, None, None)
                f = _open_st(path).__enter__()
                read = 0
            try:
                arr = f.get_tensor(k)
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read tensor '{k}' ({e})") from None
            read += arr.nbytes
            yield k, arr
            del arr      # do not keep the previous tensor alive while reading the next one
    finally:
        if f is not None:
            f.__exit__(None, None, None)


def _st_header(entries: List[Tuple[str, np.dtype, Tuple[int, ...], int]], metadata: Optional[dict],
               where: str) -> Tuple[bytes, List[Tuple[int, int]]]:
    """(8-byte length + padded JSON header, data offsets) for `entries` = [(name, dtype, shape, nbytes)]."""
    header = OrderedDict()
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise CheckpointError(f"{where}: safetensors metadata must map str to str; key {bad[0]!r} does not")
        header["__metadata__"] = dict(metadata)
    offsets = []
    pos = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": st_code(dtype, name, where), "shape": [int(x) for x in shape],
                        "data_offsets": [pos, pos + nbytes]}
        offsets.append((pos, pos + nbytes))
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def _norm_spec(spec: SpecLike, where: str) -> List[Tuple[str, np.dtype, Tuple[int, ...], int]]:
    out, seen = [], set()
    for name, dtype, shape in spec:
        if name in seen:
            raise CheckpointError(f"{where}: tensor '{name}' is listed twice")
        seen.add(name)
        d = np.dtype(dtype)
        shp = tuple(int(x) for x in shape)
        out.append((name, d, shp, int(np.prod(shp, dtype=np.int64)) * d.itemsize))
    return out


class _Committing:
    """Context manager of the writers: close (commit) on success, abort (remove temporaries) on error."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class SafetensorsWriter(_Committing):
    """Write one safetensors file tensor by tensor, atomically.

    With `spec` ([(name, dtype, shape)], the file's tensors in file order), tensors may be added in any
    order and go straight to their place; without it they are spooled to a temp file and the file is
    assembled on :meth:`close`. Use as a context manager (an exception aborts: nothing is written).
    """

    def __init__(self, path: str, metadata: Optional[Dict[str, str]] = None, spec: Optional[SpecLike] = None):
        self.path = os.path.abspath(path)
        self.metadata = dict(metadata) if metadata else None
        self._af = _AtomicFile(self.path)
        self._spool = None
        self._entries: List[Tuple[str, np.dtype, Tuple[int, ...], int]] = []
        self._written = set()
        self.nbytes = 0
        try:
            if spec is not None:
                self._spec = _norm_spec(spec, self.path)
                head, offs = _st_header(self._spec, self.metadata, self.path)
                self._base = len(head)
                self._where = {e[0]: (e, off) for e, off in zip(self._spec, offs)}
                self._af.f.write(head)
                self._af.f.truncate(self._base + (offs[-1][1] if offs else 0))
            else:
                self._spec = None
                self._spool_path = _temp_name(self.path, "spool")
                self._spool = open(self._spool_path, "wb")
        except BaseException:
            self.abort()
            raise

    def __len__(self):
        return len(self._written)

    def add(self, name: str, arr: np.ndarray):
        arr = _check_array(name, arr, self.path)
        if name in self._written:
            raise CheckpointError(f"{self.path}: tensor '{name}' written twice")
        data = _as_bytes_view(arr)
        if self._spec is not None:
            if name not in self._where:
                raise CheckpointError(f"{self.path}: tensor '{name}' is not in this file's tensor list")
            (n, d, shp, nb), (start, _) = self._where[name]
            if arr.dtype != d or tuple(arr.shape) != shp:
                raise CheckpointError(f"{self.path}: tensor '{name}' is {arr.dtype}{list(arr.shape)}, "
                                      f"expected {d}{list(shp)}")
            self._af.f.seek(self._base + start)
            self._af.f.write(data)
        else:
            self._entries.append((name, arr.dtype, tuple(arr.shape), data.nbytes))
            self._spool.write(data)
        self._written.add(name)
        self.nbytes += data.nbytes

    def close(self) -> str:
        """Finish and commit the file; returns its path."""
        try:
            if self._spec is not None:
                missing = [e[0] for e in self._spec if e[0] not in self._written]
                if missing:
                    raise CheckpointError(f"{self.path}: {len(missing)} tensor(s) never written, e.g. "
                                          f"'{missing[0]}'")
            else:
                self._spool.close()
                head, _ = _st_header(self._entries, self.metadata, self.path)
                self._af.f.write(head)
                with open(self._spool_path, "rb") as src:
                    shutil.copyfileobj(src, self._af.f, _COPY_CHUNK)
                os.unlink(self._spool_path)
                self._spool = None
            self._af.commit()
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self):
        self._af.abort()
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        sp = getattr(self, "_spool_path", None)
        if sp and os.path.exists(sp):
            os.unlink(sp)



def _spec_of_dict(tensors: Dict[str, np.ndarray], where: str):
    spec = []
    for k, v in tensors.items():
        a = v if isinstance(v, np.ndarray) else _check_array(k, v, where)
        spec.append((k, a.dtype, a.shape))
    return spec


def save_safetensors(tensors: TensorsLike, path: str, metadata: Optional[Dict[str, str]] = None) -> str:
    """Write `tensors` (dict or iterable of (name, array)) to one safetensors file atomically."""
    spec = _spec_of_dict(tensors, path) if isinstance(tensors, dict) else None
    with SafetensorsWriter(path, metadata, spec=spec) as w:
        for k, v in _iter_pairs(tensors):
            w.add(k, v)
    return os.path.abspath(path)


# ------------------------------------------------------------------------------------- HF sharded dirs
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


class ShardedSafetensorsWriter(_Committing):
    """Write a Hugging Face weights directory tensor by tensor.

    Tensors fill shards of at most `max_shard_size` bytes (a larger tensor gets a shard of its own), each
    shard is written as it fills, under a temp name. :meth:`close` renames them to
    ``model-0000i-of-0000N.safetensors`` and writes ``model.safetensors.index.json``
    (``metadata.total_size``, ``weight_map``), or a single ``model.safetensors`` (no index) when everything
    fits in one shard; weight files of an earlier save in the directory are then removed. With `spec`
    the sharding is planned up front and tensors may come in any order.
    """

    def __init__(self, out_dir: str, max_shard_size: Union[int, str] = "5GB",
                 metadata: Optional[Dict[str, str]] = None, spec: Optional[SpecLike] = None):
        self.out_dir = os.path.abspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = dict(metadata) if metadata else None
        self._shards: List[dict] = []   # {"tmp", "names", "size", "writer", "spec", "done"}
        self._assign: Dict[str, int] = {}
        self._cur: Optional[int] = None
        self.nbytes = 0
        self.count = 0
        self._planned = spec is not None
        self._written = set()
        if spec is not None:
            for name, dtype, shape, nbytes in _norm_spec(spec, self.out_dir):
                i = self._place(nbytes)
                self._shards[i]["spec"].append((name, dtype, shape))
                self._shards[i]["names"].append(name)
                self._assign[name] = i

    def _place(self, nbytes: int) -> int:
        """Index of the shard a tensor of `nbytes` goes to (HF's greedy rule), opening shards as needed.
        A tensor larger than max_shard_size gets a shard of its own; the next tensor starts a new one."""
        cur = self._shards[self._cur] if self._cur is not None else None
        if nbytes > self.max_shard_size:
            self._shards.append(self._new_shard(nbytes))
            self._cur = None
            return len(self._shards) - 1
        if cur is None or cur["size"] + nbytes > self.max_shard_size:
            self._shards.append(self._new_shard(0))
            self._cur = len(self._shards) - 1
            cur = self._shards[self._cur]
        cur["size"] += nbytes
        return self._cur

    def _new_shard(self, size: int) -> dict:
        return {"tmp": None, "names": [], "size": size, "writer": None, "spec": [], "done": False, "nwritten": 0}

    def _open(self, i: int) -> SafetensorsWriter:
        sh = self._shards[i]
        if sh["writer"] is None:
            sh["tmp"] = _temp_name(os.path.join(self.out_dir, f"shard-{i + 1:05d}.safetensors"), "partial")
            sh["writer"] = SafetensorsWriter(sh["tmp"], self.metadata, spec=sh["spec"] if self._planned else None)
        return sh["writer"]

    def _finish(self, i: int):
        sh = self._shards[i]
        if sh["writer"] is not None and not sh["done"]:
            sh["writer"].close()
            sh["writer"] = None
            sh["done"] = True

    def add(self, name: str, arr: np.ndarray):
        arr = _check_array(name, arr, self.out_dir)
        if name in self._written:
            raise CheckpointError(f"{self.out_dir}: tensor '{name}' written twice")
        if self._planned:
            if name not in self._assign:
                raise CheckpointError(f"{self.out_dir}: tensor '{name}' is not in the planned tensor list")
            i = self._assign[name]
        else:
            i = self._place(arr.nbytes)
            # Streaming: once a tensor goes to another shard, the earlier shards are complete.
            for j, sh in enumerate(self._shards):
                if j != i and not sh["done"] and sh["writer"] is not None:
                    self._finish(j)
            self._shards[i]["names"].append(name)
            self._assign[name] = i
        self._open(i).add(name, arr)
        self._written.add(name)
        self._shards[i]["nwritten"] += 1
        self.nbytes += arr.nbytes
        self.count += 1
        if self._planned and self._shards[i]["nwritten"] == len(self._shards[i]["names"]):
            self._finish(i)

    def close(self) -> dict:
        """Commit: rename shards, write the index; returns {"files": [...], "total_size", "weight_map"}."""
        try:
            for i, sh in enumerate(self._shards):
                if self._planned and sh["nwritten"] != len(sh["names"]):
                    missing = [n for n in sh["names"] if n not in self._written]
                    raise CheckpointError(f"{self.out_dir}: {len(missing)} planned tensor(s) never written, "
                                          f"e.g. '{missing[0]}'")
                self._finish(i)
            shards = [sh for sh in self._shards if sh["done"]]
            if not shards:   # an empty model still gets a (valid, empty) model.safetensors
                sh = self._new_shard(0)
                sh["tmp"] = _temp_name(os.path.join(self.out_dir, HF_WEIGHTS_NAME), "partial")
                SafetensorsWriter(sh["tmp"], self.metadata, spec=[]).close()
                sh["done"] = True
                shards = [sh]
            n = len(shards)
            names = [HF_WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                      for i in range(n)]
            for sh, final in zip(shards, names):
                os.replace(sh["tmp"], os.path.join(self.out_dir, final))
                sh["tmp"] = None
            weight_map = {}
            for sh, final in zip(shards, names):
                for k in sh["names"]:
                    weight_map[k] = final
            index_path = os.path.join(self.out_dir, HF_INDEX_NAME)
            if n > 1:
                atomic_write_json(index_path, {"metadata": {"total_size": self.nbytes},
                                               "weight_map": dict(sorted(weight_map.items()))})
            keep = set(names) | ({HF_INDEX_NAME} if n > 1 else set())
            for old in os.listdir(self.out_dir):
                if old not in keep and (_SHARD_RE.match(old) or old in (HF_WEIGHTS_NAME, HF_INDEX_NAME)):
                    os.unlink(os.path.join(self.out_dir, old))
            _fsync_dir(self.out_dir)
        except BaseException:
            self.abort()
            raise
        return {"files": [os.path.join(self.out_dir, x) for x in names], "total_size": self.nbytes,
                "weight_map": weight_map}

    def abort(self):
        for sh in self._shards:
            if sh["writer"] is not None:
                sh["writer"].abort()
                sh["writer"] = None
            if sh["tmp"] and os.path.exists(sh["tmp"]):
                os.unlink(sh["tmp"])



def save_safetensors_sharded(tensors: TensorsLike, out_dir: str, max_shard_size: Union[int, str] = "5GB",
                             metadata: Optional[Dict[str, str]] = None) -> dict:
    """Write `tensors` as an HF weights directory (see :class:`ShardedSafetensorsWriter`); returns
    {"files", "total_size", "weight_map"}."""
    spec = _spec_of_dict(tensors, out_dir) if isinstance(tensors, dict) else None
    w = ShardedSafetensorsWriter(out_dir, max_shard_size, metadata, spec=spec)
    try:
        for k, v in _iter_pairs(tensors):
            w.add(k, v)
    except BaseException:
        w.abort()
        raise
    return w.close()


# ---------------------------------------------------------------------------------------- MindSpore CKPT
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


# ------------------------------------------------------------------------------------- generic dispatch
def file_format(path: str) -> str:
    """'safetensors' or 'ckpt', by extension, else by the first bytes."""
    low = path.lower()
    if low.endswith(".safetensors"):
        return "safetensors"
    if low.endswith(".ckpt"):
        return "ckpt"
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x0a":
        return "ckpt"
    raise CheckpointError(f"{path}: neither a safetensors nor a MindSpore CKPT file")


def checkpoint_files(path: str) -> List[str]:
    """The weight files of `path`: itself if a file; for a directory, the files its
    ``*.safetensors.index.json`` lists, else every ``*.safetensors`` (sorted), else its single ``*.ckpt``."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if path.endswith(".index.json"):
            return _index_files(path)
        return [path]
    idx = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
    if len(idx) == 1:
        return _index_files(idx[0])
    st = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if st:
        return st
    ck = sorted(glob.glob(os.path.join(path, "*.ckpt")))
    if len(ck) == 1:
        return ck
    if len(ck) > 1:
        raise CheckpointError(f"{path}: {len(ck)} .ckpt files ({', '.join(os.path.basename(c) for c in ck[:4])}"
                              f"{', ...' if len(ck) > 4 else ''}); name the one to use")
    bins = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pth"))
    hint = (f" (found {os.path.basename(bins[0])}: PyTorch pickles are not read; re-save the model with "
            "safe_serialization=True)") if bins else ""
    raise CheckpointError(f"{path}: no *.safetensors or *.ckpt weight files in this directory{hint}")


def read_index(index_path: str) -> Dict[str, str]:
    """weight_map of an HF ``*.safetensors.index.json`` (tensor name -> absolute file path)."""
    try:
        with open(index_path, encoding="utf-8") as f:
            idx = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    wm = idx.get("weight_map") if isinstance(idx, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index_path}: no 'weight_map' in this index")
    d = os.path.dirname(os.path.abspath(index_path))
    return {k: os.path.join(d, v) for k, v in wm.items()}


def _index_files(index_path: str) -> List[str]:
    wm = read_index(index_path)
    files = list(OrderedDict.fromkeys(sorted(wm.values())))
    for p in files:
        if not os.path.isfile(p):
            k = next(k for k, v in wm.items() if v == p)
            raise CheckpointError(f"{p}: shard listed in {index_path} (e.g. for tensor '{k}') does not exist")
    return files


def file_infos(path: str) -> "OrderedDict[str, TensorInfo]":
    """Tensor infos of one weight file (safetensors or CKPT)."""
    return safetensors_infos(path) if file_format(path) == "safetensors" else ckpt_infos(path)


def iter_file(path: str, names: Optional[Iterable[str]] = None) -> Iterator[Tuple[str, np.ndarray]]:
    if file_format(path) == "safetensors":
        return iter_safetensors(path, names)
    return iter_ckpt(path, names)


def tensor_infos(path: str) -> "OrderedDict[str, TensorInfo]":
    """name -> TensorInfo over every weight file of `path` (file or directory); duplicates are errors."""
    out = OrderedDict()
    for p in checkpoint_files(path):
        for k, info in file_infos(p).items():
            if k in out:
                raise CheckpointError(f"{p}: tensor '{k}' is also in {out[k].file}")
            out[k] = info
    return out


def iter_tensors(path: str, names: Optional[Iterable[str]] = None) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield (name, array) of every tensor of `path` (file or directory), one at a time, file by file."""
    wanted = set(names) if names is not None else None
    for p in checkpoint_files(path):
        sel = None
        if wanted is not None:
            sel = [k for k in file_infos(p) if k in wanted]
            if not sel:
                continue
        yield from iter_file(p, sel)


def load_tensors(path: str, names: Optional[Iterable[str]] = None) -> Dict[str, np.ndarray]:
    """All (or the named) tensors of `path` in a dict (the whole model in memory: prefer iter_tensors)."""
    return dict(iter_tensors(path, names))


# ---------------------------------------------------------------------------------------------- verify
def _verify_manifest(path: str, n_tensors: int, deep: bool):
    man = path + MANIFEST_SUFFIX
    if not os.path.isfile(man):
        return
    try:
        with open(man, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{man}: unreadable manifest ({e})") from None
    size = os.path.getsize(path)
    if m.get("bytes") != size:
        raise CheckpointError(f"{path}: {size} bytes but its manifest says {m.get('bytes')}; "
                              "the file is truncated or was replaced")
    if m.get("tensors") != n_tensors:
        raise CheckpointError(f"{path}: {n_tensors} tensors but its manifest says {m.get('tensors')}; "
                              "the file is truncated or was replaced")
    if deep and m.get("sha256"):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_COPY_CHUNK), b""):
                h.update(block)
        if h.hexdigest() != m["sha256"]:
            raise CheckpointError(f"{path}: sha256 differs from its manifest; the file is corrupt")


def _verify_ckpt_crc(path: str):
    import binascii
    size = os.path.getsize(path)
    if size < 17:
        return
    with open(path, "rb") as f:
        f.seek(size - 17)
        tail = f.read(17)
        if tail[:7] != b"crc_num":
            return
        crc = 0
        f.seek(0)
        left = size - 17
        while left:
            b = f.read(min(left, _COPY_CHUNK))
            crc = binascii.crc32(b, crc)
            left -= len(b)
    if crc != int.from_bytes(tail[7:], "big"):
        raise CheckpointError(f"{path}: CRC check failed; the file is corrupt")


def verify(path: str, deep: bool = False) -> "OrderedDict[str, TensorInfo]":
    """Check that a checkpoint file or directory is complete; return its tensor infos.

    Raises CheckpointError naming the file on: a missing file or shard, a truncated/corrupt safetensors
    header or data length, a CKPT record that overruns the file or whose data does not fit its shape, a
    CKPT whose size/tensor count differs from its ``.manifest.json``, an index naming tensors its shards do
    not hold. `deep=True` also reads every tensor and checks CKPT checksums (manifest sha256, crc trailer).
    """
    files = checkpoint_files(path)
    out = OrderedDict()
    for p in files:
        fmt = file_format(p)
        if fmt == "safetensors":
            infos = safetensors_infos(p)
        else:
            infos = ckpt_infos(p)
            _verify_manifest(p, len(infos), deep)
            if deep:
                _verify_ckpt_crc(p)
        if deep:
            for _ in iter_file(p):
                pass
        for k, v in infos.items():
            if k in out:
                raise CheckpointError(f"{p}: tensor '{k}' is also in {out[k].file}")
            out[k] = v
    idx = None
    if os.path.isdir(path):
        cands = glob.glob(os.path.join(path, "*.safetensors.index.json"))
        idx = cands[0] if len(cands) == 1 else None
    elif path.endswith(".index.json"):
        idx = path
    if idx:
        wm = read_index(idx)
        for k, f in wm.items():
            if k not in out or os.path.abspath(out[k].file) != os.path.abspath(f):
                raise CheckpointError(f"{f}: tensor '{k}' listed in {idx} is not in that file")
    return out
