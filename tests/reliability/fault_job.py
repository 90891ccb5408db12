"""The tiny training job of tests/trainer/train_job.py with fault hooks, run in a subprocess by the reliability tests:

    python -m tests.reliability.fault_job OUT_DIR [--resume] [--lora]

FAULT_KILL="KIND:STEP" makes the job SIGKILL itself (kill -9: no handler, no flush, no cleanup) at one point:
    batch         while loading the samples of step STEP (half of its batch read)
    step          after the optimizer update of step STEP, before anything is saved
    ckpt_tmp      in the save at STEP: the tensor file is written and fsynced under its temp name, not yet renamed
    ckpt_renamed  in the save at STEP: the tensor file is renamed into place, meta.json not yet rewritten
    meta_tmp      in the save at STEP: the new meta.json is written under its temp name, not yet renamed
The hooks patch os.replace, the batch plan, the dataset and the loss monitor inside this process only; the
product code runs unchanged. Checkpoints are saved every SAVE_EVERY steps.
"""
import argparse
import os
import re
import signal
import sys

from tests.trainer.train_job import TokenDataset, config

STEPS = 14          # 12 steps per epoch: the run crosses an epoch boundary
SAVE_EVERY = 3      # saves at 3, 6, 9, 12 and the final one at 14
KINDS = ("batch", "step", "ckpt_tmp", "ckpt_renamed", "meta_tmp")
SAVE_KINDS = ("ckpt_tmp", "ckpt_renamed", "meta_tmp")
_TENSOR_FILE = re.compile(r"_rank_\d+-\d+_(\d+)\.(ckpt|safetensors)$")


def _die(kind, step):
    print(f"[fault] SIGKILL {kind} at step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(kind, at):
    """Patch this process so that it SIGKILLs itself at (kind, step `at`)."""
    from mindformers_sft.data.sampler import BatchPlan
    from mindformers_sft.trainer.callbacks import LossMonitor
    state = {"step": None, "saving": None, "reads": 0}

    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        m = _TENSOR_FILE.search(str(dst))
        if m:
            state["saving"] = int(m.group(1))
            if kind == "ckpt_tmp" and state["saving"] == at:
                _die(kind, at)
        elif os.path.basename(str(dst)) == "meta.json" and kind == "meta_tmp" and state["saving"] == at:
            _die(kind, at)
        real_replace(src, dst, *a, **kw)
        if m and kind == "ckpt_renamed" and state["saving"] == at:
            _die(kind, at)
    os.replace = replace

    real_micro = BatchPlan.micro_batches

    def micro_batches(self, epoch, step, order=None):
        state["step"], state["reads"] = epoch * self.steps_per_epoch + step + 1, 0
        return real_micro(self, epoch, step, order)
    BatchPlan.micro_batches = micro_batches

    real_get = TokenDataset.__getitem__

    def getitem(self, i):
        state["reads"] += 1
        if kind == "batch" and state["step"] == at and state["reads"] == 3:
            _die(kind, at)
        return real_get(self, i)
    TokenDataset.__getitem__ = getitem

    real_on_step = LossMonitor.on_step

    def on_step(self, step, *a, **kw):
        real_on_step(self, step, *a, **kw)
        if kind == "step" and step == at:
            _die(kind, at)
    LossMonitor.on_step = on_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--lora", action="store_true")
    a = ap.parse_args()
    fault = os.environ.get("FAULT_KILL")
    if fault:
        kind, at = fault.split(":")
        assert kind in KINDS, kind
        install_kill(kind, int(at))
    import mindspore as ms
    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.runtime.launch_blocking()
    from mindformers_sft.run import build_model
    from mindformers_sft.trainer.loop import train
    cfg = config(a.out, a.resume, a.lora, STEPS)
    for cb in cfg.callbacks:
        if cb.get("type") == "CheckpointMonitor":
            cb["save_checkpoint_steps"] = SAVE_EVERY
    cfg.context.device_target = "CPU"
    ms.set_seed(cfg.seed)
    model = build_model(cfg, log=lambda *x: None)
    train(cfg, model, TokenDataset())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
