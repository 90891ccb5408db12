"""Training checkpoints: weights (or adapters) + optimizer state in one CKPT/safetensors file per rank,
and `meta.json` beside them with step, epoch, consumed samples and each file's size and sha256.

Layout (MindFormers'):  OUTPUT/checkpoint/rank_R/PREFIX_rank_R-EPOCH_STEP.{ckpt,safetensors}
                        OUTPUT/checkpoint/rank_R/meta.json

Writes are atomic: the tensor file goes to a temporary name, is fsynced and renamed; only then is
meta.json rewritten (also temp + rename). A crash at any point leaves the previous checkpoint as the
latest. On resume every candidate is verified (size, sha256, readable) newest first; a truncated or
corrupt file is reported and the previous one is used.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ..errors import CheckpointError

META = "meta.json"


def _sha256(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def _fsync_replace(tmp, final):
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dfd = os.open(os.path.dirname(final) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_json_atomic(obj, path):
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=d)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    _fsync_replace(tmp, path)


def save_tensors_atomic(arrays: dict, path: str, fmt: str = "ckpt"):
    """Write name -> numpy/Tensor as a MindSpore CKPT or safetensors file, atomically."""
    if fmt not in ("ckpt", "safetensors"):
        raise CheckpointError(f"checkpoint_format '{fmt}': expected 'ckpt' or 'safetensors'")
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="." + fmt, dir=d)
    os.close(fd)
    items = [{"name": k, "data": v if isinstance(v, Tensor) else Tensor(np.asarray(v))} for k, v in arrays.items()]
    ms.save_checkpoint(items, tmp, format=fmt, crc_check=(fmt == "ckpt"))
    _fsync_replace(tmp, path)


def load_tensors(path: str) -> dict:
    """name -> numpy from a CKPT or safetensors file; CheckpointError naming the file if unreadable."""
    fmt = "safetensors" if path.endswith(".safetensors") else "ckpt"
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        params = ms.load_checkpoint(path, format=fmt, crc_check=(fmt == "ckpt"))
    except Exception as e:  # MindSpore raises ValueError/RuntimeError for truncated or corrupt files
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    return {k: v.asnumpy() for k, v in params.items()}


def rank_dir(output_dir, rank):
    return os.path.join(output_dir, "checkpoint", f"rank_{rank}")


class CheckpointManager:
    def __init__(self, output_dir, rank=0, prefix="llama", keep_max=5, fmt="ckpt"):
        self.dir = rank_dir(output_dir, rank)
        self.rank, self.prefix, self.keep_max, self.fmt = rank, prefix, max(1, int(keep_max)), fmt

    def _meta(self):
        p = os.path.join(self.dir, META)
        if not os.path.exists(p):
            return {"checkpoints": []}
        try:
            with open(p, encoding="utf-8") as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{p}:{e.lineno}: meta.json is not valid JSON ({e.msg})") from None

    def save(self, arrays: dict, step: int, epoch: int, consumed_samples: int, extra: dict = None) -> str:
        name = f"{self.prefix}_rank_{self.rank}-{epoch}_{step}.{self.fmt}"
        path = os.path.join(self.dir, name)
        save_tensors_atomic(arrays, path, self.fmt)
        entry = {"file": name, "step": int(step), "epoch": int(epoch), "consumed_samples": int(consumed_samples),
                 "size": os.path.getsize(path), "sha256": _sha256(path), **(extra or {})}
        meta = self._meta()
        kept = [c for c in meta["checkpoints"] if c["file"] != name] + [entry]
        drop, kept = kept[:-self.keep_max], kept[-self.keep_max:]
        meta.update(checkpoints=kept, last_step=entry["step"], last_epoch=entry["epoch"], last_ckpt_file=name)
        write_json_atomic(meta, os.path.join(self.dir, META))
        for c in drop:
            try:
                os.remove(os.path.join(self.dir, c["file"]))
            except FileNotFoundError:
                pass
        return path

    def verify(self, entry) -> str:
        path = os.path.join(self.dir, entry["file"])
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: listed in meta.json but missing")
        size = os.path.getsize(path)
        if size != entry["size"]:
            raise CheckpointError(f"{path}: {size} bytes on disk, {entry['size']} written (truncated or altered)")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: sha256 differs from meta.json (corrupt)")
        return path

    def latest(self, name: str = None, warn=print):
        """(entry, arrays) of the newest verified checkpoint (or the one named), or (None, None) if none."""
        entries = self._meta()["checkpoints"]
        if name:
            entries = [c for c in entries if c["file"] == os.path.basename(name)]
            if not entries:
                raise CheckpointError(f"{self.dir}: resume_training names '{name}', which meta.json does not list")
        for entry in sorted(entries, key=lambda c: c["step"], reverse=True):
            try:
                path = self.verify(entry)
                return entry, load_tensors(path)
            except CheckpointError as e:
                if name:
                    raise
                warn(f"[checkpoint] skipping {entry['file']}: {e}; trying the previous one")
        return None, None
