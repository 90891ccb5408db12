"""Readers and formats: streaming JSON, JSONL, Parquet, CSV; malformed input -> rejects with lines; no loss."""
import json
import os

import pytest

from mindformers_sft.data.formats import Conversation, RecordError, detect_format, parse_map_keys, to_conversation
from mindformers_sft.data.pipeline import SFTOptions, iter_conversations, iter_samples
from mindformers_sft.data.readers import read_file, read_json, resolve_files
from mindformers_sft.data.stats import RejectLog, Stats
from mindformers_sft.errors import ConfigError, DataError
from mindformers_sft.tokenizer import load_tokenizer
from sft_data_helpers import ALPACA, LLAMA2, SHAREGPT


def _good(items):
    return [(loc, rec) for loc, rec in items if not isinstance(rec, RecordError)]


def test_json_array_is_streamed_with_record_lines():
    with open(ALPACA, encoding="utf-8") as f:
        ref = json.load(f)
    with open(ALPACA, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for chunk in (13, 4096):                           # tiny windows: records cross chunk boundaries
        items = list(read_json(ALPACA, chunk_chars=chunk))
        assert [rec for _, rec in items] == ref
        assert [loc.index for loc, _ in items] == list(range(len(ref)))
        assert all(lines[loc.line - 1].strip().startswith("{") for loc, _ in items)


def test_jsonl_parquet_csv_and_directory(tmp_path):
    with open(ALPACA, encoding="utf-8") as f:
        recs = json.load(f)[:20]
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n\n")       # blank lines are skipped
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "b.parquet", row_group_size=7)
    import csv
    with open(tmp_path / "c.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(recs)
    for name in ("a.jsonl", "b.parquet", "c.csv"):
        items = list(read_file(str(tmp_path / name)))
        assert [rec for _, rec in items] == recs, name
    jsonl = list(read_file(str(tmp_path / "a.jsonl")))
    assert [loc.line for loc, _ in jsonl] == [1 + 2 * i for i in range(20)]
    csv_items = list(read_file(str(tmp_path / "c.csv")))
    assert csv_items[0][0].line == 2
    files = resolve_files(str(tmp_path))
    assert [os.path.basename(f) for f in files] == ["a.jsonl", "b.parquet", "c.csv"]
    assert resolve_files(str(tmp_path / "*.jsonl")) == [str(tmp_path / "a.jsonl")]
    with pytest.raises(DataError, match="no such file"):
        resolve_files(str(tmp_path / "missing*.json"))


def test_sharegpt_parquet_nested_columns(tmp_path):
    with open(SHAREGPT, encoding="utf-8") as f:
        recs = json.load(f)[:10]
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "s.parquet")
    stats = Stats()
    convs = list(iter_conversations(str(tmp_path / "s.parquet"), SFTOptions(seq_length=64), stats, RejectLog()))
    assert len(convs) == 10 and convs[0][1].turns[0] == ("user", recs[0]["conversations"][0]["value"])


def test_formats_and_map_keys():
    a = to_conversation({"instruction": "Add", "input": "1 and 2", "output": "3", "system": "S",
                         "history": [["hi", "hello"]]}, "alpaca")
    assert a.system == "S" and a.turns[:2] == [("user", "hi"), ("assistant", "hello")]
    assert a.turns[2][1].endswith("### Instruction:\nAdd\n\n### Input:\n1 and 2\n\n### Response:")
    assert to_conversation({"instruction": "Add", "input": "1", "output": "3"}, "alpaca",
                           alpaca_prompt="plain").turns[0] == ("user", "Add\n1")
    mk = parse_map_keys('{"prompt": "q", "response": "a", "query": "ctx"}')
    rec = {"q": "Why?", "ctx": "", "a": "Because."}
    assert detect_format(rec, mk) == "alpaca"
    c = to_conversation(rec, "alpaca", mk)
    assert c.turns[1] == ("assistant", "Because.") and "### Instruction:\nWhy?\n\n### Response:" in c.turns[0][1]
    m = to_conversation({"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "u"},
                                      {"role": "assistant", "content": "a"}]}, "messages")
    assert m.system == "sys" and m.turns == [("user", "u"), ("assistant", "a")]
    s = to_conversation({"conversations": [{"from": "gpt", "value": "intro"}, {"from": "human", "value": "q"},
                                           {"from": "gpt", "value": "a"}]}, "sharegpt")
    assert s.turns == [("user", "q"), ("assistant", "a")] and s.dropped_leading == 1     # as FastChat
    with pytest.raises(ConfigError, match="did you mean 'prompt'"):
        parse_map_keys({"promt": "x"})
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_map_keys("{prompt: x}")


