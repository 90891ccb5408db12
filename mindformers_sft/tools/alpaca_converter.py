"""Stanford Alpaca JSON -> FastChat/ShareGPT conversations, as MindFormers' alpaca_converter.py.

    python -m mindformers_sft.tools.alpaca_converter --data_path alpaca_data.json --output_path out.json

Output (same layout, prompts and ids as MindFormers' tool: a JSON array written with indent=2 and
ensure_ascii=False): ``[{"id": "1", "conversations": [{"from": "human", "value": PROMPT},
{"from": "gpt", "value": output}]}, ...]`` where PROMPT is the Stanford Alpaca prompt with or without the
input. Records with a ``history`` ([[q, a], ...]) get those turns first (MindFormers' tool ignores history).
The input is streamed (any size, .json array or .jsonl); records that cannot be converted are reported with
their file and line and skipped (ids stay consecutive over the converted records, as in MindFormers' tool).
An existing output file is never overwritten.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..data.formats import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, RecordError
from ..data.readers import read_files
from ..errors import DataError, SFTError


def convert_record(rec: dict, map_keys: dict = None) -> list:
    """The conversations list of one Alpaca record (RecordError when a field is missing or not text)."""
    mk = map_keys or {}
    ki, kq, kr, kh = (mk.get("prompt", "instruction"), mk.get("query", "input"), mk.get("response", "output"),
                      mk.get("history", "history"))
    for k in (ki, kr):
        if k not in rec:
            raise RecordError(f"missing field {k!r}")
    instruction, query, output = rec[ki], rec.get(kq, ""), rec[kr]
    for k, v in ((ki, instruction), (kq, query), (kr, output)):
        if v is not None and not isinstance(v, str):
            raise RecordError(f"field {k!r} must be a string, found {type(v).__name__}")
    query = query or ""
    prompt = (ALPACA_PROMPT_INPUT.format(instruction=instruction, input=query) if query != ""
              else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction))
    conv = []
    for j, pair in enumerate(rec.get(kh) or []):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise RecordError(f"field {kh!r}[{j}] must be a [query, response] pair of strings")
        conv += [{"from": "human", "value": pair[0]}, {"from": "gpt", "value": pair[1]}]
    conv += [{"from": "human", "value": prompt}, {"from": "gpt", "value": output}]
    return conv


def convert(data_path, output_path: str, map_keys: dict = None, log=sys.stderr) -> dict:
    """Convert; returns {"converted": n, "rejected": m}. Raises DataError if output_path exists."""
    if os.path.exists(output_path):
        raise DataError(f"{output_path}: output file already exists; remove it or choose another --output_path")
    tmp = output_path + ".partial"
    n = bad = 0
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[")
        for loc, rec in read_files(data_path):
            try:
                if isinstance(rec, RecordError):
                    raise rec
                conv = convert_record(rec, map_keys)
            except RecordError as e:
                if not getattr(e, "warning", False):
                    bad += 1
                print(f"{loc}: {'warning' if getattr(e, 'warning', False) else 'skipped'}: {e}", file=log)
                continue
            n += 1
            text = json.dumps({"id": str(n), "conversations": conv}, ensure_ascii=False, indent=2)
            f.write(("\n  " if n == 1 else ",\n  ") + text.replace("\n", "\n  "))
        f.write("\n]" if n else "]")
    os.replace(tmp, output_path)
    return {"converted": n, "rejected": bad}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mindformers_sft.tools.alpaca_converter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", type=str, default="alpaca-data.json", help="Alpaca .json/.jsonl (file, glob, dir)")
    p.add_argument("--output_path", type=str, default="alpaca-data-conversation.json")
    p.add_argument("--map_keys", type=str, default=None,
                   help='column names, e.g. \'{"prompt":"instruction","query":"input","response":"output"}\'')
    args = p.parse_args(argv)
    try:
        from ..data.formats import parse_map_keys
        res = convert(args.data_path, args.output_path, parse_map_keys(args.map_keys))
    except SFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {res['converted']} records, skipped {res['rejected']} -> {args.output_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
