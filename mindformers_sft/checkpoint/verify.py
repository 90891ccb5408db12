"""Integrity of a checkpoint file or directory, checked without loading it: safetensors header, length and
offsets, CKPT record structure and sizes, every shard of an HF index. A CKPT's ``.manifest.json`` sidecar
(size, tensor count, sha256) catches truncation exactly at a record boundary (which the structure alone
cannot); ``verify(deep=True)`` also checks the sha256 and the crc trailer and reads every tensor."""
from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import OrderedDict

from ..errors import CheckpointError
from .atomic import _COPY_CHUNK
from .ckpt_io import MANIFEST_SUFFIX, ckpt_infos
from .io import checkpoint_files, file_format, iter_file, read_index
from .safetensors_io import safetensors_infos
from .tensors import TensorInfo


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
