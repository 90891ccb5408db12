"""Commit-or-abort file writing: a file is written under a temp name in its target's directory, fsynced and
renamed over the target (``os.replace``), so a reader sees the old file or the complete new one, never a
partial one. The tensor writers (:mod:`.safetensors_io`, :mod:`.ckpt_io`) build on :class:`_AtomicFile` and
:class:`_Committing`."""
from __future__ import annotations

import json
import os
import tempfile

from ..errors import CheckpointError

_COPY_CHUNK = 16 * 1024 * 1024


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
