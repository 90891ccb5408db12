"""Generation throughput against transformers' generate on this CPU, side by side in one script.

Same model (bundled stories260K, fp32), same prompts (held-out Alpaca instructions in the alpaca template, of
different lengths), greedy, the same number of new tokens for every row (eos ignored on both sides: transformers
with min_new_tokens = max_new_tokens, ours with no stop ids), same thread count. Ours: the batched KV-cache
engine (generation/engine.py: left-padded rows of different lengths in one batch) that evaluation uses;
reference: transformers LlamaForCausalLM.generate with left padding and an attention mask (use_cache=True).
Prints new tokens/s of each at batch 1 and 8 and the ratio (ours / reference).

    .venv/bin/python bench/bench_generate.py [--new_tokens 64] [--prompts 8] [--repeats 2]
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
STORIES = os.path.join(ROOT, "assets", "models", "stories260K")
ALPACA = os.path.join(ROOT, "assets", "data", "alpaca_en_demo.json")


def prompts(n):
    from mindformers_sft.data.formats import Conversation
    from mindformers_sft.data.templates import get_template
    from mindformers_sft.tokenizer import load_tokenizer
    tok = load_tokenizer(STORIES)
    template = get_template("alpaca", tok)
    records = json.load(open(ALPACA, encoding="utf-8"))[-n:]
    out = []
    for r in records:
        text = template.render(Conversation(turns=[("user", r["instruction"])]), add_generation_prompt=True)
        out.append([tok.bos_token_id] + tok.encode(text))
    return out


def timed(fn, repeats):
    fn()                                   # warm-up: first-call compilation / allocation
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def ours(batches, new_tokens, repeats):
    import mindspore as ms
    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.runtime.launch_blocking()
    from mindformers_sft.evaluation.generation import GenerationSettings, generate_ids
    from mindformers_sft.pretrained import from_hf_dir
    model = from_hf_dir(STORIES)
    model.set_train(False)
    s = GenerationSettings(max_new_tokens=new_tokens)
    res = {}
    for bs, groups in batches.items():
        def run():
            for g in groups:
                outs = generate_ids(model, g, s, eos=[], max_batch=bs)
                assert all(len(o) == new_tokens for o in outs)
        res[bs] = sum(len(g) for g in groups) * new_tokens / timed(run, repeats)
    return res


def reference(batches, new_tokens, repeats, threads):
    import torch
    from transformers import LlamaForCausalLM
    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    res = {}
    for bs, groups in batches.items():
        tensors = []
        for g in groups:
            width = max(len(p) for p in g)
            ids = torch.zeros((len(g), width), dtype=torch.long)
            mask = torch.zeros((len(g), width), dtype=torch.long)
            for i, p in enumerate(g):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            tensors.append((ids, mask))

        def run():
            with torch.no_grad():
                for ids, mask in tensors:
                    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, use_cache=True,
                                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
                    assert out.shape[1] == ids.shape[1] + new_tokens
        res[bs] = sum(len(g) for g in groups) * new_tokens / timed(run, repeats)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    ps = prompts(args.prompts)
    batches = {1: [[p] for p in ps], 8: [ps[i:i + 8] for i in range(0, len(ps), 8)]}
    print(f"stories260K fp32, {len(ps)} prompts of {min(map(len, ps))}-{max(map(len, ps))} tokens, "
          f"{args.new_tokens} new tokens each, greedy, {args.threads} threads")
    a = ours(batches, args.new_tokens, args.repeats)
    b = reference(batches, args.new_tokens, args.repeats, args.threads)
    for bs in batches:
        print(f"batch {bs}: ours {a[bs]:.1f} tokens/s, transformers {b[bs]:.1f} tokens/s, ratio {a[bs] / b[bs]:.2f}x")


if __name__ == "__main__":
    main()
