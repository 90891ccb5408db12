"""Over-long samples are truncated as the peers do it, token for token.

* ``cut`` equals FastChat's own ``fastchat.train.train.preprocess`` (vicuna_v1.1, the legacy Llama-2 tokenizer,
  ``truncation=True, max_length=model_max_length``) at model_max_length = seq_length + 1 = 129 and 257, on 400
  conversations made of the bundled Alpaca demo records (one or three exchanges), most of them longer at 129.
  FastChat keeps a sample whose first seq_length + 1 tokens hold no reply with all labels -100; we reject it
  (reason in the rejects) -- the test checks those are the same samples.
* ``proportional`` equals LLaMA-Factory's cutoff_len rule, written below from its published source as the
  reference, applied to the (source, target) pairs of FastChat's untruncated rows.
"""
import json

import numpy as np
import pytest
import transformers
from fastchat.train import train as fastchat_train

from mindformers_sft.data.formats import Location, to_conversation
from mindformers_sft.data.packing import pad_row
from mindformers_sft.data.templates import get_template
from mindformers_sft.data.tokenize import IGNORE_INDEX, SFTEncoder
from mindformers_sft.tokenizer import load_tokenizer
from sft_data_helpers import ALPACA, LLAMA2, supervised_runs


# -- the reference: LLaMA-Factory ---------------------------------------------------------------------------------
# hiyouga/LLaMA-Factory, src/llamafactory/data/processor/processor_utils.py (commit 1679930e), infer_seqlen, and
# src/llamafactory/data/processor/supervised.py (commit 0b3022bb), SupervisedDatasetProcessor._encode_data_example
# (Apache-2.0), transcribed: no multimodal tokens, efficient_eos False, no loss_mask.

def lf_infer_seqlen(source_len, target_len, cutoff_len):
    if target_len * 2 < cutoff_len:  # truncate source
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:  # truncate target
        max_target_len = cutoff_len - source_len
    else:  # truncate both
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    max_source_len = max(cutoff_len - new_target_len, 0)
    new_source_len = min(max_source_len, source_len)
    return new_source_len, new_target_len


def lf_encode(encoded_pairs, cutoff_len, mask_history=False, train_on_prompt=False):
    input_ids, labels = [], []
    total_length = 0
    if mask_history:
        encoded_pairs = encoded_pairs[::-1]  # high priority for last turns
    for turn_idx, (source_ids, target_ids) in enumerate(encoded_pairs):
        if total_length >= cutoff_len:
            break
        source_len, target_len = lf_infer_seqlen(len(source_ids), len(target_ids), cutoff_len - total_length)
        source_ids = source_ids[:source_len]
        target_ids = target_ids[:target_len]
        total_length += source_len + target_len
        source_label = source_ids if train_on_prompt else [IGNORE_INDEX] * source_len
        if mask_history and turn_idx != 0:  # train on the last turn only
            target_label = [IGNORE_INDEX] * target_len
        else:
            target_label = target_ids
        if mask_history:  # reversed sequences
            input_ids = source_ids + target_ids + input_ids
            labels = source_label + target_label + labels
        else:
            input_ids += source_ids + target_ids
            labels += source_label + target_label
    return input_ids, labels


# -- fixtures -----------------------------------------------------------------------------------------------------

def fastchat_rows(conversations, model_max_length):
    tok = transformers.LlamaTokenizer(vocab_file=LLAMA2, legacy=True, model_max_length=model_max_length,
                                      padding_side="right")
    tok.pad_token = tok.unk_token                  # as fastchat/train/train.py does for Llama
    out = fastchat_train.preprocess(conversations, tok)
    return out["input_ids"].numpy(), out["labels"].numpy()


def alpaca_conversations():
    """The bundled Alpaca demo as ShareGPT conversations: 300 single exchanges, then 100 of three exchanges (three
    consecutive records each). Half of them are longer than 129 tokens."""
    with open(ALPACA, encoding="utf-8") as f:
        recs = json.load(f)

    def exchange(r):
        prompt = r["instruction"] + ("\n" + r["input"] if r["input"] else "")
        return [{"from": "human", "value": prompt}, {"from": "gpt", "value": r["output"]}]

    convs = [{"conversations": exchange(r)} for r in recs[:300]]
    for k in range(300, 600, 3):
        convs.append({"conversations": exchange(recs[k]) + exchange(recs[k + 1]) + exchange(recs[k + 2])})
    return convs


