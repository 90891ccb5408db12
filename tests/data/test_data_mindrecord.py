"""preprocess -> MindRecord -> MindRecordDataset round trip; packed rows; the online dataset; the converter."""
import json
import os

import numpy as np
import pytest

from mindformers_sft.data.dataset import MindRecordDataset, OnlineSFTDataset, build_dataset
from mindformers_sft.data.packing import Packer, positions_and_segments
from mindformers_sft.data.tokenize import Sample
from mindformers_sft.errors import ConfigError, DataError
from mindformers_sft.tools import alpaca_converter, preprocess
from sft_data_helpers import ALPACA, LLAMA2, QWEN2, SHAREGPT

SEQ = 255


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("mr")
    with open(SHAREGPT, encoding="utf-8") as f:
        recs = json.load(f)[:120]
    path = d / "sg.json"
    path.write_text(json.dumps(recs, ensure_ascii=False, indent=2))
    return d, str(path)


def _run(argv, capsys):
    assert preprocess.main(argv) == 0
    return capsys.readouterr().out


def test_preprocess_round_trip_equals_online_dataset(small_data, capsys):
    d, data = small_data
    out = str(d / "plain.mindrecord")
    # MindFormers llama_preprocess flags: --dataset_type qa --tokenizer llama --model_file
    text = _run(["--dataset_type", "qa", "--input_glob", data, "--tokenizer", "llama", "--model_file", LLAMA2,
                 "--seq_length", str(SEQ), "--output_file", out, "--template", "vicuna_v1.1"], capsys)
    assert "records read 120, kept 120, truncated 0, rejected 0" in text and "pad fraction" in text
    ds = MindRecordDataset(out, seq_length=SEQ)
    online = OnlineSFTDataset(data, LLAMA2, template="vicuna_v1.1", seq_length=SEQ)
    assert len(ds) == len(online) == 120 and not ds.packed
    for i in (0, 1, 57, 119):
        a, b = ds[i], online[i]
        assert set(a) == {"input_ids", "labels"}
        assert a["input_ids"].dtype == np.int32 and a["input_ids"].shape == (SEQ + 1,)
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_array_equal(ds.input_ids, online.input_ids)
    np.testing.assert_array_equal(ds.labels, online.labels)
    # padding: pad id (unk 0 for Llama-2) and -100
    row = ds[0]
    n = int((row["labels"] != -100).nonzero()[0].max()) + 1
    assert (row["input_ids"][n:] == 0).all() and (row["labels"][n:] == -100).all()
    with open(out + ".rejects.jsonl") as f:
        assert f.read() == ""
    with pytest.raises(ConfigError, match="seq_length"):
        MindRecordDataset(out, seq_length=SEQ + 1)
    # never overwrite
    assert preprocess.main(["--input_glob", data, "--tokenizer", LLAMA2, "--seq_length", str(SEQ),
                            "--output_file", out, "--template", "vicuna_v1.1"]) == 1
    assert "already exists" in capsys.readouterr().err


def _segments(row, seq):
    """Samples of a packed row from its actual_seq_len: [(start, end)] in token positions."""
    a = row["actual_seq_len"]
    ends = [int(x) for k, x in enumerate(a) if k == 0 or x > a[k - 1]]
    return list(zip([0] + ends[:-1], ends))


