"""Templates: Qwen2.5's Jinja chat_template renders exactly as transformers does; spans, masking options."""
import numpy as np
import pytest
from transformers import AutoTokenizer

from mindformers_sft.data.formats import Conversation, RecordError
from mindformers_sft.data.templates import compile_jinja, get_template
from mindformers_sft.data.tokenize import SFTEncoder
from mindformers_sft.errors import ConfigError
from mindformers_sft.tokenizer import load_tokenizer
from sft_data_helpers import LLAMA2, QWEN2, supervised_runs

CONVERSATIONS = [
    Conversation([("user", "Hi"), ("assistant", "Hello! How can I help?")]),
    Conversation([("user", "What is 2+2?"), ("assistant", "4."), ("user", "And 3+3?"), ("assistant", "6.")],
                 system="You are a terse calculator."),
    Conversation([("user", "Translate: 你好"), ("assistant", "Hello (你好 means hello)."),
                  ("user", "Thanks!"), ("assistant", "You're welcome."), ("user", "Bye"), ("assistant", "Bye!")],
                 system="You are a helpful translator.\nAnswer briefly."),
    Conversation([("user", "code?"), ("assistant", "```python\nprint('hi')\n```")]),
    Conversation([("user", "x"), ("assistant", "y")], system=""),
]


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(QWEN2), AutoTokenizer.from_pretrained(QWEN2)


def test_qwen_template_renders_and_tokenizes_like_transformers(qwen):
    tok, hf = qwen
    tpl = get_template("auto", tok)
    enc = SFTEncoder(tok, tpl, 1023, verify=100)
    for conv in CONVERSATIONS:
        text = tpl.render_spans(conv).text
        assert text == hf.apply_chat_template(conv.messages(), tokenize=False)
        assert tpl.render(conv, 1, add_generation_prompt=True) == hf.apply_chat_template(
            conv.messages()[:(1 if conv.system is None else 2)], tokenize=False, add_generation_prompt=True)
        s = enc.encode_one(conv)
        assert s.input_ids.tolist() == hf.apply_chat_template(conv.messages(), tokenize=True)


def test_qwen_supervised_spans_are_the_replies_and_im_end(qwen):
    tok, _ = qwen
    enc = SFTEncoder(tok, get_template("auto", tok), 1023)
    for conv in CONVERSATIONS:
        s = enc.encode_one(conv)
        runs = supervised_runs(s.input_ids, s.labels)
        replies = [c for r, c in conv.turns if r == "assistant"]
        # The Qwen2.5 template writes nothing between the content and <|im_end|>; the "\n" after it is glue.
        assert [tok.decode(s.input_ids[a:b]) for a, b in runs] == [c + "<|im_end|>" for c in replies]
        assert all(s.input_ids[b - 1] == tok.token_to_id("<|im_end|>") for a, b in runs)
        assert s.labels[0] == -100


def test_default_system_prompt_is_masked(qwen):
    tok, _ = qwen
    s = SFTEncoder(tok, get_template("auto", tok), 255).encode_one(CONVERSATIONS[0])
    text = tok.decode(s.input_ids)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    first = supervised_runs(s.input_ids, s.labels)[0][0]
    assert tok.decode(s.input_ids[:first]).endswith("<|im_start|>assistant\n")


def test_mask_history_and_train_on_prompt(qwen):
    tok, _ = qwen
    conv = CONVERSATIONS[2]
    tpl = get_template("auto", tok)
    full = SFTEncoder(tok, tpl, 1023).encode_one(conv)
    last = SFTEncoder(tok, tpl, 1023, mask_history=True).encode_one(conv)
    allsup = SFTEncoder(tok, tpl, 1023, train_on_prompt=True).encode_one(conv)
    np.testing.assert_array_equal(full.input_ids, last.input_ids)
    runs = supervised_runs(full.input_ids, full.labels)
    assert len(runs) == 3
    assert supervised_runs(last.input_ids, last.labels) == [runs[-1]]
    np.testing.assert_array_equal(allsup.labels, allsup.input_ids)


