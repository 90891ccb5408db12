"""Preprocessing throughput: mindformers_sft vs FastChat's train.preprocess, same data and tokenizer.

Data: assets/data/alpaca_en_demo.json (999 Alpaca records) replicated to --records records (default 100k).
  ours:     raw Alpaca JSON -> Stanford Alpaca prompt (alpaca_converter's) -> vicuna_v1.1 -> Llama-2
            tokenizer.model -> masked rows of seq_length + 1 (mindformers_sft.data.pipeline.iter_rows: streaming
            JSON reader, batched SentencePiece word by word with a word cache (tokenizer/sp_segments.py), numpy
            rows), in this process (and with --num_workers K). The records repeat every 999, so the word cache
            hits more often than on a corpus of distinct records; --records 999 times distinct records only.
  FastChat: the same records converted to conversations by mindformers_sft.tools.alpaca_converter (not timed),
            then json.load + fastchat.train.train.preprocess with transformers' LlamaTokenizer(legacy=True),
            model_max_length = seq_length + 1, pad = unk (as FastChat's train.py sets up).
Prints samples/s of both and the ratio (the median over --rounds alternating rounds), then checks (untimed) that
every row of ours equals FastChat's token for token, input_ids and labels (the loss mask) both, and that the worker
run gave the same rows. Not a test.

    .venv/bin/python bench/bench_preprocess.py --records 20000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ALPACA = os.path.join(ROOT, "assets", "data", "alpaca_en_demo.json")
LLAMA2 = os.path.join(ROOT, "assets", "tokenizers", "llama2", "tokenizer.model")


def make_data(n: int, directory: str) -> str:
    with open(ALPACA, encoding="utf-8") as f:
        base = json.load(f)
    path = os.path.join(directory, f"alpaca_{n}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump([base[i % len(base)] for i in range(n)], f, ensure_ascii=False, indent=2)
    return path


def run_ours(path: str, seq_length: int, num_workers: int):
    from mindformers_sft.data.pipeline import SFTOptions, iter_rows
    from mindformers_sft.data.stats import RejectLog, Stats
    from mindformers_sft.tokenizer import load_tokenizer
    t0 = time.perf_counter()
    tok = load_tokenizer(LLAMA2)
    # truncation "cut": what FastChat does with an over-long sample (keep its first seq_length + 1 tokens)
    opts = SFTOptions(seq_length=seq_length, template="vicuna_v1.1", data_format="alpaca", num_workers=num_workers,
                      truncation="cut")
    stats = Stats()
    chunks = []
    with RejectLog(None, stats) as log:
        for chunk in iter_rows(path, tok, opts, stats, log):
            chunks.append(chunk)
    elapsed = time.perf_counter() - t0
    rows = [r for c in chunks for r in c]
    return elapsed, stats, {k: np.stack([r[k] for r in rows]) for k in ("input_ids", "labels")}


def run_fastchat(conv_path: str, seq_length: int):
    import transformers
    from fastchat.train import train as fct
    transformers.logging.set_verbosity_error()
    fct.local_rank = -1                          # rank0_print stays quiet (mismatch warnings)
    t0 = time.perf_counter()
    tok = transformers.LlamaTokenizer(vocab_file=LLAMA2, legacy=True, model_max_length=seq_length + 1,
                                      padding_side="right")
    tok.pad_token = tok.unk_token
    with open(conv_path, encoding="utf-8") as f:
        data = json.load(f)
    out = fct.preprocess([d["conversations"] for d in data], tok)
    return time.perf_counter() - t0, {k: out[k].numpy() for k in ("input_ids", "labels")}


def compare(ours: dict, theirs: dict) -> str:
    """Rows of ours equal to FastChat's in both input_ids and labels, e.g. '20000/20000'; SystemExit if not all."""
    if ours["input_ids"].shape != theirs["input_ids"].shape:
        raise SystemExit(f"row shapes differ: ours {ours['input_ids'].shape}, FastChat {theirs['input_ids'].shape}")
    same = np.ones(len(ours["input_ids"]), dtype=bool)
    for k in ("input_ids", "labels"):
        same &= (ours[k] == theirs[k]).all(axis=1)
    if not same.all():
        bad = np.flatnonzero(~same)
        raise SystemExit(f"{len(bad)} rows differ from FastChat's (first: row {bad[0]})")
    return f"{int(same.sum())}/{len(same)}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--seq_length", type=int, default=512)
    p.add_argument("--num_workers", type=int, default=2, help="also time ours with this many worker processes "
                   "(<= 1: skip)")
    p.add_argument("--skip_fastchat", action="store_true")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds of ours and FastChat, the ratio "
                   "their median (default 5 up to 5000 records, else 1)")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 5 if args.records <= 5000 else 1

    with tempfile.TemporaryDirectory() as d:
        path = make_data(args.records, d)
        print(f"data: {args.records} Alpaca records ({os.path.getsize(path) / 1e6:.1f} MB), seq_length "
              f"{args.seq_length}, Llama-2 tokenizer, vicuna_v1.1", flush=True)
        from mindformers_sft.tools.alpaca_converter import convert
        conv = os.path.join(d, "conversations.json")
        with open(os.devnull, "w") as null:
            convert(path, conv, log=null)
        # alternating rounds (ours, then FastChat), each from a fresh tokenizer load: a busy machine slows one
        # single-shot timing of ~0.3 s by 20-50%, so the ratio is the median of the rounds' ratios
        ours_t, theirs_t, ratios = [], [], []
        for r in range(args.rounds):
            t1, stats, rows = run_ours(path, args.seq_length, 1)
            ours_t.append(t1)
            if not args.skip_fastchat:
                tf, theirs = run_fastchat(conv, args.seq_length)
                theirs_t.append(tf)
                ratios.append(tf / t1)
        t1 = float(np.median(ours_t))
        ours = args.records / t1
        print(f"ours (1 process):   {t1:7.2f} s  {ours:9.0f} samples/s   median of {args.rounds} rounds "
              f"[{stats.line()}]", flush=True)
        if args.num_workers > 1:
            tk, _, rows_k = run_ours(path, args.seq_length, args.num_workers)
            print(f"ours ({args.num_workers} workers):  {tk:7.2f} s  {args.records / tk:9.0f} samples/s", flush=True)
            if not all(np.array_equal(rows[k], rows_k[k]) for k in rows):
                raise SystemExit(f"the {args.num_workers}-worker run gave other rows than the 1-process run")
        if args.skip_fastchat:
            return 0
        tf = float(np.median(theirs_t))
        fc = len(theirs["input_ids"]) / tf
        q1, med, q3 = np.percentile(ratios, [25, 50, 75])
        print(f"FastChat preprocess: {tf:7.2f} s  {fc:9.0f} samples/s   median of {args.rounds} rounds", flush=True)
        print(f"ratio ours/FastChat: {med:.1f}x (1 process; median of the rounds' ratios, quartiles "
              f"{q1:.1f}-{q3:.1f})" + (f"; {args.records / tk / fc:.1f}x with {args.num_workers} workers"
                                       if args.num_workers > 1 else ""), flush=True)
        print(f"rows equal to FastChat's (input_ids and labels): {compare(rows, theirs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
