"""No space, no permission, truncated and bit-flipped files at checkpoint time: a clear CheckpointError naming the
file, and the previous checkpoint stays the latest and loads.

No space is real: a 320 KiB tmpfs mounted in a private mount namespace (`unshare --user --map-root-user --mount`,
which needs no privilege where user namespaces are enabled). No permission is real too: the rank directory is made
read-only, and the save runs in a forked child that drops root (root bypasses file permissions)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

from mindformers_sft.checkpoint.loading import read_weights, resolve
from mindformers_sft.checkpoint.training_state import CheckpointManager
from mindformers_sft.errors import CheckpointError
from tests.paths import ROOT

NOBODY = 65534


def _arrays(seed, n=50_000):
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(n).astype(np.float32), "adam_m.w": rng.standard_normal(n).astype(np.float32)}


_NO_SPACE_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from tests.reliability.test_storage_faults import _arrays
    from mindformers_sft.checkpoint.training_state import CheckpointManager
    from mindformers_sft.errors import CheckpointError
    out = sys.argv[1]
    m = CheckpointManager(out, prefix="job", keep_max=3)
    m.save(_arrays(1), 1, 0, 4)                      # 400 KB of tensors: fits
    try:
        m.save(_arrays(2), 2, 0, 8)                  # a second one does not
        print("SAVED")
    except CheckpointError as e:
        print("ERROR", e)
    entry, arrays = CheckpointManager(out, prefix="job").latest()
    same = all(np.array_equal(arrays[k], v) for k, v in _arrays(1).items())
    import os
    print("RESULT", json.dumps({"step": entry["step"], "same": same, "files": sorted(os.listdir(m.dir))}))
""")


def test_no_space_left_keeps_the_previous_checkpoint(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=520k tmpfs {mnt} && "
              f"exec {sys.executable} -c '{_NO_SPACE_CHILD}' {mnt}/out")
    p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:]
    err = next(l for l in p.stdout.splitlines() if l.startswith(("ERROR", "SAVED")))
    assert err.startswith("ERROR"), p.stdout[-2000:]
    assert "job_rank_0-0_2.ckpt: cannot write the checkpoint of step 2" in err
    assert "No space left on device" in err and "job_rank_0-0_1.ckpt stays the latest" in err
    res = json.loads(next(l for l in p.stdout.splitlines() if l.startswith("RESULT"))[7:])
    assert res == {"step": 1, "same": True, "files": ["job_rank_0-0_1.ckpt", "meta.json"]}   # no temp left


def _save_in_child(out, step, drop_root):
    """Save checkpoint `step` in a forked child (dropping root first); the child reports the error text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        msg = "SAVED"
        try:
            if drop_root and os.geteuid() == 0:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            CheckpointManager(out, prefix="job", keep_max=3).save(_arrays(step), step, 0, 4 * step)
        except CheckpointError as e:
            msg = f"ERROR {e}"
        except BaseException as e:       # noqa: BLE001 - anything else is reported as a crash
            msg = f"CRASH {type(e).__name__}: {e}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        msg = f.read()
    os.waitpid(pid, 0)
    return msg


def test_no_permission_keeps_the_previous_checkpoint():
    top = tempfile.mkdtemp(prefix="reliability_perm_")     # under /tmp: traversable by the unprivileged child
    os.chmod(top, 0o755)
    out = os.path.join(top, "out")
    CheckpointManager(out, prefix="job").save(_arrays(1), 1, 0, 4)
    rank = os.path.join(out, "checkpoint", "rank_0")
    os.chmod(rank, 0o555)
    try:
        msg = _save_in_child(out, 2, drop_root=True)
    finally:
        os.chmod(rank, 0o755)
    try:
        _check_permission_result(msg, out, rank)
    finally:
        shutil.rmtree(top)


def _check_permission_result(msg, out, rank):
    assert msg.startswith("ERROR"), msg
    assert "job_rank_0-0_2.ckpt: cannot write the checkpoint of step 2 (Permission denied" in msg
    assert "job_rank_0-0_1.ckpt stays the latest" in msg
    entry, arrays = CheckpointManager(out, prefix="job").latest()
    assert entry["step"] == 1 and np.array_equal(arrays["w"], _arrays(1)["w"])
    assert sorted(os.listdir(rank)) == ["job_rank_0-0_1.ckpt", "meta.json"]


def _damage(path, how):
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) * 2 // 3)
    else:                                   # one bit flipped in the tensor data, same size
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("how", ["truncated", "bitflip"])
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_damaged_checkpoint_is_detected_and_named(tmp_path, how, fmt):
    out = str(tmp_path / "out")
    m = CheckpointManager(out, prefix="job", fmt=fmt)
    m.save(_arrays(1), 1, 0, 4)
    newest = m.save(_arrays(2), 2, 0, 8)
    _damage(newest, how)
    warnings = []
    entry, arrays = CheckpointManager(out, prefix="job").latest(warn=warnings.append)   # the resume path
    assert entry["step"] == 1 and np.array_equal(arrays["w"], _arrays(1)["w"])
    assert len(warnings) == 1 and newest in warnings[0], warnings
    assert ("bytes on disk" if how == "truncated" else "sha256 differs") in warnings[0]
    with pytest.raises(CheckpointError) as e:                  # naming the damaged file explicitly
        CheckpointManager(out, prefix="job").latest(os.path.basename(newest))
    assert newest in str(e.value)


@pytest.mark.parametrize("how", ["truncated", "bitflip"])
def test_damaged_checkpoint_named_by_load_checkpoint_is_detected(tmp_path, how):
    """load_checkpoint= a training directory falls back to the previous checkpoint; = the damaged file fails."""
    out = str(tmp_path / "out")
    m = CheckpointManager(out, prefix="job")
    m.save(_arrays(1), 1, 0, 4)
    newest = m.save(_arrays(2), 2, 0, 8)
    _damage(newest, how)
    warnings = []
    kind, src, entry = resolve(out, warn=warnings.append)
    assert entry["step"] == 1 and src.endswith("job_rank_0-0_1.ckpt") and newest in warnings[0]
    with pytest.raises(CheckpointError) as e:
        read_weights(newest)
    assert newest in str(e.value)
