"""A weight file or directory as a stream of tensors, whatever its format.

:func:`checkpoint_files` finds a directory's weight files (an HF index, ``*.safetensors``, or a single
``*.ckpt``); :func:`iter_tensors` / :func:`tensor_infos` / :func:`load_tensors` read them through the
format's reader (:mod:`.safetensors_io`, :mod:`.ckpt_io`), one tensor at a time. Writing is the format
modules' job; integrity checks are :mod:`.verify`'s.
"""
from __future__ import annotations

import glob
import json
import os
from collections import OrderedDict
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CheckpointError
from .ckpt_io import ckpt_infos, iter_ckpt
from .safetensors_io import iter_safetensors, safetensors_infos
from .tensors import TensorInfo


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
    return infos_of_files(checkpoint_files(path))


def infos_of_files(files: Sequence[str]) -> "OrderedDict[str, TensorInfo]":
    """name -> TensorInfo over the weight files `files`; a tensor in two of them is an error."""
    out = OrderedDict()
    for p in files:
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