def test_packed_rows_carry_correct_actual_seq_len(small_data, capsys):
    d, data = small_data
    plain = OnlineSFTDataset(data, LLAMA2, template="vicuna_v1.1", seq_length=SEQ)
    samples = []
    for i in range(len(plain)):
        ids, lab = plain.input_ids[i], plain.labels[i]
        n = int(np.nonzero(lab != -100)[0].max()) + 1          # vicuna rows end with a supervised </s>
        samples.append((tuple(ids[:n]), tuple(lab[1:n])))
    for strategy in ("greedy", "sequential"):
        out = str(d / f"packed_{strategy}.mindrecord")
        text = _run(["--input_glob", data, "--tokenizer", LLAMA2, "--template", "vicuna_v1.1", "--seq_length",
                     str(SEQ), "--output_file", out, "--pack", strategy, "--file_partition", "2"], capsys)
        assert "kept 120" in text
        assert os.path.exists(out + "0") and os.path.exists(out + "1")
        ds = MindRecordDataset(out + "0", seq_length=SEQ)          # one shard opens the whole file set
        assert ds.packed and len(ds) < 120
        assert ds.actual_seq_len.shape[1] == min(SEQ, 512)
        got = []
        for i in range(len(ds)):
            row = {"input_ids": ds.input_ids[i], "labels": ds.labels[i], "actual_seq_len": ds.actual_seq_len[i]}
            item = ds[i]
            assert item["position_ids"].shape == (SEQ,) and item["segment_ids"].shape == (SEQ,)
            segs = _segments(row, SEQ)
            used = 0
            for k, (a, b) in enumerate(segs):
                # positions restart at 0, segment ids count from 1
                np.testing.assert_array_equal(item["position_ids"][a:b], np.arange(b - a))
                assert (item["segment_ids"][a:b] == k + 1).all()
                # ends are in input coordinates (clipped to SEQ): a last sample may also own token SEQ, which
                # only the labels show (vicuna samples end with a supervised </s>)
                end = b if b < SEQ or row["labels"][SEQ] == -100 else SEQ + 1
                tokens = tuple(row["input_ids"][a:end])
                assert row["labels"][a] == -100                        # never predicted across samples
                got.append((tokens, tuple(row["labels"][a + 1:end])))
                used = end
            assert (item["segment_ids"][segs[-1][1]:] == 0).all()
            assert (row["labels"][used:] == -100).all() and (row["input_ids"][used:] == 0).all()
        assert sorted(got) == sorted(samples), strategy


def test_positions_and_segments_and_packer_limits():
    pos, seg = positions_and_segments(np.array([3, 7, 7, 7]), 9)
    assert pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1]
    assert seg.tolist() == [1, 1, 1, 2, 2, 2, 2, 0, 0]
    pos, seg = positions_and_segments(np.array([4, 9, 9]), 9)
    assert seg.tolist() == [1] * 4 + [2] * 5 and pos.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4]
    mk = lambda n: Sample(np.arange(1, n + 1, dtype=np.int32), np.arange(1, n + 1, dtype=np.int32), None)
    p = Packer(9, 0, "greedy", max_samples=2)
    rows = list(p.add([mk(3)] * 5)) + list(p.flush())
    assert len(rows) == 3 and all(len(_segments(r, 9)) <= 2 for r in rows)
    p = Packer(9, 0, "sequential")
    rows = list(p.add([mk(6), mk(4), mk(5), mk(10)])) + list(p.flush())
    # capacity is S + 1 = 10 tokens; ends are clipped to S = 9 (model-token coordinates)
    assert [r["actual_seq_len"][:3].tolist() for r in rows] == [[6, 9, 9], [5, 5, 5], [9, 9, 9]]
    assert rows[2]["input_ids"].tolist() == list(range(1, 11))       # a full S+1 row


def test_workers_give_the_same_rows(small_data):
    d, data = small_data
    one = OnlineSFTDataset(data, LLAMA2, template="vicuna_v1.1", seq_length=SEQ, pack=True)
    two = OnlineSFTDataset(data, LLAMA2, template="vicuna_v1.1", seq_length=SEQ, pack=True, num_workers=2,
                           chunk_records=16)                  # 8 chunks over 2 processes, results in order
    np.testing.assert_array_equal(one.input_ids, two.input_ids)
    np.testing.assert_array_equal(one.labels, two.labels)
    np.testing.assert_array_equal(one.actual_seq_len, two.actual_seq_len)
    assert one.stats.as_dict() == two.stats.as_dict()


def test_build_dataset_from_yaml_sections(small_data, capsys):
    d, data = small_data
    out = str(d / "b.mindrecord")
    _run(["--input_glob", data, "--tokenizer", LLAMA2, "--template", "vicuna_v1.1", "--seq_length", "127",
          "--output_file", out, "--truncation", "drop"], capsys)
    ds = build_dataset({"data_loader": {"type": "MindDataset", "dataset_dir": str(d / "b.mindrecord")}}, "", 127)
    rejects = str(d / "online_rejects.jsonl")
    online = build_dataset({"data_loader": {"type": "SFTDataLoader", "dataset_dir": data, "template": "vicuna_v1.1",
                                            "truncation": "drop", "rejects_file": rejects}}, LLAMA2, 127)
    assert 0 < len(ds) == len(online) < 120
    np.testing.assert_array_equal(ds.input_ids, online.input_ids)
    with open(rejects) as f:
        rej = [json.loads(x) for x in f]
    assert len(rej) == 120 - len(ds) and all("too long" in r["reason"] and r["line"] for r in rej)
    with pytest.raises(ConfigError, match="SFTDataLoader"):
        build_dataset({"data_loader": {"type": "Foo", "dataset_dir": data}}, LLAMA2, 127)
    with pytest.raises(DataError, match="no MindRecord"):
        build_dataset({"data_loader": {"type": "MindDataset", "dataset_dir": str(d / "nothing")}}, "", 127)


