"""Truncation modes through preprocess (MindRecord), the online loader, packing, and the main job's data.

The rows are checked against the encoder's samples, which tests/data/test_data_truncation.py checks against
FastChat's preprocess (cut) and LLaMA-Factory's rule (proportional); here: the same modes reach every path,
truncated samples are counted (not rejected), and a truncated sample with nothing supervised is in the rejects
file with its reason."""
import json

import numpy as np
import pytest

from mindformers_sft.config import load_config
from mindformers_sft.data.dataset import MindRecordDataset, OnlineSFTDataset, build_dataset
from mindformers_sft.data.packing import pad_row
from mindformers_sft.data.pipeline import SFTOptions
from mindformers_sft.data.templates import get_template
from mindformers_sft.data.tokenize import SFTEncoder
from mindformers_sft.errors import ConfigError
from mindformers_sft.tokenizer import load_tokenizer
from mindformers_sft.tools import preprocess
from sft_data_helpers import ALPACA, LLAMA2, ROOT, STORIES

SEQ = 127
MODES = ("proportional", "cut", "turn", "drop")


@pytest.fixture(scope="module")
def alpaca60(tmp_path_factory):
    d = tmp_path_factory.mktemp("trunc")
    with open(ALPACA, encoding="utf-8") as f:
        recs = json.load(f)[:60]
    path = d / "a.json"
    path.write_text(json.dumps(recs, ensure_ascii=False, indent=1))
    return d, str(path), recs


def _encoder_rows(recs, mode):
    """Expected padded rows of the records, from the encoder alone (no pipeline)."""
    from mindformers_sft.data.formats import Location, to_conversation
    tok = load_tokenizer(LLAMA2)
    enc = SFTEncoder(tok, get_template("vicuna_v1.1", tok), SEQ, truncation=mode)
    samples, rejects = enc.encode([(Location("x", i), to_conversation(r, "alpaca")) for i, r in enumerate(recs)])
    return [pad_row(s, SEQ, tok.pad_token_id) for s in samples], samples, rejects


@pytest.mark.parametrize("mode", MODES)
def test_preprocess_and_online_loader_apply_the_mode(alpaca60, mode, capsys):
    d, path, recs = alpaca60
    rows, samples, rejects = _encoder_rows(recs, mode)
    out = str(d / f"{mode}.mindrecord")
    argv = ["--input_glob", path, "--tokenizer", LLAMA2, "--template", "vicuna_v1.1", "--seq_length", str(SEQ),
            "--output_file", out, "--truncation", mode]
    assert preprocess.main(argv) == 0
    text = capsys.readouterr().out
    truncated = sum(s.truncated for s in samples)
    assert f"records read 60, kept {len(samples)}, truncated {truncated}, rejected {len(rejects)}" in text
    if mode in ("proportional", "cut"):
        assert truncated >= 20 and len(samples) + len(rejects) == 60
    if mode == "proportional":
        assert rejects == []
    ds = MindRecordDataset(out, seq_length=SEQ)
    np.testing.assert_array_equal(ds.input_ids, np.stack([r["input_ids"] for r in rows]))
    np.testing.assert_array_equal(ds.labels, np.stack([r["labels"] for r in rows]))
    with open(out + ".rejects.jsonl") as f:
        assert [json.loads(x)["reason"] for x in f] == [r for _, r in rejects]
    online = build_dataset({"data_loader": {"type": "SFTDataLoader", "dataset_dir": path, "template": "vicuna_v1.1",
                                            "data_format": "alpaca", "truncation": mode}}, LLAMA2, SEQ)
    np.testing.assert_array_equal(online.input_ids, ds.input_ids)
    assert online.stats.truncated == truncated and online.stats.rejected == len(rejects)


@pytest.mark.parametrize("mode", ["proportional", "cut"])
def test_packing_keeps_truncated_samples_whole(alpaca60, mode):
    d, path, recs = alpaca60
    _, samples, _ = _encoder_rows(recs, mode)
    ds = OnlineSFTDataset(path, LLAMA2, template="vicuna_v1.1", seq_length=SEQ, data_format="alpaca", pack=True,
                          truncation=mode)
    assert ds.stats.kept == len(samples) and ds.stats.truncated == sum(s.truncated for s in samples)
    # every sample is in some row, token for token (a full-length truncated sample fills a row alone)
    found = 0
    for s in samples:
        n = len(s.input_ids)
        for r in range(len(ds)):
            ends = np.unique(np.concatenate([[0], ds.actual_seq_len[r]]))
            starts = ends[:-1]
            hit = [a for a in starts if np.array_equal(ds.input_ids[r, a:a + n], s.input_ids)]
            if hit:
                found += 1
                break
    assert found == len(samples)
    # packing masks each sample's first label, which is the bos here (never supervised)
    assert ds.packed and int((ds.labels != -100).sum()) == sum(int((s.labels != -100).sum()) for s in samples)


