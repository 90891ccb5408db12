"""Streamed text (serving/text.py) against the Hugging Face tokenizers' own decode of the whole sequence: pieces
never split a multi-byte character (Qwen2's byte-level BPE cuts Chinese characters and emoji into several tokens),
join to the full text, and stop strings end the text before their first occurrence, even across tokens. Also the
served template and model name taken from a training run's records."""
import json

import pytest
import transformers

from mindformers_sft.serving import model_name, recorded_template
from mindformers_sft.serving.text import TextStream
from mindformers_sft.tokenizer import load_tokenizer
from tests.paths import QWEN2_TOKENIZER, STORIES

TEXT = "你好，世界！🙂🦜 龘𠀋 🧑‍🚀 Streaming tokens: naïve café, 数据 and more. End."


@pytest.fixture(scope="module", params=["qwen2", "stories"])
def toks(request):
    path = QWEN2_TOKENIZER if request.param == "qwen2" else STORIES
    return load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)


def _stream(tok, ids, stops=()):
    ts = TextStream(tok, stops)
    pieces = [ts.push(t) for t in ids]
    pieces.append(ts.finish())
    return ts, [p for p in pieces if p]


def test_pieces_join_to_the_reference_decode_and_never_split_characters(toks):
    tok, hf = toks
    ids = hf(TEXT, add_special_tokens=False)["input_ids"]
    full = hf.decode(ids, skip_special_tokens=True)
    ts, pieces = _stream(tok, ids)
    assert "".join(pieces) == full == ts.text
    assert not any("\ufffd" in p for p in pieces)
    if tok.vocab_size > 1000:         # byte-level BPE: some characters really take several tokens
        assert any("\ufffd" in hf.decode(ids[:i]) for i in range(1, len(ids)))
        assert len(pieces) < len(ids)


@pytest.mark.parametrize("stops", [["café"], ["more.", "世界"], ["zzz"], ["e"], ["End.", "tokens: na"]])
def test_stop_strings_end_the_text_before_the_first_occurrence(toks, stops):
    tok, hf = toks
    ids = hf(TEXT, add_special_tokens=False)["input_ids"]
    full = hf.decode(ids, skip_special_tokens=True)
    hits = [full.find(s) for s in stops if s in full]
    expected = full[:min(hits)] if hits else full
    ts, pieces = _stream(tok, ids, stops)
    assert "".join(pieces) == expected and ts.stopped == bool(hits)


def test_template_and_name_come_from_the_training_run(tmp_path):
    run = tmp_path / "my_sft_run"
    (run / "checkpoint" / "rank_0").mkdir(parents=True)
    (run / "config_resolved.json").write_text(json.dumps(
        {"train_dataset": {"data_loader": {"type": "SFTDataLoader", "template": "vicuna_v1.1"}}}))
    ckpt = run / "checkpoint" / "rank_0" / "x.ckpt"
    ckpt.write_bytes(b"")
    assert recorded_template(str(run / "checkpoint")) == "vicuna_v1.1" == recorded_template(str(ckpt))
    assert model_name(str(run / "checkpoint")) == "my_sft_run"
    assert model_name(STORIES) == "stories260K"
    assert recorded_template(STORIES) is None


def test_a_tokenizer_chat_template_is_the_fallback_and_renders_as_transformers():
    from mindformers_sft.config import load_config
    from mindformers_sft.generation.chat import prompt_ids
    from mindformers_sft.serving import serving_template
    tok = load_tokenizer(QWEN2_TOKENIZER)
    hf = transformers.AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)
    cfg = load_config(None, [f"load_checkpoint={QWEN2_TOKENIZER}"])
    template = serving_template(cfg, None, tok)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "2+2?"}]
    turns = [(m["role"], m["content"]) for m in messages[1:]]
    assert prompt_ids(template, tok, turns, "Be brief.") == hf.apply_chat_template(messages, add_generation_prompt=True)
    assert serving_template(cfg, "none", tok) is None
