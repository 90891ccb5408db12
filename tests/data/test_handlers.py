"""HFDataLoader handler chains (MindFormers' names) give the rows `python -m mindformers_sft.tools.preprocess` writes
for the same data, template and packing (MindRecord read back), in one or several processes; the generic steps do
what datasets does; bad steps fail naming the step, the column and what the dataset has."""
import json
import os

import numpy as np
import pytest

from mindformers_sft.data.hf_loader import build_hf_dataset
from mindformers_sft.data.mindrecord import read_mindrecord
from mindformers_sft.errors import ConfigError, DataError
from mindformers_sft.tools import preprocess
from tests.paths import ALPACA, LLAMA2_TOKENIZER, QWEN2_TOKENIZER

SEQ = 512


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory):
    recs = json.load(open(ALPACA, encoding="utf-8"))[:40]
    recs[3] = {"instruction": "Say nothing.", "input": "", "output": ""}     # rejected: empty reply
    p = tmp_path_factory.mktemp("d") / "alpaca.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(p)


def reference_rows(tmp_path, data, tokenizer, *flags):
    out = str(tmp_path / "ref.mindrecord")
    assert preprocess.main(["--input_glob", data, "--tokenizer", tokenizer, "--seq_length", str(SEQ),
                            "--output_file", out, "--rejects_file", str(tmp_path / "rej.jsonl"), *flags]) == 0
    return read_mindrecord(out)[0]


def chain(data, tokenizer, handler, workers=1, columns=("input_ids", "labels"), **loader):
    section = {"data_loader": {"type": "HFDataLoader", "path": "json", "data_files": data, "split": "train",
                               "handler": handler, **loader},
               "input_columns": list(columns), "num_parallel_workers": workers}
    return build_hf_dataset(section, tokenizer, SEQ, log=lambda *a: None)


ALPACA_STEP = {"type": "AlpacaInstructDataHandler", "seq_length": SEQ, "padding": False,
               "tokenizer": {"trust_remote_code": True, "padding_side": "right"}}