def test_cut_reject_with_reason_and_unknown_mode(tmp_path, capsys):
    short = {"instruction": "Say hello.", "input": "", "output": "Hello."}
    long_prompt = {"instruction": "Summarize: " + " ".join(["word"] * 300), "input": "", "output": "Words."}
    path = tmp_path / "long.json"
    path.write_text(json.dumps([long_prompt, short]))
    out = str(tmp_path / "c.mindrecord")
    assert preprocess.main(["--input_glob", str(path), "--tokenizer", LLAMA2, "--template", "vicuna_v1.1",
                            "--seq_length", str(SEQ), "--output_file", out, "--truncation", "cut"]) == 0
    assert "kept 1, truncated 0, rejected 1" in capsys.readouterr().out
    with open(out + ".rejects.jsonl") as f:
        rej = [json.loads(x) for x in f]
    assert len(rej) == 1 and rej[0]["index"] == 0 and rej[0]["line"] == 1
    assert rej[0]["reason"].startswith("no supervised token left after truncation (cut)")
    # proportional keeps it: the reply survives, the prompt is shortened
    ds = OnlineSFTDataset(str(path), LLAMA2, template="vicuna_v1.1", seq_length=SEQ, data_format="alpaca")
    assert ds.stats.kept == 2 and ds.stats.truncated == 1 and ds.stats.rejected == 0
    for bad in (lambda: SFTOptions(seq_length=SEQ, truncation="middle"),
                lambda: build_dataset({"data_loader": {"type": "SFTDataLoader", "dataset_dir": str(path),
                                                       "truncation": "middle"}}, LLAMA2, SEQ)):
        with pytest.raises(ConfigError, match="proportional, cut, turn, drop"):
            bad()
    with pytest.raises(SystemExit):
        preprocess.build_parser().parse_args(["--input_glob", "x", "--output_file", "y", "--truncation", "middle"])
    assert "proportional" in capsys.readouterr().err


def test_main_job_keeps_every_record(capsys):
    """configs/stories260k/lora_stories260k.yaml: every record of the bundled Alpaca demo is kept."""
    import os
    cfg = load_config(os.path.join(ROOT, "configs", "stories260k", "lora_stories260k.yaml"))
    section = cfg.train_dataset.to_plain()
    assert section["data_loader"]["truncation"] == "proportional"
    section["data_loader"]["dataset_dir"] = ALPACA
    section["data_loader"]["split"] = "train"
    ds = build_dataset(section, os.path.join(STORIES, "tokenizer.json"), 512)
    with open(ALPACA, encoding="utf-8") as f:
        n = len(json.load(f))
    assert len(ds) == ds.stats.kept == n and ds.stats.rejected == 0 and ds.stats.truncated > 400
    assert f"kept {n}, truncated {ds.stats.truncated}, rejected 0" in capsys.readouterr().out
    assert load_config().train_dataset.data_loader.truncation == "proportional"     # the schema default


@pytest.mark.parametrize("mode", ["proportional", "cut"])
def test_mindformers_handler_applies_the_mode(alpaca60, mode, capsys):
    """HFDataLoader + AlpacaInstructDataHandler (MindFormers 1.6+) with `truncation`: preprocess's rows."""
    from mindformers_sft.data.hf_loader import build_hf_dataset
    d, path, recs = alpaca60
    rows, samples, rejects = _encoder_rows(recs, mode)
    step = {"type": "AlpacaInstructDataHandler", "seq_length": SEQ, "padding": True, "template": "vicuna_v1.1",
            "truncation": mode, "tokenizer": {"padding_side": "right"}}
    section = {"data_loader": {"type": "HFDataLoader", "path": "json", "data_files": path, "split": "train",
                               "handler": [step]}, "input_columns": ["input_ids", "labels"]}
    ds = build_hf_dataset(section, LLAMA2, SEQ, log=lambda *a: None)
    assert sum(s.truncated for s in samples) >= 20 and len(ds) == len(samples)
    np.testing.assert_array_equal(ds.input_ids, np.stack([r["input_ids"] for r in rows]))
    np.testing.assert_array_equal(ds.labels, np.stack([r["labels"] for r in rows]))
