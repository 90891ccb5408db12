"""A small real training job run in a subprocess by the resume tests:
python -m tests.trainer.train_job OUT_DIR [--resume] [--lora] [--steps N] [--slow S]."""
import argparse
import time

import numpy as np


class TokenDataset:
    """Fixed pseudo-random samples over the stories260K vocabulary (labels mask a prompt part)."""

    def __init__(self, n=48, seq=32, seed=0):
        rng = np.random.default_rng(seed)
        self.ids = rng.integers(3, 512, (n, seq + 1)).astype(np.int32)
        self.labels = self.ids.copy()
        cut = rng.integers(1, seq // 2, n)
        for i, c in enumerate(cut):
            self.labels[i, :c] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Slow(TokenDataset):
    def __init__(self, delay, **kw):
        super().__init__(**kw)
        self.delay = delay

    def __getitem__(self, i):
        time.sleep(self.delay)
        return super().__getitem__(i)


def config(out, resume=False, lora=False, steps=12, fmt="ckpt"):
    from mindformers_sft.config import load_config
    from tests.paths import STORIES
    opts = [f"output_dir={out}", f"load_checkpoint={STORIES}", f"resume_training={resume}",
            "runner_config.batch_size=2", "runner_config.gradient_accumulation_steps=2", "runner_config.epochs=3",
            f"runner_config.max_steps={steps}", "context.mode=1", "optimizer.learning_rate=1e-3",
            "optimizer.weight_decay=0.01", "lr_schedule.warmup_steps=2", "seed=7",
            "callbacks=[{type: MFLossMonitor}, {type: CheckpointMonitor, prefix: job, save_checkpoint_steps: 1, "
            f"keep_checkpoint_max: 3, checkpoint_format: {fmt}}}]"]
    if lora:
        opts.append("model.model_config={pet_config: {pet_type: lora, lora_rank: 4, lora_alpha: 8, "
                    "target_modules: '.*wq|.*wv'}}")
    return load_config(None, opts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--slow", type=float, default=0.0)
    ap.add_argument("--fmt", default="ckpt")
    a = ap.parse_args()
    import mindspore as ms
    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.runtime.launch_blocking()
    from mindformers_sft.run import build_model
    cfg = config(a.out, a.resume, a.lora, a.steps, a.fmt)
    cfg.context.device_target = "CPU"
    ms.set_seed(cfg.seed)     # as run.setup_context: the LoRA initialisation is seeded
    model = build_model(cfg, log=lambda *x: None)
    ds = Slow(a.slow) if a.slow else TokenDataset()
    from mindformers_sft.trainer.loop import train
    train(cfg, model, ds)


if __name__ == "__main__":
    main()