def test_alpaca_rows_equal_preprocess(alpaca, tmp_path):
    ref = reference_rows(tmp_path, alpaca, LLAMA2_TOKENIZER, "--template", "vicuna_v1.1", "--data_format", "alpaca")
    ds = chain(alpaca, LLAMA2_TOKENIZER, [dict(ALPACA_STEP, padding=True)])
    assert ds.input_ids.shape == ref["input_ids"].shape == (39, SEQ + 1)
    np.testing.assert_array_equal(ds.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(ds.labels, ref["labels"])
    assert len(ds.rejects) == 1 and ds.rejects[0][0].index == 3 and "empty" in ds.rejects[0][1]
    named = chain(alpaca, "", [dict(ALPACA_STEP, padding=True, tokenizer={"vocab_file": LLAMA2_TOKENIZER,
                                                                          "trust_remote_code": True})])
    np.testing.assert_array_equal(named.input_ids, ref["input_ids"])     # a path in the handler's tokenizer block


def test_packed_rows_equal_preprocess_in_two_processes(alpaca, tmp_path):
    ref = reference_rows(tmp_path, alpaca, LLAMA2_TOKENIZER, "--template", "vicuna_v1.1", "--data_format", "alpaca",
                         "--pack", "sequential")
    steps = [ALPACA_STEP, {"type": "PackingHandler", "seq_length": SEQ, "pack_strategy": "pack"}]
    one, two = chain(alpaca, LLAMA2_TOKENIZER, steps), chain(alpaca, LLAMA2_TOKENIZER, steps, workers=2)
    assert len(one) == len(ref["input_ids"]) < 39                       # several samples per row
    for ds in (one, two):
        np.testing.assert_array_equal(ds.input_ids, ref["input_ids"])
        np.testing.assert_array_equal(ds.labels, ref["labels"])
        np.testing.assert_array_equal(ds.actual_seq_len, ref["actual_seq_len"])


def test_chat_handler_rows_equal_preprocess(tmp_path):
    from tests.paths import SHAREGPT
    ref = reference_rows(tmp_path, SHAREGPT, QWEN2_TOKENIZER, "--template", "chatml", "--data_format", "sharegpt")
    ds = chain(SHAREGPT, QWEN2_TOKENIZER, [{"type": "ChatDataHandler", "seq_length": SEQ, "template": "chatml"}])
    np.testing.assert_array_equal(ds.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(ds.labels, ref["labels"])


def test_qwen3_chat_template_with_thinking_switch(tmp_path):
    """ChatDataHandler with the Qwen3 tokenizer's own chat_template and enable_thinking: preprocess's rows."""
    from tests.paths import ASSETS
    qwen3, data = os.path.join(ASSETS, "tokenizers", "qwen3"), tmp_path / "chat.jsonl"
    msgs = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"A{i}."}]}
            for i in range(6)]
    data.write_text("".join(json.dumps(m) + "\n" for m in msgs))
    ref = reference_rows(tmp_path, str(data), qwen3, "--template", "auto", "--enable_thinking", "false")
    ds = chain(str(data), qwen3, [{"type": "ChatDataHandler", "seq_length": SEQ, "enable_thinking": False}])
    np.testing.assert_array_equal(ds.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(ds.labels, ref["labels"])


def test_mindformers_columns(alpaca):
    """The columns MindFormers' HFDataLoader yields for a packed row (its _get_packed_data): input_ids and labels of
    seq_length with labels shifted, loss_mask = labels != -100, position ids restarting per sample, actual_seq_len
    padded with seq_length."""
    steps = [ALPACA_STEP, {"type": "PackingHandler", "seq_length": SEQ, "pack_strategy": "pack"}]
    cols = ("input_ids", "labels", "loss_mask", "position_ids", "actual_seq_len")
    ds = chain(alpaca, LLAMA2_TOKENIZER, steps, columns=cols, create_compressed_eod_mask=True,
               compressed_eod_mask_length=16)
    ids, labels, loss_mask, pos, asl = ds.mf_row(0)
    ends = sorted(set(int(e) for e in ds.actual_seq_len[0]))
    assert list(asl[:len(ends)]) == ends and (asl[len(ends):] == SEQ).all() and asl.shape == (16,)
    np.testing.assert_array_equal(ids, ds.input_ids[0][:SEQ])
    np.testing.assert_array_equal(labels, ds.labels[0][1:])
    np.testing.assert_array_equal(loss_mask, (ds.labels[0][1:] != -100).astype(np.int32))
    starts = [0] + ends[:-1]
    expect = np.concatenate([np.arange(e - s) for s, e in zip(starts, ends)] + [np.arange(SEQ - ends[-1])])
    np.testing.assert_array_equal(pos, expect)
    legacy = chain(alpaca, LLAMA2_TOKENIZER, [ALPACA_STEP, {"type": "PackingHandler", "seq_length": SEQ}],
                   columns=cols, packing="pack", adaptor_config={"compress_mask": True, "eod_pad_length": 16})
    for a, b in zip(legacy.mf_row(0), ds.mf_row(0)):         # MindFormers' older keys read as it reads them
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="set data_loader.create_compressed_eod_mask: True"):
        chain(alpaca, LLAMA2_TOKENIZER, steps, columns=cols)


