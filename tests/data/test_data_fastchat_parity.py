"""Vicuna masking equals FastChat's own train.preprocess, id for id and label for label.

Alignment: FastChat returns input_ids/labels of length model_max_length, unshifted (HF shifts in the model);
ours are rows of seq_length + 1, unshifted (our model shifts). With seq_length = model_max_length - 1 the two
layouts are the same arrays: pad = unk (id 0) in input_ids, -100 in labels, bos label -100.
"""
import json

import numpy as np
import pytest
import transformers
from fastchat.train import train as fastchat_train

from mindformers_sft.data.formats import Location, to_conversation
from mindformers_sft.data.packing import pad_row
from mindformers_sft.data.templates import get_template
from mindformers_sft.data.tokenize import SFTEncoder
from mindformers_sft.tokenizer import load_tokenizer
from sft_data_helpers import LLAMA2, SHAREGPT

MODEL_MAX_LENGTH = 512


@pytest.fixture(scope="module")
def fastchat_reference():
    tok = transformers.LlamaTokenizer(vocab_file=LLAMA2, legacy=True, model_max_length=MODEL_MAX_LENGTH,
                                      padding_side="right")
    tok.pad_token = tok.unk_token                  # as fastchat/train/train.py does for Llama
    with open(SHAREGPT, encoding="utf-8") as f:
        data = json.load(f)
    out = fastchat_train.preprocess([d["conversations"] for d in data], tok)
    return data, out["input_ids"].numpy(), out["labels"].numpy()


def test_vicuna_matches_fastchat_preprocess_on_every_conversation(fastchat_reference):
    data, ref_ids, ref_labels = fastchat_reference
    assert len(data) == 500
    # FastChat masks a whole sample when its per-turn lengths disagree with the full tokenization; none here.
    assert (ref_labels != -100).any(axis=1).all()
    tok = load_tokenizer(LLAMA2)
    enc = SFTEncoder(tok, get_template("vicuna_v1.1", tok), MODEL_MAX_LENGTH - 1, verify=len(data))
    items = [(Location(SHAREGPT, i), to_conversation(d, "sharegpt")) for i, d in enumerate(data)]
    samples, rejects = enc.encode(items)
    assert rejects == [] and len(samples) == len(data)
    seq_length = MODEL_MAX_LENGTH - 1
    for i, s in enumerate(samples):
        row = pad_row(s, seq_length, tok.pad_token_id)
        assert row["input_ids"].shape == (MODEL_MAX_LENGTH,)
        np.testing.assert_array_equal(row["input_ids"], ref_ids[i], err_msg=f"input_ids of conversation {i}")
        np.testing.assert_array_equal(row["labels"], ref_labels[i], err_msg=f"labels of conversation {i}")


def test_vicuna_supervises_replies_and_eos(fastchat_reference):
    data = fastchat_reference[0]
    tok = load_tokenizer(LLAMA2)
    enc = SFTEncoder(tok, get_template("vicuna_v1.1", tok), 511)
    s = enc.encode_one(to_conversation(data[0], "sharegpt"))
    ids, labels = s.input_ids, s.labels
    assert ids[0] == tok.bos_token_id and labels[0] == -100
    sup = labels != -100
    # every eos is supervised, and every supervised run ends with eos
    assert sup[ids == tok.eos_token_id].all()
    from sft_data_helpers import supervised_runs
    runs = supervised_runs(ids, labels)
    gpt = [m["value"] for m in data[0]["conversations"] if m["from"] == "gpt"]
    assert len(runs) == len(gpt)
    for (a, b), reply in zip(runs, gpt):
        assert ids[b - 1] == tok.eos_token_id
        assert tok.decode(ids[a:b]).strip() == reply + "</s>"
