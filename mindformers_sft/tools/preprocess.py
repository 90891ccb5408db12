"""Raw SFT data -> masked (and optionally packed) MindRecord in MindFormers' schema.

    python -m mindformers_sft.tools.preprocess --input_glob data.json --tokenizer tokenizer.model \\
        --template vicuna_v1.1 --seq_length 2048 --output_file out.mindrecord [--pack] [--num_workers K]

MindFormers' llama_preprocess.py flags are accepted: ``--dataset_type qa`` (the only type: conversations),
``--model_file PATH`` (= ``--tokenizer PATH``), ``--tokenizer llama`` (a name: then ``--model_file`` is the path;
the template defaults to vicuna_v1.1 as in MindFormers), ``--file_partition P``.

Rows are ``input_ids``/``labels`` int32 of seq_length + 1, padded with the pad id / -100; ``--pack`` rows also
carry ``actual_seq_len`` (see mindformers_sft/data/packing.py). At the end a stats line is printed, and every
record not kept is listed in the rejects file (JSON Lines: file, line, index, reason; default
``<output_file>.rejects.jsonl``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..data.packing import PACK_STRATEGIES
from ..data.pipeline import SFTOptions, iter_rows
from ..data.stats import RejectLog, Stats
from ..data.truncation import DEFAULT_TRUNCATION, TRUNCATIONS
from ..errors import ConfigError, SFTError

TOKENIZER_NAMES = ("llama",)


def _bool(v: str) -> bool:
    low = str(v).strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mindformers_sft.tools.preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_glob", required=True, help="data file, glob, directory or comma-separated list "
                   "(.json array, .jsonl, .parquet, .csv)")
    p.add_argument("--output_file", required=True, help="MindRecord file to write (refuses to overwrite)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (tokenizer.model / tokenizer.json / directory), "
                   "or the name 'llama' with --model_file")
    p.add_argument("--model_file", default=None, help="tokenizer model file (MindFormers' flag)")
    p.add_argument("--template", default=None, help="FastChat template name (vicuna_v1.1, llama-2, qwen-7b-chat, ...),"
                   " chatml, llama-3, a .jinja file, or 'auto' (the tokenizer's chat_template); default: auto, or "
                   "vicuna_v1.1 for a tokenizer without chat_template")
    p.add_argument("--seq_length", type=int, default=2048, help="model sequence length S; rows are S + 1 long")
    p.add_argument("--dataset_type", default="qa", help="MindFormers' flag; only 'qa' (conversations)")
    p.add_argument("--data_format", default="auto", choices=["auto", "alpaca", "sharegpt", "messages"])
    p.add_argument("--map_keys", default=None, help='JSON column mapping, e.g. \'{"prompt":"instruction",'
                   '"query":"input","response":"output","system":"system","history":"history"}\'')
    p.add_argument("--alpaca_prompt", default="stanford", choices=["stanford", "plain"],
                   help="Alpaca user turn: Stanford prompt (MindFormers) or instruction\\ninput")
    p.add_argument("--pack", nargs="?", const="greedy", default=None, choices=list(PACK_STRATEGIES),
                   help="pack several samples per row (greedy: best-fit decreasing; sequential)")
    p.add_argument("--pack_max_samples", type=int, default=None, help="most samples in a packed row = length of "
                   "actual_seq_len (default min(seq_length, 512))")
    p.add_argument("--train_on_prompt", action="store_true", help="supervise every token except padding")
    p.add_argument("--mask_history", action="store_true", help="supervise only the last assistant turn")
    p.add_argument("--truncation", default=DEFAULT_TRUNCATION, choices=list(TRUNCATIONS),
                   help="over-long samples: proportional (LLaMA-Factory's cutoff_len rule, the default: keeps every "
                   "sample), cut (the first seq_length + 1 tokens, as FastChat and MindFormers), turn (whole leading "
                   "turns that fit), drop; truncated samples are counted")
    p.add_argument("--enable_thinking", default=None, type=_bool, metavar="{true,false}",
                   help="Qwen3's chat template switch (false: an empty <think> block ends each generation prompt); "
                   "default: unset, as the template does")
    p.add_argument("--num_workers", type=int, default=1, help="tokenizing processes (1: in this process)")
    p.add_argument("--file_partition", type=int, default=1, help="MindRecord shards")
    p.add_argument("--rejects_file", default=None, help="default: <output_file>.rejects.jsonl")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--stats_file", default=None, help="also write the counts as JSON here")
    return p


def resolve_tokenizer_path(args) -> str:
    tok, model_file = args.tokenizer, args.model_file
    if tok in TOKENIZER_NAMES or tok is None:
        if not model_file:
            raise ConfigError("no tokenizer: give --tokenizer PATH, or --tokenizer llama --model_file PATH")
        return model_file
    if model_file and os.path.abspath(model_file) != os.path.abspath(tok):
        raise ConfigError(f"--tokenizer {tok} and --model_file {model_file} name different tokenizers; give one")
    return tok


def run(args) -> Stats:
    from ..data.mindrecord import MindRecordWriter
    from ..tokenizer import load_tokenizer
    if args.dataset_type != "qa":
        raise ConfigError(f"--dataset_type {args.dataset_type!r} is not supported; this tool makes SFT data "
                          "('qa': conversations with masked labels)")
    tokenizer = load_tokenizer(resolve_tokenizer_path(args))
    template = args.template or ("auto" if getattr(tokenizer, "chat_template", None) else "vicuna_v1.1")
    opts = SFTOptions(seq_length=args.seq_length, template=template, data_format=args.data_format,
                      map_keys=args.map_keys, alpaca_prompt=args.alpaca_prompt, train_on_prompt=args.train_on_prompt,
                      mask_history=args.mask_history, truncation=args.truncation, pack=args.pack or False,
                      pack_max_samples=args.pack_max_samples, num_workers=args.num_workers,
                      enable_thinking=args.enable_thinking)
    stats = Stats()
    rejects_file = args.rejects_file or args.output_file + ".rejects.jsonl"
    writer = MindRecordWriter(args.output_file, packed=opts.pack is not None, file_partition=args.file_partition,
                              overwrite=args.overwrite)
    t0 = time.time()
    try:
        with RejectLog(rejects_file, stats) as log:
            for rows in iter_rows(args.input_glob, tokenizer, opts, stats, log):
                writer.write(rows)
    except BaseException:
        writer.abort()
        raise
    files = writer.close()
    dt = time.time() - t0
    print(f"{stats.line()}; {stats.read / max(dt, 1e-9):.0f} records/s")
    print(f"wrote {writer.rows} rows to {', '.join(files)}; rejects: {rejects_file}")
    if args.stats_file:
        with open(args.stats_file, "w", encoding="utf-8") as f:
            json.dump(stats.as_dict(), f, indent=2)
    return stats


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except SFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
