"""safetensors files, single and Hugging Face-sharded, read and written one tensor at a time.

Read with ``safetensors.safe_open(path, framework="np")`` (memory-mapped; a handle is reopened every
``REOPEN_BYTES`` so the mapped pages a long file leaves behind do not pile up in RSS). Written by
:class:`SafetensorsWriter`: when the tensor list (name, dtype, shape) is known up front (a dict, or a
``spec``), the header is written first and every tensor goes straight to its offset; otherwise the data
is spooled to a temp file and copied behind the header at the end. Files are standard safetensors
(header padded to 8 bytes, offsets contiguous in header order) readable by ``safetensors``,
``mindspore.load_checkpoint(format="safetensors")`` and transformers. Writers commit atomically
(:mod:`.atomic`); bf16 tensors are numpy arrays of dtype :data:`~mindformers_sft.checkpoint.dtypes.BF16`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections import OrderedDict
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
from safetensors import safe_open

from ..errors import CheckpointError
from .atomic import _COPY_CHUNK, _AtomicFile, _Committing, _fsync_dir, _temp_name, atomic_write_json
from .dtypes import from_st_code, st_code  # importing .dtypes registers numpy bfloat16
from .tensors import (SpecLike, TensorInfo, TensorsLike, _as_bytes_view, _check_array, _iter_pairs,
                      _spec_of_dict, parse_size)

REOPEN_BYTES = 512 * 1024 * 1024          # re-open a safetensors handle after this many bytes read
HF_WEIGHTS_NAME = "model.safetensors"
HF_INDEX_NAME = "model.safetensors.index.json"


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
