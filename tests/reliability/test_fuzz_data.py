"""1000 seeded mutated records per input format through the online loader and `python -m
mindformers_sft.tools.preprocess`: no crash, and every record is kept or in the rejects file with its line."""
import json
import subprocess
import sys
from collections import Counter

import pytest

from mindformers_sft.data.dataset import OnlineSFTDataset
from tests.paths import LLAMA2_TOKENIZER, ROOT
from tests.reliability.fuzz_records import N, fuzz, fuzz_csv, write_csv, write_json_array, write_jsonl

SEQ = 64
# (format of the records, file writer, extension)
CASES = [("alpaca", write_json_array, "json"), ("alpaca", write_jsonl, "jsonl"),
         ("sharegpt", write_json_array, "json"), ("sharegpt", write_jsonl, "jsonl"),
         ("messages", write_jsonl, "jsonl"), ("alpaca", write_csv, "csv")]
FIGURES = {}


def _write(tmp_path, fmt, writer, ext):
    records = fuzz_csv() if ext == "csv" else fuzz(fmt)
    path = tmp_path / f"{fmt}_{ext}.{ext}"
    lines = writer(path, records)
    return str(path), records, lines


def _rejects(path):
    with open(path, encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if not r["warning"]]


def _check_accounting(records, lines, rejects, kept, read, file):
    """kept + rejected == records; one reject per record line; the records that must fail are rejected and the
    unmutated ones are not."""
    assert read == len(records) == N, (read, len(records))
    assert kept + len(rejects) == N, (kept, len(rejects))
    assert all(r["file"] == file and r["reason"] for r in rejects)
    by_line = Counter(r["line"] for r in rejects)
    assert set(by_line) <= set(lines) and max(by_line.values()) == 1, by_line.most_common(3)
    rejected = set(by_line)
    for (line_bytes, kind, must), line in zip(records, lines):
        if must is True:
            assert line in rejected, (line, kind, line_bytes[:200])
        elif must is False:
            assert line not in rejected, (line, kind, [r for r in rejects if r["line"] == line])


@pytest.mark.parametrize("fmt,writer,ext", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_online_loader_accounts_for_every_record(tmp_path, fmt, writer, ext):
    path, records, lines = _write(tmp_path, fmt, writer, ext)
    rej = tmp_path / "rejects.jsonl"
    ds = OnlineSFTDataset(path, LLAMA2_TOKENIZER, template="vicuna_v1.1", seq_length=SEQ, rejects_file=str(rej),
                          verbose=False)
    rejects = _rejects(rej)
    _check_accounting(records, lines, rejects, ds.stats.kept, ds.stats.read, path)
    assert len(ds) == ds.stats.kept
    mutated = sum(k is not None for _, k, _ in records)
    FIGURES[f"{fmt}-{ext}"] = (mutated, ds.stats.kept, len(rejects))
    print(f"\n[fuzz] {fmt}-{ext}: {N} records ({mutated} mutated) -> kept {ds.stats.kept}, rejected {len(rejects)}")


def test_preprocess_accounts_for_every_record(tmp_path):
    files = [_write(tmp_path, *c) for c in CASES]
    out = tmp_path / "fuzz.mindrecord"
    rej = tmp_path / "fuzz.rejects.jsonl"
    stats_file = tmp_path / "stats.json"
    p = subprocess.run([sys.executable, "-m", "mindformers_sft.tools.preprocess",
                        "--input_glob", ",".join(f[0] for f in files), "--tokenizer", LLAMA2_TOKENIZER,
                        "--template", "vicuna_v1.1", "--seq_length", str(SEQ), "--output_file", str(out),
                        "--rejects_file", str(rej), "--stats_file", str(stats_file)],
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:]
    assert "Traceback" not in p.stdout
    stats = json.loads(stats_file.read_text())
    rejects = _rejects(rej)
    assert stats["read"] == N * len(files) and stats["kept"] + stats["rejected"] == stats["read"]
    assert stats["rejected"] == len(rejects)
    for path, records, lines in files:
        mine = [r for r in rejects if r["file"] == path]
        per_file_kept = N - len(mine)
        _check_accounting(records, lines, mine, per_file_kept, N, path)
    from mindformers_sft.data.dataset import MindRecordDataset
    assert len(MindRecordDataset(str(out))) == stats["kept"] == stats["rows"]
