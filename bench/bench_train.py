"""Training throughput against transformers + peft on this CPU, side by side in one script.

Same model (bundled stories260K), same batches (Alpaca demo, tokenized once), same LoRA (rank 8 on every
projection) or full fine-tuning, same AdamW. Prints steps/s of each and the ratio (ours / reference).

    .venv/bin/python bench/bench_train.py [--mode lora|full] [--steps 20] [--batch 8] [--seq 512]

MFSFT_CPU_KERNELS=0 measures ours without the fused CPU kernels of models/kernels.py (basic MindSpore ops only).
"""
import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
STORIES = os.path.join(ROOT, "assets", "models", "stories260K")
ALPACA = os.path.join(ROOT, "assets", "data", "alpaca_en_demo.json")
TARGETS_MF = ".*wq|.*wk|.*wv|.*wo|.*w1|.*w2|.*w3"
TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(batch, seq, n):
    from mindformers_sft.data.dataset import OnlineSFTDataset
    ds = OnlineSFTDataset(ALPACA, os.path.join(STORIES, "tokenizer.json"), template="alpaca", seq_length=seq,
                          data_format="alpaca", alpaca_prompt="plain")
    out = []
    for s in range(n):
        idx = [(s * batch + i) % len(ds) for i in range(batch)]
        out.append({k: np.stack([ds[i][k] for i in idx]) for k in ("input_ids", "labels")})
    return out


def ours(data, mode, lr, warmup):
    import mindspore as ms
    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.runtime.launch_blocking()
    ms.set_seed(0)
    from mindformers_sft.models import from_hf_dir
    from mindformers_sft.pet.lora import apply_lora
    from mindformers_sft.trainer.optimizer import AdamW
    from mindformers_sft.trainer.step import TrainStep
    model = from_hf_dir(STORIES)
    if mode == "lora":
        apply_lora(model, {"lora_rank": 8, "lora_alpha": 16, "target_modules": TARGETS_MF})
    step = TrainStep(model, AdamW(model.trainable_params(), weight_decay=0.01), 1.0, None, jit=True)
    for b in data[:warmup]:
        step([b], lr)
    t = time.perf_counter()
    losses = [step([b], lr).loss for b in data[warmup:]]
    return (len(data) - warmup) / (time.perf_counter() - t), losses, model.cpu_kernel


def reference(data, mode, lr, warmup):
    import torch
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS_HF))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)

    def step(b):
        opt.zero_grad()
        loss = model(input_ids=torch.from_numpy(b["input_ids"]).long(), labels=torch.from_numpy(b["labels"]).long()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        return loss.item()
    for b in data[:warmup]:
        step(b)
    t = time.perf_counter()
    losses = [step(b) for b in data[warmup:]]
    return (len(data) - warmup) / (time.perf_counter() - t), losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    a = ap.parse_args()
    data = batches(a.batch, a.seq, a.steps + a.warmup)
    lr = 1e-3
    ref_sps, ref_l = reference(data, a.mode, lr, a.warmup)
    our_sps, our_l, kernels_on = ours(data, a.mode, lr, a.warmup)
    print(f"{a.mode}: batch {a.batch} x seq {a.seq}, {a.steps} timed steps after {a.warmup} warm-up")
    print(f"  transformers+{'peft' if a.mode == 'lora' else 'torch'}: {ref_sps:.2f} steps/s  (first loss {ref_l[0]:.4f})")
    print(f"  mindformers_sft:   {our_sps:.2f} steps/s  (first loss {our_l[0]:.4f}; fused CPU kernels "
          f"{'on' if kernels_on else 'off'})")
    print(f"  speed ratio (ours / reference): {our_sps / ref_sps:.2f}x")


if __name__ == "__main__":
    main()
