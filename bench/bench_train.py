"""Training throughput against transformers + peft on this CPU, side by side in one script.

Same model and init (one Hugging Face directory both sides load), same batches (Alpaca demo, tokenized once),
same LoRA or full fine-tuning, same AdamW (weight decay 0.01, grad clipping 1.0), same thread count. Prints
steps/s of each and the ratio (ours / reference).

    .venv/bin/python bench/bench_train.py [--model 19m|135m|stories] [--mode lora|full] [--steps N] [--batch B]
                                          [--seq S]

Models (--model; batch, seq, steps and the LoRA targets default per model):
  19m      Llama, hidden 256, 4 layers, 8 heads / 4 kv, intermediate 688, vocab 32000, untied (19.3M parameters),
           random init; batch 4 x seq 512; LoRA r16 on q/k/v/o.
  135m     shaped like SmolLM2-135M: hidden 576, 30 layers, 9 heads / 3 kv, intermediate 1536, vocab 49152, tied
           embeddings (134.5M parameters), random init; batch 2 x seq 512, 4 timed steps; LoRA r16 on q/k/v/o.
  stories  the bundled stories260K; batch 8 x seq 512; LoRA r8 on every projection.
MFSFT_CPU_KERNELS=0 measures ours without the fused CPU kernels of models/kernels.py (basic MindSpore ops only).
Both sides get the same padded batches; ours skips the positions after each row's last supervised target
(trainer/unpad.py; MFSFT_UNPAD=0 computes them as the reference does). The line before the ratio says how much
of the positions that is.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
STORIES = os.path.join(ROOT, "assets", "models", "stories260K")
ALPACA = os.path.join(ROOT, "assets", "data", "alpaca_en_demo.json")
ATTN_MF, ATTN_HF = ".*wq|.*wk|.*wv|.*wo", ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_MF = ATTN_MF + "|.*w1|.*w2|.*w3"
ALL_HF = ATTN_HF + ["gate_proj", "up_proj", "down_proj"]

# name -> (HF config overrides or None for the bundled model, batch, seq, timed steps, warm-up, LoRA rank, targets)
MODELS = {
    "19m": (dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=688, vocab_size=32000, tie_word_embeddings=False), 4, 512, 20, 3, 16, "attn"),
    "135m": (dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                  intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
             2, 512, 4, 2, 16, "attn"),
    "stories": (None, 8, 512, 20, 3, 8, "all"),
}


def model_dir(name: str) -> str:
    """A Hugging Face directory of the model: the bundled one, or a random init (seed 0) saved once per name."""
    cfg = MODELS[name][0]
    if cfg is None:
        return STORIES
    path = os.path.join(tempfile.gettempdir(), f"mfsft-bench-{name}-{os.getuid()}")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    conf = LlamaConfig(max_position_embeddings=2048, rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=1,
                       eos_token_id=2, torch_dtype="float32", **cfg)
    tmp = path + f".tmp{os.getpid()}"
    LlamaForCausalLM(conf).save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, path)
    return path


def lora_targets(name: str):
    return (ATTN_MF, ATTN_HF) if MODELS[name][6] == "attn" else (ALL_MF, ALL_HF)


def batches(batch, seq, n):
    from mindformers_sft.data.dataset import OnlineSFTDataset
    ds = OnlineSFTDataset(ALPACA, os.path.join(STORIES, "tokenizer.json"), template="alpaca", seq_length=seq,
                          data_format="alpaca", alpaca_prompt="plain")
    out = []
    for s in range(n):
        idx = [(s * batch + i) % len(ds) for i in range(batch)]
        out.append({k: np.stack([ds[i][k] for i in idx]) for k in ("input_ids", "labels")})
    return out


def warmup_first(data, warmup):
    """(batches reordered, warm-up count): the warm-up batches come first and include one batch of every graph shape
    ours will run in `data`: ours compiles one graph per (unpadded length, supervised-row list length) (at most 32,
    trainer/step.py graph_shape, unpad.py), a one-time cost like the first compile, not a step's."""
    from mindformers_sft.trainer.step import graph_shape

    def k(b):
        return graph_shape(b, -100)
    head, rest = list(data[:warmup]), []
    seen = {k(b) for b in head}
    for b in data[warmup:]:
        if k(b) not in seen:
            seen.add(k(b))
            head.append(b)
        else:
            rest.append(b)
    return head + rest, len(head)


