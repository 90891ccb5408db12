"""HFDataLoader reads local data through datasets, as MindFormers does (load_func + the remaining keys), with no
network attempt: json/jsonl, parquet, csv, arrow, a local dataset folder, a save_to_disk folder; streaming gives
the same rows; datasets errors come back naming the file."""
import json
import socket

import numpy as np
import pytest

from mindformers_sft.data.hf_loader import build_hf_dataset, load
from mindformers_sft.errors import ConfigError, DataError
from tests.paths import ALPACA, LLAMA2_TOKENIZER

N = 12
SEQ = 512


@pytest.fixture(scope="module")
def records():
    return json.load(open(ALPACA, encoding="utf-8"))[:N]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def write_all(tmp_path, records):
    """The same records in each format datasets reads, written by pandas / datasets (references)."""
    import datasets
    import pandas as pd
    df = pd.DataFrame(records)
    d = tmp_path
    (d / "a.json").write_text(json.dumps(records))
    (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    df.to_parquet(d / "a.parquet")
    df.to_csv(d / "a.csv", index=False)
    folder = d / "folder"
    folder.mkdir()
    df.iloc[:N // 2].to_json(folder / "part0.jsonl", orient="records", lines=True)
    df.iloc[N // 2:].to_json(folder / "part1.jsonl", orient="records", lines=True)
    ds = datasets.Dataset.from_pandas(df)
    ds.save_to_disk(str(d / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(d / "saved_dict"))
    arrow = sorted((d / "saved").glob("*.arrow"))[0]
    return {"json": {"path": "json", "data_files": str(d / "a.json")},
            "jsonl": {"path": "json", "data_files": str(d / "a.jsonl")},
            "file as path": {"path": str(d / "a.jsonl")},
            "--train_dataset_dir file": {"path": "some/hub-name", "dataset_dir": str(d / "a.jsonl")},
            "--train_dataset_dir folder": {"dataset_dir": str(folder)},
            "parquet": {"path": "parquet", "data_files": str(d / "a.parquet")},
            "csv": {"path": "csv", "data_files": str(d / "a.csv")},
            "arrow": {"path": "arrow", "data_files": str(arrow)},
            "folder": {"path": str(folder)},
            "save_to_disk": {"load_func": "load_from_disk", "path": str(d / "saved")},
            "save_to_disk dict": {"load_func": "load_from_disk", "path": str(d / "saved_dict"), "split": "train"}}


def norm(r):
    return {k: ("" if r.get(k) is None or (isinstance(r.get(k), float) and np.isnan(r[k])) else str(r[k]))
            for k in ("instruction", "input", "output")}


def test_every_local_form_loads_offline(tmp_path, records, no_network):
    for name, spec in write_all(tmp_path, records).items():
        ds = load({"type": "HFDataLoader", **spec}, str(tmp_path / "cache"))
        assert [norm(r) for r in ds] == [norm(r) for r in records], name


def test_rows_from_any_form_and_streaming_are_equal(tmp_path, records, no_network):
    forms = write_all(tmp_path, records)
    step = [{"type": "AlpacaInstructDataHandler", "seq_length": SEQ}]

    def rows(spec):
        section = {"data_loader": {"type": "HFDataLoader", "handler": step, **spec}}
        return build_hf_dataset(section, LLAMA2_TOKENIZER, SEQ, log=lambda *a: None)
    ref = rows(forms["json"])
    for name in ("parquet", "save_to_disk"):
        np.testing.assert_array_equal(rows(forms[name]).input_ids, ref.input_ids, err_msg=name)
    streamed = rows(dict(forms["jsonl"], streaming=True))
    np.testing.assert_array_equal(streamed.input_ids, ref.input_ids)
    np.testing.assert_array_equal(streamed.labels, ref.labels)
    packed = [{"type": "take", "n": 8}, step[0], {"type": "PackingHandler", "seq_length": SEQ}]
    s = build_hf_dataset({"data_loader": {"type": "HFDataLoader", "handler": packed, "streaming": True,
                                          **forms["jsonl"]}}, LLAMA2_TOKENIZER, SEQ, log=lambda *a: None)
    p = build_hf_dataset({"data_loader": {"type": "HFDataLoader", "handler": packed, **forms["jsonl"]}},
                         LLAMA2_TOKENIZER, SEQ, log=lambda *a: None)
    np.testing.assert_array_equal(s.input_ids, p.input_ids)
    np.testing.assert_array_equal(s.actual_seq_len, p.actual_seq_len)


def test_datasets_errors_name_the_file(tmp_path, records):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in records))
    bad.write_text(json.dumps(records[0]) + "\n{\"instruction\": \"x\", \n")
    with pytest.raises(DataError, match=r"bad.jsonl: datasets.load_dataset failed"):
        load({"path": "json", "data_files": [str(good), str(bad)]}, str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"missing.jsonl: data file or folder not found"):
        load({"path": "json", "data_files": str(tmp_path / "missing.jsonl")})
    with pytest.raises(ConfigError, match=r"load_func: 'load_datasets' is not one of load_dataset, load_from_disk"):
        load({"load_func": "load_datasets", "path": "json"})
    with pytest.raises(DataError, match=r"good.jsonl: datasets.load_dataset failed: ValueError: Unknown split "
                                        r"\"validation\". Should be one of \['train'\]"):
        load({"path": "json", "data_files": str(good), "split": "validation"}, str(tmp_path / "c"))
    saved = tmp_path / "saved"
    __import__("datasets").DatasetDict({"train": load({"path": str(good)}, str(tmp_path / "c"))}).save_to_disk(
        str(saved))
    tail = load({"load_func": "load_from_disk", "path": str(saved), "split": "train[75%:]"})
    head = load({"path": "json", "data_files": str(good), "split": "train[75%:]"}, str(tmp_path / "c"))
    assert list(tail) == list(head) and len(tail) == N - 3 * N // 4         # the slice datasets' load_dataset takes
    with pytest.raises(ConfigError, match=r"data_loader.split: 'test' is not a split of .*saved; splits: train"):
        load({"load_func": "load_from_disk", "path": str(saved), "split": "test"})


def test_refused_loader_and_no_tokenizer(tmp_path, records):
    from mindformers_sft.data.dataset import build_dataset
    with pytest.raises(ConfigError, match="BlendedMegatronDatasetDataLoader .* is not supported here; use HFDataLoader"):
        build_dataset({"data_loader": {"type": "BlendedMegatronDatasetDataLoader"}})
    p = tmp_path / "a.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ConfigError, match="a tokenizing handler needs a tokenizer"):
        build_dataset({"data_loader": {"type": "HFDataLoader", "path": str(p),
                                       "handler": [{"type": "AlpacaInstructDataHandler", "seq_length": 64}]}}, "", 64)