def test_truncate_strategy_concatenates_and_cuts(alpaca):
    """MindFormers' 'truncate': all samples end to end, cut into rows (here of seq_length + 1 tokens)."""
    plain = chain(alpaca, LLAMA2_TOKENIZER, [ALPACA_STEP])
    cut = chain(alpaca, LLAMA2_TOKENIZER, [ALPACA_STEP, {"type": "PackingHandler", "seq_length": SEQ,
                                                         "pack_strategy": "truncate"}])
    lengths = [np.nonzero(l != -100)[0][-1] + 1 for l in plain.labels]      # each sample ends with its supervised </s>
    stream = np.concatenate([r[:n] for r, n in zip(plain.input_ids, lengths)])
    assert len(cut) == -(-len(stream) // (SEQ + 1))
    np.testing.assert_array_equal(cut.input_ids.reshape(-1)[:len(stream)], stream)
    assert (cut.actual_seq_len <= SEQ).all() and (np.diff(cut.actual_seq_len, axis=1) >= 0).all()


def test_generic_steps_match_datasets(alpaca):
    import datasets
    ref = datasets.load_dataset("json", data_files=alpaca, split="train").shuffle(seed=7).select(range(5))
    ds = chain(alpaca, LLAMA2_TOKENIZER, [{"type": "shuffle", "seed": 7}, {"type": "take", "n": 5},
                                          {"type": "rename_column", "original_column_name": "output",
                                           "new_column_name": "answer"},
                                          {"type": "select_columns", "column_names": ["instruction", "input", "answer"]},
                                          dict(ALPACA_STEP, padding=True, map_keys={"response": "answer"})])
    solo = [chain(alpaca_row(alpaca, r), LLAMA2_TOKENIZER, [dict(ALPACA_STEP, padding=True)]) for r in ref]
    np.testing.assert_array_equal(ds.input_ids, np.concatenate([s.input_ids for s in solo]))


def has_input(record):
    return bool(record["input"])


def test_filter_step_takes_a_function_by_import_path(alpaca):
    import datasets
    ref = datasets.load_dataset("json", data_files=alpaca, split="train").filter(has_input)
    ds = chain(alpaca, LLAMA2_TOKENIZER, [{"type": "filter", "function": "tests.data.test_handlers:has_input"},
                                          dict(ALPACA_STEP, padding=True)])
    assert 0 < len(ds) == len(ref) < 40
    with pytest.raises(ConfigError, match=r"cannot import function 'tests.data.test_handlers:nope'"):
        chain(alpaca, LLAMA2_TOKENIZER, [{"type": "filter", "function": "tests.data.test_handlers:nope"}])


def alpaca_row(base, rec):
    p = os.path.join(os.path.dirname(base), f"one_{abs(hash(rec['instruction']))}.json")
    with open(p, "w", encoding="utf-8") as f:
        json.dump([rec], f)
    return p


def test_bad_steps_name_what_is_wrong(alpaca):
    with pytest.raises(ConfigError, match=r"handler\[0\]: unknown handler 'PackHandler'; did you mean 'PackingHandler'"):
        chain(alpaca, LLAMA2_TOKENIZER, [{"type": "PackHandler"}])
    with pytest.raises(DataError, match=r"handler\[0\] \(rename_column\): the dataset has no column 'question'; its "
                                        r"columns are: instruction, input, output"):
        chain(alpaca, LLAMA2_TOKENIZER, [{"type": "rename_column", "original_column_name": "question",
                                          "new_column_name": "q"}])
    with pytest.raises(DataError, match=r"\(AlpacaInstructDataHandler\): the dataset has no column 'instruction'"):
        chain(alpaca, LLAMA2_TOKENIZER, [{"type": "remove_columns", "column_names": "instruction"}, ALPACA_STEP])
    with pytest.raises(ConfigError, match=r"\(take\): 'take' takes no argument 'count' \(datasets.Dataset.take arguments: n\)"):
        chain(alpaca, LLAMA2_TOKENIZER, [{"type": "take", "count": 3}])
    with pytest.raises(ConfigError, match=r"pack_strategy 'packed' is not one of .*did you mean 'pack'"):
        chain(alpaca, LLAMA2_TOKENIZER, [ALPACA_STEP, {"type": "PackingHandler", "pack_strategy": "packed"}])
    with pytest.raises(ConfigError, match=r"input_columns: 'tokens' is not a column this loader makes; its columns "
                                          r"are: input_ids, labels"):
        chain(alpaca, LLAMA2_TOKENIZER, [ALPACA_STEP], columns=("input_ids", "tokens"))


def test_pretokenized_rows_in_either_layout(alpaca, tmp_path):
    """Rows saved by datasets without handlers: MindRecord's layout (seq_length + 1, labels on their tokens) and
    MindFormers 1.6+'s (seq_length, labels shifted, loss_mask) both become the same training rows."""
    import datasets
    ref = chain(alpaca, LLAMA2_TOKENIZER, [dict(ALPACA_STEP, padding=True)],
                columns=("input_ids", "labels", "loss_mask", "position_ids"))
    ours = datasets.Dataset.from_dict({"input_ids": ref.input_ids.tolist(), "labels": ref.labels.tolist()})
    mf = [ref.mf_row(i) for i in range(len(ref))]
    theirs = datasets.Dataset.from_dict({k: [r[j].tolist() for r in mf] for j, k in enumerate(ref.columns)})
    for name, ds in (("ours", ours), ("mindformers", theirs)):
        ds.save_to_disk(str(tmp_path / name))
        got = build_hf_dataset({"data_loader": {"type": "HFDataLoader", "load_func": "load_from_disk",
                                                "path": str(tmp_path / name)}}, "", None, log=lambda *a: None)
        np.testing.assert_array_equal(got.input_ids[:, :SEQ], ref.input_ids[:, :SEQ], err_msg=name)
        np.testing.assert_array_equal(got.labels[:, 1:], ref.labels[:, 1:], err_msg=name)
    bad = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7]], "labels": [[9, 9, 9]]})
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match="row 0: the labels match neither input_ids nor input_ids shifted by one"):
        build_hf_dataset({"data_loader": {"type": "HFDataLoader", "load_func": "load_from_disk",
                                          "path": str(tmp_path / "bad")}}, "", None, log=lambda *a: None)