def _from_hf_dir(path):
    try:
        from mindformers_sft.models import from_hf_dir
    except ImportError:      # moved out of models/__init__.py
        from mindformers_sft.pretrained import from_hf_dir
    return from_hf_dir(path)


def setup_ours(mode, name="stories", probe=None):
    """-> (step(batch) -> loss, fused CPU kernels on); probe(label) is called at the stages (bench_memory)."""
    probe = probe or (lambda label: None)
    import mindspore as ms
    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.runtime.launch_blocking()
    ms.set_seed(0)
    from mindformers_sft.pet.lora import apply_lora
    from mindformers_sft.trainer.optimizer import AdamW
    from mindformers_sft.trainer.step import TrainStep
    model = _from_hf_dir(model_dir(name))
    probe("model built and loaded")
    if mode == "lora":
        apply_lora(model, {"lora_rank": MODELS[name][5], "lora_alpha": 2 * MODELS[name][5],
                           "target_modules": lora_targets(name)[0]})
    train_step = TrainStep(model, AdamW(model.trainable_params(), weight_decay=0.01), 1.0, None, jit=True)
    probe("optimizer state")
    return (lambda b, lr: train_step([b], lr).loss), model.cpu_kernel


def setup_reference(mode, name="stories", probe=None):
    """-> step(batch) -> loss, transformers (+ peft) with torch AdamW and grad clipping."""
    probe = probe or (lambda label: None)
    import torch
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(model_dir(name), dtype=torch.float32)
    probe("model built and loaded")
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        r = MODELS[name][5]
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                 target_modules=lora_targets(name)[1]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = None
    probe("optimizer state")

    def step(b, lr):
        nonlocal opt
        opt = opt or torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        opt.zero_grad()
        loss = model(input_ids=torch.from_numpy(b["input_ids"]).long(), labels=torch.from_numpy(b["labels"]).long()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()
    return step


def _run(step, data, lr, warmup, probe):
    for i, b in enumerate(data[:warmup]):
        step(b, lr)
        probe("first step (compile)" if i == 0 else "warm-up steps")
    t = time.perf_counter()
    losses = [step(b, lr) for b in data[warmup:]]
    sps = (len(data) - warmup) / (time.perf_counter() - t)
    probe("timed steps")
    return sps, losses


def ours(data, mode, lr, warmup, name="stories", probe=None):
    """One side alone: (steps/s, losses, fused CPU kernels on)."""
    step, kernels_on = setup_ours(mode, name, probe)
    return _run(step, data, lr, warmup, probe or (lambda label: None)) + (kernels_on,)


def reference(data, mode, lr, warmup, name="stories", probe=None):
    """One side alone: (steps/s, losses)."""
    return _run(setup_reference(mode, name, probe), data, lr, warmup, probe or (lambda label: None))


def side_by_side(data, mode, lr, warmup, name, rounds):
    """Both sides in this process, timed in alternating rounds (on a shared machine the load drifts within seconds;
    each round's ratio compares the two under about the same load; the side that goes first alternates too).
    Returns per side (steps/s of each round, losses)."""
    sides = {"reference": setup_reference(mode, name)}
    sides["ours"], kernels_on = setup_ours(mode, name)
    res = {k: ([], []) for k in sides}
    timed = data[warmup:]
    rounds = min(rounds, len(timed))           # no empty round
    per = max(1, len(timed) // rounds)
    for k, step in sides.items():
        res[k][1].extend(step(b, lr) for b in data[:warmup])
    for r in range(rounds):
        chunk = timed[r * per:(r + 1) * per]
        for k, step in (sides.items() if r % 2 == 0 else reversed(sides.items())):
            t = time.perf_counter()
            res[k][1].extend(step(b, lr) for b in chunk)
            res[k][0].append(len(chunk) / (time.perf_counter() - t))
    return res, kernels_on


def args_with_defaults(ap):
    ap.add_argument("--model", choices=sorted(MODELS), default="19m")
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    a = ap.parse_args()
    _, batch, seq, steps, warmup, _, _ = MODELS[a.model]
    a.batch, a.seq = a.batch or batch, a.seq or seq
    a.steps = steps if a.steps is None else a.steps
    a.warmup = warmup if a.warmup is None else a.warmup
    return a


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=["ours", "reference"], help="run one side only (profiling)")
    ap.add_argument("--rounds", type=int, help="alternating timing rounds (default: one per timed step)")
    a = args_with_defaults(ap)
    import torch
    threads = torch.get_num_threads()
    model_dir(a.model)
    # spare batches: the warm-up takes one batch of each graph shape, the timed steps must still be a.steps
    data, a.warmup = warmup_first(batches(a.batch, a.seq, a.steps + a.warmup + 32), a.warmup)
    data = data[:a.warmup + a.steps]
    lr = 1e-3
    r = MODELS[a.model][5]
    what = f"LoRA r{r} on {MODELS[a.model][6]}" if a.mode == "lora" else "full fine-tuning"
    head = (f"{a.model} {what}: batch {a.batch} x seq {a.seq}, {a.steps} timed steps after {a.warmup} warm-up, "
            f"torch threads {threads}")
    ref_name = f"transformers+{'peft' if a.mode == 'lora' else 'torch'}"
    if a.side:
        out = (ours if a.side == "ours" else reference)(data, a.mode, lr, a.warmup, a.model)
        print(head)
        print(f"  {ref_name if a.side == 'reference' else 'mindformers_sft'}: {out[0]:.3f} steps/s "
              f"(first loss {out[1][0]:.4f})")
        return
    rounds = a.rounds or a.steps
    res, kernels_on = side_by_side(data, a.mode, lr, a.warmup, a.model, rounds)
    ratios = [o / f for o, f in zip(res["ours"][0], res["reference"][0])]
    print(head + f", {rounds} alternating rounds")
    from mindformers_sft.trainer import unpad
    from mindformers_sft.trainer.step import graph_shape
    share = unpad.padding_share(data[a.warmup:], -100)
    shapes = len({graph_shape(b, -100) for b in data})
    if unpad.enabled() and kernels_on:
        print(f"  ours skips padding (unpadding, MFSFT_UNPAD=0 turns it off): {share:.1%} of the timed batches' "
              f"positions come after their row's last supervised target; the reference computes them; "
              f"ours compiled {shapes} graph shape(s)")
    else:
        print(f"  ours computes the padding too (MFSFT_UNPAD=0 or no CPU kernels): {share:.1%} of the positions")
    for k, name in (("reference", ref_name), ("ours", "mindformers_sft")):
        sps, losses = res[k]
        print(f"  {name:22s} {float(np.median(sps)):.3f} steps/s median of rounds (best {max(sps):.3f}); "
              f"loss first {losses[0]:.4f}, last {losses[-1]:.4f}")
    print(f"  fused CPU kernels {'on' if kernels_on else 'off'}")
    q = np.percentile(ratios, [25, 75])
    print(f"  speed ratio (ours / reference), median of rounds: {float(np.median(ratios)):.2f}x "
          f"(quartiles {q[0]:.2f}-{q[1]:.2f}; ratio of best rounds {max(res['ours'][0]) / max(res['reference'][0]):.2f}x)")
    print(json.dumps({"model": a.model, "mode": a.mode, "unpad": unpad.enabled(),
                      "ratio": round(float(np.median(ratios)), 3)}))


if __name__ == "__main__":
    main()