@pytest.fixture(scope="module")
def data():
    raw = alpaca_conversations()
    tok = load_tokenizer(LLAMA2)
    items = [(Location(ALPACA, i), to_conversation(d, "sharegpt")) for i, d in enumerate(raw)]
    return raw, tok, items


def encode(tok, items, seq_length, **kw):
    enc = SFTEncoder(tok, get_template("vicuna_v1.1", tok), seq_length, **kw)
    samples, rejects = enc.encode(items)
    return {s.loc.index: s for s in samples}, {loc.index: reason for loc, reason in rejects}


@pytest.mark.parametrize("seq_length", [128, 256])
def test_cut_equals_fastchat_preprocess(data, whole_pairs, seq_length):
    raw, tok, items = data
    ref_ids, ref_labels = fastchat_rows([d["conversations"] for d in raw], seq_length + 1)
    samples, rejects = encode(tok, items, seq_length, truncation="cut")
    longer = int((ref_ids[:, -1] != tok.pad_token_id).sum())
    assert longer > 150, "the data must exercise truncation"
    assert sum(s.truncated for s in samples.values()) > 150
    no_reply = {i for i in range(len(raw)) if (ref_labels[i] == IGNORE_INDEX).all()}
    assert set(rejects) == no_reply
    assert all(r.startswith("no supervised token left after truncation (cut)") for r in rejects.values())
    assert len(samples) + len(rejects) == len(raw)
    for i, s in samples.items():
        row = pad_row(s, seq_length, tok.pad_token_id)
        np.testing.assert_array_equal(row["input_ids"], ref_ids[i], err_msg=f"input_ids of conversation {i}")
        np.testing.assert_array_equal(row["labels"], ref_labels[i], err_msg=f"labels of conversation {i}")
        assert s.truncated == (sum(len(a) + len(b) for a, b in whole_pairs[i]) > seq_length + 1)


@pytest.fixture(scope="module")
def whole_pairs(data):
    """(source, target) token pairs of each conversation from FastChat's untruncated rows: the maximal runs of
    -100 labels and of supervised labels."""
    raw = data[0]
    ids, labels = fastchat_rows([d["conversations"] for d in raw], 4096)
    pairs = []
    for i, d in enumerate(raw):
        n = int((ids[i] != 0).sum())
        assert n < 4096 and (labels[i, :n] != IGNORE_INDEX).any()
        runs = supervised_runs(ids[i, :n], labels[i, :n])
        assert len(runs) == sum(m["from"] == "gpt" for m in d["conversations"]) and runs[-1][1] == n
        prev, p = 0, []
        for a, b in runs:
            p.append((ids[i, prev:a].tolist(), ids[i, a:b].tolist()))
            prev = b
        pairs.append(p)
    return pairs


@pytest.mark.parametrize("seq_length,mask_history", [(128, False), (256, False), (128, True)])
def test_proportional_equals_llamafactory_rule(data, whole_pairs, seq_length, mask_history):
    raw, tok, items = data
    samples, rejects = encode(tok, items, seq_length, truncation="proportional", mask_history=mask_history)
    assert rejects == {} and len(samples) == len(raw)
    truncated = 0
    for i, pairs in enumerate(whole_pairs):
        ref_ids, ref_labels = lf_encode(pairs, seq_length + 1, mask_history=mask_history)
        s = samples[i]
        assert s.input_ids.tolist() == ref_ids, f"input_ids of conversation {i}"
        assert s.labels.tolist() == ref_labels, f"labels of conversation {i}"
        whole = sum(len(a) + len(b) for a, b in pairs)
        assert s.truncated == (whole > seq_length + 1)
        truncated += s.truncated
    assert truncated > 150


def test_proportional_keeps_replies_cut_loses_them(data):
    """Where a prompt alone fills seq_length, cut keeps no reply (rejected); proportional keeps part of it."""
    raw, tok, items = data
    cut, cut_rej = encode(tok, items, 64, truncation="cut")
    prop, prop_rej = encode(tok, items, 64, truncation="proportional")
    assert cut_rej and not prop_rej
    for i in cut_rej:
        runs = supervised_runs(prop[i].input_ids, prop[i].labels)
        assert runs and prop[i].input_ids[runs[-1][0]:runs[-1][1]].size > 0
