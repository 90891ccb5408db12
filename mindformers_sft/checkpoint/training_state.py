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

import glob
import hashlib
import json
import os

from ..errors import CheckpointError
from .atomic import atomic_write_json
from .ckpt_io import save_ckpt
from .io import load_tensors
from .safetensors_io import save_safetensors

META = "meta.json"


_DIGESTS = {}   # (path, size, mtime_ns) -> sha256: a run resolves the same checkpoint several times at start


def _sha256(path, chunk=1 << 22):
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _hash_file(path, chunk)
    return _DIGESTS[key]


def _hash_file(path, chunk):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def save_tensors_atomic(arrays: dict, path: str, fmt: str = "ckpt"):
    """Write name -> numpy as a MindSpore CKPT or safetensors file, atomically (temp file, fsync, rename)."""
    if fmt not in ("ckpt", "safetensors"):
        raise CheckpointError(f"checkpoint_format '{fmt}': expected 'ckpt' or 'safetensors'")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if fmt == "ckpt":
        save_ckpt(arrays, path, manifest=False)   # meta.json carries size and sha256
    else:
        save_safetensors(arrays, path)


def meta_entry(path: str) -> dict:
    """The meta.json entry of checkpoint file `path` ({} when it has none)."""
    meta = os.path.join(os.path.dirname(os.path.abspath(path)), META)
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            for c in json.load(f).get("checkpoints", []):
                if c.get("file") == os.path.basename(path):
                    return c
    return {}


def rank_dir(output_dir, rank):
    return os.path.join(output_dir, "checkpoint", f"rank_{rank}")


class CheckpointManager:
    def __init__(self, output_dir, rank=0, prefix="llama", keep_max=5, fmt="ckpt"):
        self.dir = rank_dir(output_dir, rank)
        self.rank, self.prefix, self.keep_max, self.fmt = rank, prefix, max(1, int(keep_max)), fmt

    @classmethod
    def for_dir(cls, directory):
        """A manager reading an existing rank directory (any layout), e.g. OUTPUT/checkpoint/rank_3."""
        m = cls.__new__(cls)
        m.dir = directory
        return m

    def _meta(self):
        p = os.path.join(self.dir, META)
        if not os.path.exists(p):
            return {"checkpoints": []}
        try:
            with open(p, encoding="utf-8") as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{p}:{e.lineno}: meta.json is not valid JSON ({e.msg})") from None

    def remove_stale_temps(self):
        """Delete the temporary files a save killed before its rename left in this rank's directory."""
        for pat in (f".{self.prefix}_rank_{self.rank}-*.tmp", f".{self.prefix}_rank_{self.rank}-*.spool",
                    f".{META}.*.tmp"):
            for p in glob.glob(os.path.join(glob.escape(self.dir), pat)):
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass

    def save(self, arrays: dict, step: int, epoch: int, consumed_samples: int, extra: dict = None) -> str:
        """Write the checkpoint of `step`; a failed write (no space, no permission) is a CheckpointError naming
        the file, and the previous checkpoint stays the latest."""
        try:
            return self._save(arrays, step, epoch, consumed_samples, extra)
        except OSError as e:
            path = os.path.join(self.dir, f"{self.prefix}_rank_{self.rank}-{epoch}_{step}.{self.fmt}")
            try:
                last = self._meta().get("last_ckpt_file")
            except (OSError, CheckpointError):
                last = None
            keep = f"; {last} stays the latest checkpoint" if last else "; no checkpoint was saved before"
            raise CheckpointError(f"{path}: cannot write the checkpoint of step {step} "
                                  f"({e.strerror or e}{': ' + e.filename if e.filename else ''}){keep}") from e

    def _save(self, arrays: dict, step: int, epoch: int, consumed_samples: int, extra: dict = None) -> str:
        if not getattr(self, "_temps_removed", False):   # one writer per rank directory: leftovers are stale
            self.remove_stale_temps()
            self._temps_removed = True
        name = f"{self.prefix}_rank_{self.rank}-{epoch}_{step}.{self.fmt}"
        path = os.path.join(self.dir, name)
        save_tensors_atomic(arrays, path, self.fmt)
        entry = {"file": name, "step": int(step), "epoch": int(epoch), "consumed_samples": int(consumed_samples),
                 "size": os.path.getsize(path), "sha256": _sha256(path), **(extra or {})}
        meta = self._meta()
        kept = [c for c in meta["checkpoints"] if c["file"] != name] + [entry]
        drop, kept = kept[:-self.keep_max], kept[-self.keep_max:]
        meta.update(checkpoints=kept, last_step=entry["step"], last_epoch=entry["epoch"], last_ckpt_file=name)
        atomic_write_json(os.path.join(self.dir, META), meta)
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

    def latest_entry(self, warn=print):
        """meta.json entry of the newest checkpoint whose file verifies (size, sha256), or None."""
        for entry in sorted(self._meta()["checkpoints"], key=lambda c: c["step"], reverse=True):
            try:
                self.verify(entry)
                return entry
            except CheckpointError as e:
                warn(f"[checkpoint] skipping {entry['file']}: {e}; trying the previous one")
        return None

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
