"""Host memory of training against transformers + peft on this CPU, side by side in one script.

Each side trains in its own fresh process on the same batches (tokenized once here and handed over as .npz, so
the reference process never imports MindSpore): same model (bundled stories260K), same LoRA or full fine-tuning,
same AdamW, as bench_train.py. Reported per side: resident memory once the framework is imported (its baseline),
the peak during the steps (ru_maxrss), and the peak above that baseline (the training's own memory); then the
ratios ours / reference.

    .venv/bin/python bench/bench_memory.py [--mode lora|full] [--steps 10] [--batch 8] [--seq 512]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def child(side, mode, npz, warmup):
    data = np.load(npz)
    batches = [{"input_ids": data["input_ids"][i], "labels": data["labels"][i]} for i in range(len(data["labels"]))]
    if side == "ours":
        import mindspore  # noqa: F401  (the framework's own baseline)
    else:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    base = _rss_mib()
    import bench_train
    run = bench_train.ours if side == "ours" else bench_train.reference
    run(batches, mode, 1e-3, warmup)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"baseline_mib": base, "peak_mib": peak}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--side", choices=["ours", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--npz", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        return child(a.side, a.mode, a.npz, a.warmup)
    import bench_train
    data = bench_train.batches(a.batch, a.seq, a.steps + a.warmup)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "batches.npz")
        np.savez(npz, input_ids=np.stack([b["input_ids"] for b in data]),
                 labels=np.stack([b["labels"] for b in data]))
        for side in ("reference", "ours"):
            r = subprocess.run([sys.executable, __file__, "--side", side, "--mode", a.mode, "--npz", npz,
                                "--warmup", str(a.warmup)], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{side} failed:\n{r.stderr[-3000:]}")
            res[side] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{a.mode}: batch {a.batch} x seq {a.seq}, {a.steps + a.warmup} steps, each side in a fresh process")
    for side, name in (("reference", f"transformers+{'peft' if a.mode == 'lora' else 'torch'}"),
                       ("ours", "mindformers_sft")):
        r = res[side]
        print(f"  {name:22s} baseline {r['baseline_mib']:7.0f} MiB  peak {r['peak_mib']:7.0f} MiB  "
              f"training (peak - baseline) {r['peak_mib'] - r['baseline_mib']:7.0f} MiB")
    o, f = res["ours"], res["reference"]
    print(f"  memory ratio (ours / reference): peak {o['peak_mib'] / f['peak_mib']:.2f}x, training "
          f"{(o['peak_mib'] - o['baseline_mib']) / (f['peak_mib'] - f['baseline_mib']):.2f}x")


if __name__ == "__main__":
    main()
