"""Qwen3's tokenizer and chat template (assets/tokenizers/qwen3) against transformers 4.57.

Rows: our input_ids equal ``apply_chat_template(messages, tokenize=True[, enable_thinking=...])`` token for token.
Masks: Qwen3's template has no ``{% generation %}`` blocks, so the reference is derived from transformers'
renderings of prefixes: for the assistant message k, the history ``apply_chat_template(messages[:k])`` must be a
prefix of the whole rendering T, the turn starts where ``apply_chat_template(messages[:k],
add_generation_prompt=True)`` stops agreeing with T, and ends after the next ``<|im_end|>``; characters map to
tokens with the fast tokenizer's offsets. A few cases also spell the supervised text out by hand (Qwen3 keeps
the ``<think>`` block of the last turn only; earlier turns lose their reasoning).
"""
import json
import os

import numpy as np
import pytest
import transformers

from mindformers_sft.data.dataset import OnlineSFTDataset
from mindformers_sft.data.formats import Location, to_conversation
from mindformers_sft.data.mindrecord import read_mindrecord
from mindformers_sft.data.templates import get_template
from mindformers_sft.data.tokenize import SFTEncoder
from mindformers_sft.errors import ConfigError
from mindformers_sft.tokenizer import load_tokenizer
from mindformers_sft.tools import preprocess
from sft_data_helpers import ASSETS, supervised_runs

QWEN3 = os.path.join(ASSETS, "tokenizers", "qwen3")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4.", "reasoning_content": "Add two and two."},
     {"role": "user", "content": "And 3+3?"},
     {"role": "assistant", "content": "<think>\nThree plus three.\n</think>\n\n6."},
     {"role": "user", "content": "Thanks"},
     {"role": "assistant", "content": "You're welcome!", "reasoning_content": "Polite reply."}],
    [{"role": "user", "content": "写一首关于秋天的短诗。"},
     {"role": "assistant", "content": "<think>\n用户想要一首诗。\n</think>\n\n秋风起，落叶黄。🍂"},
     {"role": "user", "content": "Now in English, please.\n"},
     {"role": "assistant", "content": "\n\nAutumn wind, yellow leaves.", "reasoning_content": "\nTranslate it.\n"}],
    [{"role": "system", "content": "You are a calculator."},
     {"role": "user", "content": "12*12"},
     {"role": "assistant", "content": "144"},
     {"role": "user", "content": "sqrt of that?"},
     {"role": "assistant", "content": "<think>The square root of 144 is 12.</think>12"}],
]
MODES = [None, True, False]


@pytest.fixture(scope="module")
def tokenizers():
    return load_tokenizer(QWEN3), transformers.AutoTokenizer.from_pretrained(QWEN3)


def _kw(enable_thinking):
    return {} if enable_thinking is None else {"enable_thinking": enable_thinking}


def reference(hf, messages, enable_thinking):
    """(ids, supervised mask) from transformers alone (see the module docstring)."""
    kw = _kw(enable_thinking)
    text = hf.apply_chat_template(messages, tokenize=False, **kw)
    ids = hf.apply_chat_template(messages, tokenize=True, **kw)
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == list(ids)
    mask = np.zeros(len(ids), dtype=bool)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        history = hf.apply_chat_template(messages[:k], tokenize=False, **kw)
        prompt = hf.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True, **kw)
        assert text.startswith(history)
        start = len(os.path.commonprefix([prompt, text]))
        end = text.index("<|im_end|>", start) + len("<|im_end|>")
        for i, (a, b) in enumerate(enc["offset_mapping"]):
            if a < end and b > start:
                mask[i] = True
    return list(ids), mask


