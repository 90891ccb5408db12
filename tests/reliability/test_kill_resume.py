"""kill -9 at 5 seeded points of one training run (3 of them inside a checkpoint save), resumed after each:
the run ends bit-identical (weights and optimizer state, np.array_equal) to an uninterrupted run, full and LoRA."""
import glob
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.paths import ROOT
from tests.trainer.test_resume import STEPS as RESUME_STEPS, _final, _meta   # the same 14-step job
from tests.reliability.fault_job import KINDS, SAVE_EVERY, SAVE_KINDS, STEPS

SEED = 1234
SAVES = sorted(set(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)) | {STEPS})


def kill_plan(seed=SEED):
    """5 (kind, step) kill points, one of each kind, in step order (save kinds on save steps), drawn until the
    run makes progress between kills (at least 4 different resume points)."""
    rng = random.Random(seed)
    other = [s for s in range(1, STEPS) if s not in SAVES]
    kinds_other = [k for k in KINDS if k not in SAVE_KINDS]
    while True:
        save_steps = rng.sample(SAVES, len(SAVE_KINDS))
        other_steps = rng.sample(other, len(kinds_other))
        kinds = rng.sample(SAVE_KINDS, len(SAVE_KINDS)) + rng.sample(kinds_other, len(kinds_other))
        plan = sorted(zip(kinds, save_steps + other_steps), key=lambda p: p[1])
        if len({restored_step(*p) for p in plan}) >= 4:
            return plan


def restored_step(kind, step):
    """The step meta.json names after a kill at (kind, step): the last save committed before it."""
    done = [s for s in SAVES if s < step or (s == step and kind not in SAVE_KINDS)]
    return done[-1] if done else None


def _start(out, lora, resume=False, kill=None):
    env = dict(os.environ)
    env.pop("FAULT_KILL", None)
    if kill:
        env["FAULT_KILL"] = f"{kill[0]}:{kill[1]}"
    cmd = [sys.executable, "-m", "tests.reliability.fault_job", str(out)]
    cmd += ["--lora"] * lora + ["--resume"] * resume
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(out, lora, resume, kill=None):
    p = _start(out, lora, resume, kill)
    text = p.communicate(timeout=300)[0]
    return p.returncode, text


def test_kill_plan_is_seeded_and_covers_every_point():
    assert RESUME_STEPS == STEPS
    plan = kill_plan()
    assert plan == kill_plan() and len(plan) == 5
    assert sorted(k for k, _ in plan) == sorted(KINDS)
    assert [s for _, s in plan] == sorted({s for _, s in plan})
    assert all(s in SAVES for k, s in plan if k in SAVE_KINDS)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_five_kills_resume_bit_identical(tmp_path, lora):
    t0 = time.time()
    ref = tmp_path / "ref"
    reference = _start(ref, lora)        # the uninterrupted run, beside the killed chain
    out = tmp_path / "killed"
    for i, (kind, step) in enumerate(kill_plan()):
        rc, text = _run(out, lora, resume=i > 0, kill=(kind, step))
        assert rc == -signal.SIGKILL, f"{kind}:{step} was not reached (rc {rc})\n{text[-3000:]}"
        assert f"[fault] SIGKILL {kind} at step {step}" in text
        meta = _meta(out)
        got, want = meta and meta["last_step"], restored_step(kind, step)
        if kind == "batch":     # batches may be read ahead of training (a prefetch thread): an earlier save, or none
            assert got is None or got <= (want or 0), (kind, step, got)
        else:
            assert got == want, (kind, step, got)
    rc, text = _run(out, lora, resume=True)
    assert rc == 0, text[-3000:]
    text = reference.communicate(timeout=300)[0]
    assert reference.returncode == 0, text[-3000:]
    a, b = _final(ref), _final(out)
    assert sorted(a) == sorted(b)
    assert any(k.startswith("adam_m.") for k in a)             # optimizer state is compared too
    assert any(".lora_a" in k for k in a) == lora
    differ = [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
    assert not differ, differ[:5]
    # every file the meta.json lists verifies; no temporary file of an interrupted save is left behind
    rank = os.path.join(out, "checkpoint", "rank_0")
    assert not glob.glob(os.path.join(rank, ".*.tmp")), os.listdir(rank)
    print(f"\n[reliability] {'lora' if lora else 'full'}: 5 kills {kill_plan()} + resume, "
          f"{len(a)} tensors bit-identical, {time.time() - t0:.1f} s")