MALFORMED_JSONL = [
    '{"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}]}',     # 1 ok
    '{"conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}',      # 2 broken JSON
    '{"conversations": [{"from": "human", "value": "q3"}]}',                                    # 3 no reply
    '{"conversations": []}',                                                                    # 4 empty
    '{"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]}',    # 5 role order
    '{"conversations": [{"from": "human", "value": "q6"}, {"value": "a6"}]}',                  # 6 missing field
    '{"conversations": [{"from": "human", "value": "q7"}, {"from": "gpt", "value": "a7"}]}',     # 7 ok
    None,                                                                                       # 8 non-UTF-8
    '["not", "an", "object"]',                                                                  # 9 not an object
    '{"id": 10}',                                                                               # 10 missing field
    '{"conversations": [{"from": "human", "value": "q11"}, {"from": "gpt", "value": "a11"}]}',   # 11 ok
]


def test_malformed_jsonl_rejects_with_lines_and_keeps_every_valid_record(tmp_path):
    path = tmp_path / "bad.jsonl"
    with open(path, "wb") as f:
        for line in MALFORMED_JSONL:
            if line is None:
                f.write(b'{"conversations": [{"from": "human", "value": "caf\xe9"}, '
                        b'{"from": "gpt", "value": "x"}]}\n')
            else:
                f.write(line.encode() + b"\n")
    tok = load_tokenizer(LLAMA2)
    stats = Stats()
    rejects_file = tmp_path / "rejects.jsonl"
    with RejectLog(str(rejects_file), stats) as log:
        chunks = list(iter_samples(str(path), tok, SFTOptions(seq_length=128, template="vicuna_v1.1",
                                                               data_format="sharegpt"), stats, log))
    samples = [s for c in chunks for s in c]
    assert [s.loc.line for s in samples] == [1, 7, 11]
    assert stats.read == 11 and stats.kept == 3 and stats.rejected == 8
    with open(rejects_file, encoding="utf-8") as f:
        rej = [json.loads(x) for x in f]
    assert [r["line"] for r in rej] == [2, 3, 4, 5, 6, 8, 9, 10]
    assert all(r["file"] == str(path) for r in rej)
    reasons = {r["line"]: r["reason"] for r in rej}
    assert "malformed JSON" in reasons[2]
    assert "no assistant reply" in reasons[3]
    assert "empty conversation" in reasons[4]
    assert "wrong role order" in reasons[5]
    assert "missing role field" in reasons[6]
    assert "UTF-8" in reasons[8]
    assert "JSON object" in reasons[9]
    assert "missing field 'conversations'" in reasons[10]


def test_broken_json_array_rejects_the_broken_records_and_keeps_the_rest(tmp_path):
    with open(ALPACA, encoding="utf-8") as f:
        recs = json.load(f)[:6]
    texts = [json.dumps(r, indent=2, ensure_ascii=False) for r in recs]
    texts[1] = texts[1].replace('"output":', '"output"', 1)                 # syntax error in record 1
    texts[4] = texts[4].replace('"input"', '"in\xffput"')                   # placeholder for a bad byte
    body = "[\n" + ",\n".join("  " + t.replace("\n", "\n  ") for t in texts) + "\n]"
    raw = body.encode("utf-8").replace("\xff".encode("utf-8"), b"\xff")
    path = tmp_path / "broken.json"
    path.write_bytes(raw)
    for chunk in (17, 1 << 20):
        items = list(read_json(str(path), chunk_chars=chunk))
        good = _good(items)
        assert [rec for _, rec in good] == [recs[i] for i in (0, 2, 3, 5)]
        bad = [(loc, str(e)) for loc, e in items if isinstance(e, RecordError)]
        assert [loc.index for loc, _ in bad] == [1, 4]
        assert bad[0][0].line == 7 and "malformed JSON at line" in bad[0][1]
        assert "UTF-8" in bad[1][1]
    # a truncated file: the records before the cut are kept, the cut is reported with its line
    path.write_bytes(raw[: raw.index(b'"Make') if b'"Make' in raw else len(raw) // 2])
    items = list(read_json(str(path)))
    assert len(_good(items)) >= 1 and isinstance(items[-1][1], RecordError) and items[-1][0].line > 1


def test_not_a_json_array_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"x.json:1: expected a JSON array"):
        list(read_json(str(path)))


def test_auto_detection_per_file_and_unknown_format(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "i", "input": "", "output": "o"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "u"},
                                                               {"role": "assistant", "content": "a"}]}) + "\n")
    convs = list(iter_conversations(str(tmp_path), SFTOptions(seq_length=8), Stats(), RejectLog()))
    assert [c.turns[-1][1] for _, c in convs] == ["o", "a"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "raw"}) + "\n")
    with pytest.raises(DataError, match="c.jsonl:1.*cannot tell the data format"):
        list(iter_conversations(str(tmp_path / "c.jsonl"), SFTOptions(seq_length=8), Stats(), RejectLog()))