def test_qwen_online_dataset_auto_template(tmp_path):
    path = tmp_path / "m.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(6):
            f.write(json.dumps({"messages": [{"role": "system", "content": "Be nice."},
                                             {"role": "user", "content": f"Q{i}"},
                                             {"role": "assistant", "content": f"A{i}"}]}) + "\n")
    ds = OnlineSFTDataset(str(path), QWEN2, seq_length=63, pack="sequential")
    L = ds.stats.tokens // 6                                   # all samples have the same length
    per_row = 64 // L
    assert ds.stats.kept == 6 and len(ds) == -(-6 // per_row) and per_row >= 2
    item = ds[0]
    assert (item["segment_ids"][:L] == 1).all() and item["segment_ids"].max() == per_row
    assert item["position_ids"][L] == 0 and item["position_ids"][L - 1] == L - 1


def test_alpaca_converter_matches_mindformers_layout(tmp_path):
    out = tmp_path / "conv.json"
    res = alpaca_converter.convert(ALPACA, str(out))
    assert res == {"converted": 999, "rejected": 0}
    with open(ALPACA, encoding="utf-8") as f:
        data = json.load(f)
    expected = []
    for i, ex in enumerate(data, 1):
        if ex.get("input", "") != "":
            prompt = ("Below is an instruction that describes a task, paired with an input that provides further "
                      "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                      f"{ex['instruction']}\n\n### Input:\n{ex['input']}\n\n### Response:")
        else:
            prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                      f"the request.\n\n### Instruction:\n{ex['instruction']}\n\n### Response:")
        expected.append({"id": str(i), "conversations": [{"from": "human", "value": prompt},
                                                         {"from": "gpt", "value": ex["output"]}]})
    # byte-identical to json.dump(new_data, f, ensure_ascii=False, indent=2), as MindFormers writes it
    assert out.read_text(encoding="utf-8") == json.dumps(expected, ensure_ascii=False, indent=2)
    assert alpaca_converter.main(["--data_path", ALPACA, "--output_path", str(out)]) == 1


def _write_mindrecord(path, rows, schema):
    from mindspore.mindrecord import FileWriter
    w = FileWriter(str(path), shard_num=1, overwrite=True)
    w.add_schema(schema, "test")
    w.write_raw_data([{k: np.asarray(v, np.int32) for k, v in r.items()} for r in rows])
    w.commit()


def test_bad_mindrecords_name_the_file_and_what_is_wrong(tmp_path):
    ids = {"type": "int32", "shape": [-1]}
    ok = [{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}] * 3
    good = tmp_path / "good.mindrecord"
    _write_mindrecord(good, ok, {"input_ids": ids, "labels": ids})
    ds = MindRecordDataset(str(good), seq_length=3)
    assert len(ds) == 3 and ds.seq_length == 3
    ragged = tmp_path / "ragged.mindrecord"
    _write_mindrecord(ragged, ok[:2] + [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}],
                      {"input_ids": ids, "labels": ids})
    with pytest.raises(DataError, match=r"ragged.mindrecord: column 'input_ids' has rows of different lengths "
                                        r"\[3, 4\] \(row 2\)"):
        MindRecordDataset(str(ragged))
    nolabels = tmp_path / "nolabels.mindrecord"
    _write_mindrecord(nolabels, [{"input_ids": [1, 2]}], {"input_ids": ids})
    with pytest.raises(DataError, match="nolabels.mindrecord: MindRecord has no column 'labels'"):
        MindRecordDataset(str(nolabels))
    with pytest.raises(ConfigError, match=r"rows hold 4 tokens, but seq_length is 8"):
        MindRecordDataset(str(good), seq_length=8)
    junk = tmp_path / "junk.mindrecord"
    junk.write_bytes(b"not a mindrecord at all" * 10)
    with pytest.raises(DataError, match="junk.mindrecord: cannot open as MindRecord"):
        MindRecordDataset(str(junk))
