"""A run killed with SIGKILL at an arbitrary step and resumed ends with the weights of an uninterrupted run;
a checkpoint truncated on disk is detected and the previous one is used."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from mindformers_sft.checkpoint import load_tensors
from tests.paths import ROOT

STEPS = 14   # 12 steps per epoch: the resumed part crosses an epoch boundary


def _run(out, *extra, wait=True):
    cmd = [sys.executable, "-m", "tests.trainer.train_job", str(out), "--steps", str(STEPS), *extra]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out_text, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out_text[-3000:]
        return out_text
    return p


def _meta(out):
    path = os.path.join(out, "checkpoint", "rank_0", "meta.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _final(out):
    meta = _meta(out)
    assert meta["last_step"] == STEPS
    return load_tensors(os.path.join(out, "checkpoint", "rank_0", meta["last_ckpt_file"]))


def _kill_at(out, at_step, extra=()):
    p = _run(out, "--slow", "0.02", *extra, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline:
        m = _meta(out)
        if m and m["last_step"] >= at_step:
            break
        if p.poll() is not None:
            raise AssertionError("the job ended before it could be killed: " + p.stdout.read()[-2000:])
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    return _meta(out)["last_step"]


def _assert_same(a, b, tol=1e-6):
    assert set(a) == set(b)
    worst = max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in a)
    assert worst <= tol, worst


def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    ref = tmp_path / "ref"
    _run(ref)
    killed = tmp_path / "killed"
    at = _kill_at(killed, at_step=int(np.random.default_rng().integers(3, 9)))
    assert at < STEPS
    text = _run(killed, "--resume")
    assert f"step {at}" in text or f"[resume]" in text
    _assert_same(_final(ref), _final(killed))


def test_truncated_checkpoint_falls_back_to_previous(tmp_path):
    ref = tmp_path / "ref"
    _run(ref, "--lora")
    out = tmp_path / "trunc"
    at = _kill_at(out, at_step=5, extra=("--lora",))
    meta = _meta(out)
    newest = os.path.join(out, "checkpoint", "rank_0", meta["last_ckpt_file"])
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    text = _run(out, "--resume", "--lora")
    assert "skipping " + meta["last_ckpt_file"] in text, text[-2000:]
    assert f"step {at - 1}," in text
    _assert_same(_final(ref), _final(out))
