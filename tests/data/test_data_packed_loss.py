"""Packing changes nothing for the model: per-sample losses packed == unpacked (stories260K, within 1e-5)."""
import json

import numpy as np
import pytest
from mindspore import Tensor

from mindformers_sft.data.formats import Location, to_conversation
from mindformers_sft.data.packing import Packer, pad_row, positions_and_segments
from mindformers_sft.data.templates import get_template
from mindformers_sft.data.tokenize import SFTEncoder
from mindformers_sft.tokenizer import load_tokenizer
from sft_data_helpers import SHAREGPT, STORIES

SEQ = 255


def _loss(model, ids, labels, pos=None, seg=None):
    t = lambda a: None if a is None else Tensor(np.asarray(a, np.int32)[None])
    s, c = model.loss_sum_and_count(t(ids), t(labels), t(pos), t(seg))
    return float(s.asnumpy()), float(c.asnumpy())


def test_per_sample_losses_packed_equal_unpacked():
    from mindformers_sft.pretrained import from_hf_dir
    model = from_hf_dir(STORIES)
    model.set_train(False)
    tok = load_tokenizer(STORIES)
    with open(SHAREGPT, encoding="utf-8") as f:
        data = json.load(f)[:60]
    # llama-2 (no default system prompt): with this 512-piece vocabulary samples are 70-250 tokens
    enc = SFTEncoder(tok, get_template("llama-2", tok), SEQ, truncation="turn")
    samples, _ = enc.encode([(Location("sg", i), to_conversation(d, "sharegpt")) for i, d in enumerate(data)])
    by_tokens = {}
    for s in samples:
        by_tokens.setdefault(tuple(s.input_ids.tolist()), s)
    samples = sorted(by_tokens.values(), key=lambda s: len(s.input_ids))[:12]
    assert len(samples) == 12
    packer = Packer(SEQ, tok.pad_token_id, "greedy")
    rows = list(packer.add(samples)) + list(packer.flush())
    assert len(rows) < len(samples)                            # several samples share rows
    reference = {}
    for s in samples:
        row = pad_row(s, SEQ, tok.pad_token_id)
        reference[tuple(s.input_ids.tolist())] = _loss(model, row["input_ids"], row["labels"])
    checked = 0
    for row in rows:
        pos, seg = positions_and_segments(row["actual_seq_len"], SEQ)
        ends = sorted(set(row["actual_seq_len"].tolist()))
        starts = [0] + ends[:-1]
        for k, (a, b) in enumerate(zip(starts, ends)):
            end = b if b < SEQ or row["labels"][SEQ] == -100 else SEQ + 1
            key = tuple(row["input_ids"][a:end].tolist())
            assert key in reference
            only = np.full_like(row["labels"], -100)
            only[a:end] = row["labels"][a:end]
            got_sum, got_count = _loss(model, row["input_ids"], only, pos, seg)
            ref_sum, ref_count = reference[key]
            assert got_count == ref_count > 0
            assert abs(got_sum / got_count - ref_sum / ref_count) < 1e-5, (k, got_sum / got_count,
                                                                          ref_sum / ref_count)
            checked += 1
    assert checked == len(samples)
    # without segment ids the samples would see each other: the loss changes (the test can fail)
    row = max(rows, key=lambda r: len(set(r["actual_seq_len"].tolist())))
    pos, seg = positions_and_segments(row["actual_seq_len"], SEQ)
    with_seg = _loss(model, row["input_ids"], row["labels"], pos, seg)[0]
    without = _loss(model, row["input_ids"], row["labels"])[0]
    assert abs(with_seg - without) > 1e-3
