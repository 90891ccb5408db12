"""Host memory of training against transformers + peft on this CPU, side by side in one script.

Each side trains in its own fresh process on the same batches (tokenized once here and handed over as .npz, so
the reference process never imports MindSpore): same model and init, same LoRA or full fine-tuning, same AdamW, as
bench_train.py (`--model 19m|135m|stories`). Reported per side: resident memory once the framework is imported
(its baseline), the peak during the steps (ru_maxrss), the peak above that baseline (the training's own memory),
the ratios ours / reference, and where the memory goes: resident memory (now / peak) after each stage of the run
(model loaded, LoRA + optimizer state, first step with its graph compile, the other steps) next to what the
tensors of that stage take by their sizes (weights, trainable parameters' gradients and Adam moments, logits).

    .venv/bin/python bench/bench_memory.py [--model 19m|135m|stories] [--mode lora|full] [--steps 10]
                                           [--batch B] [--seq S]
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
MIB = 2 ** 20


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def _peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(side, mode, name, npz, warmup):
    data = np.load(npz)
    batches = [{"input_ids": data["input_ids"][i], "labels": data["labels"][i]} for i in range(len(data["labels"]))]
    if side == "ours":
        import mindspore  # noqa: F401  (the framework's own baseline)
    else:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    base = _rss_mib()
    stages = [("framework imported", base, _peak_mib())]

    def probe(label):
        if stages[-1][0] == label:       # repeated stage (warm-up steps): keep the last
            stages.pop()
        stages.append((label, _rss_mib(), _peak_mib()))
    import bench_train
    run = bench_train.ours if side == "ours" else bench_train.reference
    run(batches, mode, 1e-3, warmup, name, probe=probe)
    print(json.dumps({"baseline_mib": base, "peak_mib": _peak_mib(), "stages": stages}))


def tensor_sizes(name, mode, batches):
    """What the tensors take by their sizes (MiB): weights, trainable, gradients + Adam moments, logits of one step
    (all positions: the reference; supervised rows: ours)."""
    import json as _json
    from safetensors import safe_open
    import bench_train
    from mindformers_sft.trainer.step import supervised_rows
    path = bench_train.model_dir(name)
    with open(os.path.join(path, "config.json")) as f:
        cfg = _json.load(f)
    n = 0
    with safe_open(os.path.join(path, "model.safetensors"), "np") as f:
        for k in f.keys():
            n += int(np.prod(f.get_slice(k).get_shape()))
    h, layers, r = cfg["hidden_size"], cfg["num_hidden_layers"], bench_train.MODELS[name][5]
    kvh = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    if mode == "lora":
        per = [(h, h), (h, kvh), (h, kvh), (h, h)] if bench_train.MODELS[name][6] == "attn" else \
            [(h, h), (h, kvh), (h, kvh), (h, h), (h, cfg["intermediate_size"]), (h, cfg["intermediate_size"]),
             (cfg["intermediate_size"], h)]
        trainable = layers * sum(r * (i + o) for i, o in per)
    else:
        trainable = n
    b = batches[0]
    positions = b["input_ids"].shape[0] * (b["input_ids"].shape[1] - 1)
    rows = max(len(supervised_rows(x["input_ids"], x["labels"], -100)[0]) for x in batches)
    v = cfg["vocab_size"]
    return {"weights": n * 4 / MIB, "trainable": trainable * 4 / MIB, "grads+adam": 3 * trainable * 4 / MIB,
            "logits_ref": positions * v * 4 / MIB, "logits_ours": rows * v * 4 / MIB, "n_params": n,
            "n_trainable": trainable}


def main():
    import bench_train
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(bench_train.MODELS), default="19m")
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--side", choices=["ours", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--npz", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        return child(a.side, a.mode, a.model, a.npz, a.warmup)
    _, batch, seq, *_ = bench_train.MODELS[a.model]
    a.batch, a.seq = a.batch or batch, a.seq or seq
    bench_train.model_dir(a.model)
    data = bench_train.batches(a.batch, a.seq, a.steps + a.warmup)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "batches.npz")
        np.savez(npz, input_ids=np.stack([b["input_ids"] for b in data]),
                 labels=np.stack([b["labels"] for b in data]))
        for side in ("reference", "ours"):
            r = subprocess.run([sys.executable, __file__, "--side", side, "--mode", a.mode, "--model", a.model,
                                "--npz", npz, "--warmup", str(a.warmup)], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{side} failed:\n{r.stderr[-3000:]}")
            res[side] = json.loads(r.stdout.strip().splitlines()[-1])
    sizes = tensor_sizes(a.model, a.mode, data)
    print(f"{a.model} {a.mode}: batch {a.batch} x seq {a.seq}, {a.steps + a.warmup} steps, each side in a fresh "
          f"process; {sizes['n_params'] / 1e6:.1f}M parameters, {sizes['n_trainable'] / 1e6:.2f}M trainable")
    names = {"reference": f"transformers+{'peft' if a.mode == 'lora' else 'torch'}", "ours": "mindformers_sft"}
    for side in ("reference", "ours"):
        r = res[side]
        print(f"  {names[side]:22s} baseline {r['baseline_mib']:7.0f} MiB  peak {r['peak_mib']:7.0f} MiB  "
              f"training (peak - baseline) {r['peak_mib'] - r['baseline_mib']:7.0f} MiB")
    o, f = res["ours"], res["reference"]
    print(f"  memory ratio (ours / reference): peak {o['peak_mib'] / f['peak_mib']:.2f}x, training "
          f"{(o['peak_mib'] - o['baseline_mib']) / (f['peak_mib'] - f['baseline_mib']):.2f}x")
    print("  where it goes: resident MiB after each stage, now / peak so far (delta of now from the stage before)")
    for side in ("reference", "ours"):
        print(f"    {names[side]}")
        prev = None
        for label, now, peak in res[side]["stages"]:
            d = f"  ({now - prev:+7.0f})" if prev is not None else ""
            print(f"      {label:24s} {now:7.0f} / {peak:7.0f}{d}")
            prev = now
    print(f"  by tensor sizes: weights {sizes['weights']:.0f} MiB; trainable {sizes['trainable']:.1f} MiB, their "
          f"gradients + Adam moments {sizes['grads+adam']:.1f} MiB; fp32 logits of a step: reference (all positions) "
          f"{sizes['logits_ref']:.0f} MiB, ours (supervised rows, largest bucket here) {sizes['logits_ours']:.0f} MiB "
          f"(each also has a gradient of that size)")


if __name__ == "__main__":
    main()