def test_truncation_turn_and_drop(qwen):
    tok, _ = qwen
    conv = CONVERSATIONS[2]
    tpl = get_template("auto", tok)
    full = SFTEncoder(tok, tpl, 1023).encode_one(conv)
    runs = supervised_runs(full.input_ids, full.labels)
    # room for two exchanges but not three: cut after the 2nd reply's <|im_end|>
    s = SFTEncoder(tok, tpl, runs[2][1] - 2, truncation="turn").encode_one(conv)
    assert s.truncated and len(s.input_ids) == runs[1][1]
    np.testing.assert_array_equal(s.input_ids, full.input_ids[:runs[1][1]])
    assert len(supervised_runs(s.input_ids, s.labels)) == 2
    with pytest.raises(RecordError, match="too long"):
        SFTEncoder(tok, tpl, runs[2][1] - 2, truncation="drop").encode_one(conv)
    with pytest.raises(RecordError, match="first exchange"):
        SFTEncoder(tok, tpl, runs[0][1] - 2, truncation="turn").encode_one(conv)
    s = SFTEncoder(tok, tpl, len(full.input_ids) - 1).encode_one(conv)     # exactly fits: S + 1 tokens
    assert not s.truncated and len(s.input_ids) == len(full.input_ids)


def test_fastchat_llama2_and_chatml_end_tokens():
    tok = load_tokenizer(LLAMA2)
    conv = CONVERSATIONS[1]
    s = SFTEncoder(tok, get_template("llama-2", tok), 511).encode_one(conv)
    assert tok.decode(s.input_ids).startswith("<s>[INST] <<SYS>>\nYou are a terse calculator.\n<</SYS>>\n\n")
    runs = supervised_runs(s.input_ids, s.labels)
    assert [tok.decode(s.input_ids[a:b]) for a, b in runs] == ["4. </s>", "6. </s>"]
    qtok = load_tokenizer(QWEN2)
    for name in ("chatml", "qwen-7b-chat"):
        s = SFTEncoder(qtok, get_template(name, qtok), 511).encode_one(conv)
        runs = supervised_runs(s.input_ids, s.labels)
        assert [qtok.decode(s.input_ids[a:b]) for a, b in runs] == ["4.<|im_end|>", "6.<|im_end|>"], name


def test_unknown_template_names_close_ones():
    tok = load_tokenizer(LLAMA2)
    with pytest.raises(ConfigError, match="vicuna_v1.1"):
        get_template("vicuna", tok)
    with pytest.raises(ConfigError, match="llama-2"):
        get_template("llama2", tok)
    with pytest.raises(ConfigError, match="no chat_template"):
        get_template("auto", tok)                 # the Llama-2 tokenizer.model has none


def test_jinja_environment_matches_transformers():
    src = ("{% for m in messages %}{{ m | tojson }}{% if loop.last %}{% break %}{% endif %}{% endfor %}"
           "{{ raise_exception('boom') if messages | length > 5 else '' }}")
    out = compile_jinja(src).render(messages=[{"role": "user", "content": "<é>"}, {"role": "x", "content": ""}])
    assert out == '{"role": "user", "content": "<é>"}{"role": "x", "content": ""}'
    import jinja2
    with pytest.raises(jinja2.exceptions.TemplateError, match="boom"):
        compile_jinja(src).render(messages=[{}] * 6)


def test_generation_blocks_give_the_spans(qwen):
    tok, _ = qwen
    src = ("{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n{% generation %}"
           "{{ m.content }}<|im_end|>{% endgeneration %}\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}"
           "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    from mindformers_sft.data.templates import JinjaTemplate
    tpl = JinjaTemplate(src, tok, name="gen")
    r = tpl.render_spans(CONVERSATIONS[1])
    assert [r.text[a:b] for a, b in r.spans] == ["4.<|im_end|>", "6.<|im_end|>"]