def test_tokenizer_matches_transformers(tokenizers):
    ours, hf = tokenizers
    assert ours.vocab_size == len(hf) == 151669
    for t in ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
              "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_pad|>", "<|file_sep|>"):
        assert ours.token_to_id(t) == hf.convert_tokens_to_ids(t), t
    assert (ours.token_to_id("<think>"), ours.token_to_id("</think>")) == (151667, 151668)
    assert ours.eos_token_id == hf.eos_token_id == 151645 and ours.pad_token_id == hf.pad_token_id == 151643
    assert ours.bos_token_id is None and hf.bos_token_id is None
    assert set(ours.special_tokens) == set(hf.all_special_tokens)        # <think> is added, not special
    assert ours.chat_template == hf.chat_template
    texts = ["<think>\nfine\n</think>\n\nok<|im_end|>\n", "x<tool_call>{\"a\": 1}</tool_call>y", "你好 🍂\n\n  end",
             "<|im_start|>assistant\n<think>\n\n</think>\n\n"]
    assert ours.encode_batch(texts) == [hf(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids = hf("<think>\nhm\n</think>\n\nok<|im_end|>", add_special_tokens=False)["input_ids"]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("enable_thinking", MODES)
def test_rows_and_masks_equal_transformers(tokenizers, enable_thinking):
    ours, hf = tokenizers
    enc = SFTEncoder(ours, get_template("auto", ours, enable_thinking=enable_thinking), 4095, verify=100)
    items = [(Location("mem", i), to_conversation({"messages": m}, "messages")) for i, m in enumerate(CONVERSATIONS)]
    samples, rejects = enc.encode(items)
    assert rejects == []
    for i, (s, messages) in enumerate(zip(samples, CONVERSATIONS)):
        ids, mask = reference(hf, messages, enable_thinking)
        assert s.input_ids.tolist() == ids, f"input_ids of conversation {i}"
        np.testing.assert_array_equal(s.labels != -100, mask, err_msg=f"mask of conversation {i}")
        np.testing.assert_array_equal(s.labels[mask], s.input_ids[mask])


def _supervised_texts(hf, sample):
    return [hf.decode(sample.input_ids[a:b]) for a, b in supervised_runs(sample.input_ids, sample.labels)]


def test_reasoning_rendered_as_qwen3_does(tokenizers):
    """Spelled out: the last turn keeps its <think> block (supervised), earlier turns lose their reasoning."""
    ours, hf = tokenizers
    conv = to_conversation({"messages": CONVERSATIONS[1]}, "messages")
    default = SFTEncoder(ours, get_template("auto", ours), 4095).encode_one(conv)
    assert _supervised_texts(hf, default) == [
        "4.<|im_end|>", "6.<|im_end|>", "<think>\nPolite reply.\n</think>\n\nYou're welcome!<|im_end|>"]
    text = hf.decode(default.input_ids)
    assert "Add two and two" not in text and "Three plus three" not in text
    conv = to_conversation({"messages": CONVERSATIONS[0]}, "messages")
    for e, want in ((None, "<think>\n\n</think>\n\nHello! How can I help?<|im_end|>"),
                    (False, "Hello! How can I help?<|im_end|>")):     # the empty block is in the prompt when off
        s = SFTEncoder(ours, get_template("auto", ours, enable_thinking=e), 4095).encode_one(conv)
        assert _supervised_texts(hf, s) == [want]


def test_enable_thinking_through_preprocess_and_online_loader(tokenizers, tmp_path, capsys):
    ours, hf = tokenizers
    path = tmp_path / "chat.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for m in CONVERSATIONS:
            f.write(json.dumps({"messages": m}, ensure_ascii=False) + "\n")
    out = str(tmp_path / "q3.mindrecord")
    assert preprocess.main(["--input_glob", str(path), "--tokenizer", QWEN3, "--seq_length", "255",
                            "--output_file", out, "--enable_thinking", "false"]) == 0
    assert "kept 4, truncated 0, rejected 0" in capsys.readouterr().out
    data, _ = read_mindrecord(out)
    online = OnlineSFTDataset(str(path), QWEN3, seq_length=255, enable_thinking=False)
    np.testing.assert_array_equal(online.input_ids, data["input_ids"])
    for i, messages in enumerate(CONVERSATIONS):
        ids, mask = reference(hf, messages, False)
        assert data["input_ids"][i, :len(ids)].tolist() == ids
        np.testing.assert_array_equal(data["labels"][i, :len(ids)] != -100, mask)
        assert (data["labels"][i, len(ids):] == -100).all()


def test_bad_thinking_options(tokenizers):
    ours, _ = tokenizers
    llama_like = load_tokenizer(os.path.join(ASSETS, "tokenizers", "llama2", "tokenizer.model"))
    with pytest.raises(ConfigError, match="FastChat template 'vicuna_v1.1' has no thinking switch"):
        get_template("vicuna_v1.1", llama_like, enable_thinking=False)
    with pytest.raises(ConfigError, match="does not read it"):
        get_template("chatml", ours, enable_thinking=True)
    # reasoning that a template would drop: the record is rejected with the reason
    enc = SFTEncoder(ours, get_template("chatml", ours), 255)
    conv = to_conversation({"messages": CONVERSATIONS[1]}, "messages")
    samples, rejects = enc.encode([(Location("f.jsonl", 3, 4), conv)])
    assert samples == [] and "does not render reasoning_content" in rejects[0][1]
    with pytest.raises(Exception, match="only assistant messages carry reasoning"):
        to_conversation({"messages": [{"role": "user", "content": "q", "reasoning_content": "x"},
                                      {"role": "assistant", "content": "a"}]}, "messages")
    with pytest.raises(SystemExit):
        preprocess.build_parser().parse_args(["--input_glob", "x", "--output_file", "y", "--enable_thinking", "maybe"])
