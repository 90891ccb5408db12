"""Tokenizers: llama.cpp test vectors, HF parity, special ids read from files, errors naming files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from mindformers_sft.errors import ConfigError
from mindformers_sft.tokenizer import (
    HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer, load_tokenizer_from_config)

ASSETS = Path(__file__).resolve().parents[2] / "assets"
LLAMA_MODEL = ASSETS / "tokenizers" / "llama2" / "tokenizer.model"
QWEN_DIR = ASSETS / "tokenizers" / "qwen2"
STORIES_DIR = ASSETS / "models" / "stories260K"
VECTORS = ASSETS / "tokenizers" / "testvectors"

SEP = "\n__ggml_vocab_test__\n"


def read_vectors(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp layout: every text is followed by '\\n__ggml_vocab_test__\\n'; .out has one line of ids per text."""
    raw = (VECTORS / f"ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8")
    texts = raw.split(SEP)
    assert texts[-1] == "", "the .inp file must end with the separator"
    texts = texts[:-1]
    lines = (VECTORS / f"ggml-vocab-{name}.gguf.out").read_bytes().decode("utf-8").split("\n")
    assert lines[-1] == ""
    ids = [[int(x) for x in line.split()] for line in lines[:-1]]
    assert len(texts) == len(ids) > 40
    return list(zip(texts, ids))


MIXED = [
    "Hello world",
    "<|im_start|>user\n你好<|im_end|>\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>assistant\nSure!<|im_end|>",
    "a<|endoftext|>b <|endoftext|> c",
    "<|im_start|><|im_end|><|endoftext|>",
    "<|im_start",  # not a special token
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\n",
    "数字 12345 and émojis 🚀👍🏽 ∑∫",
    "e\u0301 vs \u00e9 (NFC)",
    "I'm sure they'LL say we've DONE it",
    "def f(x):\n    return x**2  # comment",
    "ＦＵＬＬＷＩＤＴＨ ｶﾀｶﾅ \u00a0nbsp\u2003em",
    "",
]


@pytest.fixture(scope="module")
def llama() -> Tokenizer:
    return load_tokenizer(LLAMA_MODEL)


@pytest.fixture(scope="module")
def qwen() -> Tokenizer:
    return load_tokenizer(QWEN_DIR)


@pytest.fixture(scope="module")
def stories() -> Tokenizer:
    return load_tokenizer(STORIES_DIR)


@pytest.fixture(scope="module")
def qwen_bare_dir(tmp_path_factory) -> Path:
    """vocab.json + merges.txt only (no tokenizer_config.json): the HF Qwen2 class defaults apply."""
    d = tmp_path_factory.mktemp("qwen_bare")
    for name in ("vocab.json", "merges.txt"):
        (d / name).symlink_to(QWEN_DIR / name)
    return d


# -- llama.cpp vectors -------------------------------------------------------------------------------------------

def test_llama_spm_vectors(llama):
    vectors = read_vectors("llama-spm")
    assert isinstance(llama, SentencePieceTokenizer)
    assert not any(ids[:1] == [llama.bos_token_id] for _, ids in vectors)  # generated without bos
    for text, ids in vectors:
        assert llama.encode(text) == ids, repr(text)
    texts = [t for t, _ in vectors]
    assert llama.encode_batch(texts) == [ids for _, ids in vectors]
    for text, ids in vectors:  # SentencePiece round-trips every vector
        assert llama.decode(ids) == text, repr(text)


def test_qwen2_vectors(qwen):
    vectors = read_vectors("qwen2")
    assert isinstance(qwen, HFTokenizer)
    for text, ids in vectors:
        assert qwen.encode(text) == ids, repr(text)
    assert qwen.encode_batch([t for t, _ in vectors]) == [ids for _, ids in vectors]
    for text, ids in vectors:  # byte-level BPE is lossless (all vectors are already NFC)
        assert qwen.decode(ids) == text, repr(text)


def test_reference_values(llama, qwen):
    assert llama.encode("Hello world! The quick brown fox jumps over the lazy dog. 你好") == [
        15043, 3186, 29991, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889, 29871,
        30919, 31076]
    assert qwen.encode("Hello world") == [9707, 1879]
    assert qwen.encode("<|im_start|>user\n你好<|im_end|>\n") == [151644, 872, 198, 108386, 151645, 198]


# -- special tokens read from files ----------------------------------------------------------------------------------

def test_llama_special_ids_from_model(llama):
    assert (llama.bos_token_id, llama.eos_token_id, llama.unk_token_id) == (1, 2, 0)
    assert (llama.bos_token, llama.eos_token, llama.unk_token) == ("<s>", "</s>", "<unk>")
    # The model has no pad piece (pad_id -1): pad falls back to unk.
    assert llama.pad_token_id == 0 and llama.pad_token == "<unk>" and llama.pad_token_fallback == "unk"
    assert llama.vocab_size == len(llama) == 32000
    assert llama.special_tokens == {"<s>": 1, "</s>": 2, "<unk>": 0}
    assert llama.token_to_id("<s>") == 1 and llama.token_to_id("▁Hello") == 15043
    assert llama.token_to_id("no-such-piece") is None
    assert llama.id_to_token(15043) == "▁Hello" and llama.id_to_token(32000) is None
    assert llama.chat_template is None and llama.add_bos_token and not llama.add_eos_token
    assert llama.name_or_path == str(LLAMA_MODEL)


def test_llama_add_special_tokens_and_overrides(llama):
    assert llama.encode("Hello", add_special_tokens=True) == [1, 15043]
    assert llama.encode("", add_special_tokens=True) == [1]
    tok = load_tokenizer(LLAMA_MODEL.parent, add_eos_token=True, add_bos_token=False, pad_token="</s>")
    assert tok.encode("Hello", add_special_tokens=True) == [15043, 2]
    assert tok.encode_batch(["Hello", ""], add_special_tokens=True) == [[15043, 2], [2]]
    assert tok.pad_token_id == 2 and tok.pad_token_fallback is None


def test_llama_special_tokens_in_text(llama):
    ids = llama.encode("Hello</s><s>[INST] hi")
    assert ids[1:3] == [2, 1] and ids.count(1) == 1 and ids.count(2) == 1
    assert llama.decode(ids) == "Hello</s><s>[INST] hi"
    assert llama.decode(ids, skip_special_tokens=True) == "Hello[INST] hi"


def test_qwen2_special_ids_from_files(qwen):
    cfg = json.loads((QWEN_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert qwen.eos_token == cfg["eos_token"] == "<|im_end|>"
    assert qwen.eos_token_id == 151645 and qwen.pad_token_id == 151643 and qwen.pad_token == "<|endoftext|>"
    assert qwen.bos_token is None and qwen.bos_token_id is None  # "bos_token": null
    assert qwen.unk_token_id is None and qwen.pad_token_fallback is None
    assert qwen.token_to_id("<|im_start|>") == 151644 and qwen.token_to_id("<|im_end|>") == 151645
    assert qwen.id_to_token(151643) == "<|endoftext|>"
    assert qwen.special_tokens == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    assert qwen.vocab_size == len(qwen) == 151646
    assert qwen.stop_token_ids == [151645, 151643]  # + generation_config.json eos ids
    assert qwen.chat_template == (QWEN_DIR / "chat_template.jinja").read_text(encoding="utf-8")
    assert qwen.model_max_length == 32768
    assert qwen.encode("Hi", add_special_tokens=True) == qwen.encode("Hi")  # no bos
    assert not qwen.add_bos_token and not qwen.add_eos_token


def test_qwen2_bare_vocab_merges_defaults(qwen_bare_dir):
    tok = load_tokenizer(qwen_bare_dir)
    # Qwen2TokenizerFast defaults: eos = pad = unk = <|endoftext|> (151643, MindFormers' Qwen2 eos/pad), no bos.
    assert (tok.eos_token_id, tok.pad_token_id, tok.unk_token_id, tok.bos_token_id) == (151643, 151643, 151643, None)
    assert tok.vocab_size == 151644 and tok.chat_template is None
    assert tok.encode("a<|endoftext|>b")[1] == 151643
    assert len(tok.encode("<|im_start|>")) > 1  # not declared anywhere, so plain text
    # a vocab.json file path with an explicit merges file gives the same tokenizer
    same = load_tokenizer(qwen_bare_dir / "vocab.json", merges_file=qwen_bare_dir / "merges.txt")
    assert same.encode_batch(MIXED) == tok.encode_batch(MIXED)


# -- parity with transformers ----------------------------------------------------------------------------------------

def test_qwen2_matches_transformers(qwen, qwen_bare_dir):
    from transformers import AutoTokenizer, Qwen2TokenizerFast

    hf = AutoTokenizer.from_pretrained(str(QWEN_DIR))
    assert len(hf) == qwen.vocab_size
    for text in MIXED:
        for add in (False, True):
            ids = hf.encode(text, add_special_tokens=add)
            assert qwen.encode(text, add_special_tokens=add) == ids, repr(text)
        for skip in (False, True):
            assert qwen.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (qwen.eos_token_id, qwen.pad_token_id, None)

    hf_bare = Qwen2TokenizerFast(vocab_file=str(QWEN_DIR / "vocab.json"), merges_file=str(QWEN_DIR / "merges.txt"))
    bare = load_tokenizer(qwen_bare_dir)
    assert len(hf_bare) == bare.vocab_size
    assert bare.encode_batch(MIXED) == [hf_bare.encode(t, add_special_tokens=False) for t in MIXED]
    assert (bare.eos_token_id, bare.pad_token_id, bare.unk_token_id) == (
        hf_bare.eos_token_id, hf_bare.pad_token_id, hf_bare.unk_token_id)


def test_stories_tokenizer_json_matches_transformers(stories):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(STORIES_DIR))
    assert isinstance(stories, HFTokenizer)
    assert stories.vocab_size == len(hf) == 512
    assert (stories.bos_token_id, stories.eos_token_id, stories.unk_token_id) == (1, 2, 0)
    assert stories.add_bos_token and not stories.add_eos_token
    texts = ["Once upon a time, there was a little girl named Lily.", "She liked to play outside!",
             "  Tom and  Ben\nwent home.", "Hello</s> world<s>", "unicode ✓ 你好", ""]
    for text in texts:
        for add in (False, True):
            ids = hf.encode(text, add_special_tokens=add)
            assert stories.encode(text, add_special_tokens=add) == ids, repr(text)
        assert stories.decode(ids) == hf.decode(ids)
        assert stories.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert stories.encode("Hi", add_special_tokens=True)[0] == 1
    assert stories.encode_batch(texts, add_special_tokens=True) == [hf.encode(t) for t in texts]
    no_bos = load_tokenizer(STORIES_DIR / "tokenizer.json", add_bos_token=False)
    assert no_bos.encode_batch(texts, add_special_tokens=True) == [hf.encode(t, add_special_tokens=False)
                                                                   for t in texts]


def test_llama_matches_transformers_legacy(llama):
    from transformers import LlamaTokenizer

    hf = LlamaTokenizer(str(LLAMA_MODEL), legacy=True)
    texts = ["Hello</s> world<s>", "<s>[INST] hi [/INST] ok </s><s>[INST]  x", "a<unk>b", " <s> ", "\n</s>\n",
             "plain text, no specials", ""]
    for text in texts:
        for add in (False, True):
            assert llama.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add), repr(text)
    assert llama.vocab_size == len(hf)


# -- batching, round trips, pickling ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "qwen", "stories"])
def test_encode_batch_equals_encode(name, request):
    tok = request.getfixturevalue(name)
    texts = MIXED + ["Hello</s><s>x", "<unk>", "plain"] * 3
    for add in (False, True):
        assert tok.encode_batch(texts, add_special_tokens=add) == [tok.encode(t, add_special_tokens=add)
                                                                  for t in texts]
    assert tok.encode_batch(tuple(texts[:3])) == [tok.encode(t) for t in texts[:3]]
    assert tok.encode_batch([]) == []
    assert tok.decode_batch(tok.encode_batch(texts[:4])) == [tok.decode(tok.encode(t)) for t in texts[:4]]


def test_round_trip_mixed(llama, qwen):
    for text in MIXED:
        if "\u0301" not in text:  # NFC changes e+combining accent, and SentencePiece applies NFKC
            assert qwen.decode(qwen.encode(text)) == text, repr(text)
    for text in ["Hello</s><s>[INST] hi", "plain text 123", "<unk> x"]:
        assert llama.decode(llama.encode(text)) == text


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_pickle_round_trip(name, request):
    tok = request.getfixturevalue(name)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode_batch(MIXED) == tok.encode_batch(MIXED)
    assert (clone.eos_token_id, clone.pad_token_id, clone.vocab_size) == (tok.eos_token_id, tok.pad_token_id,
                                                                          tok.vocab_size)


# -- ids past the vocabulary (a model's embedding may be padded: Qwen2.5 has 152064 rows for 151665 tokens) ---------

OOV_TEXTS = ["Hello world", "<|im_start|>user\n你好<|im_end|>\n", "Hello</s> world<s>", "数字 12345 🚀👍🏽 ∑∫", ""]


def with_out_of_range(ids: list[int], vocab: int) -> list[int]:
    """``ids`` with ids past the vocabulary at the start, in the middle (inside a multi-byte character's byte
    tokens, when there are any) and at the end."""
    mid = len(ids) // 2
    return [vocab, vocab + 417] + ids[:mid] + [vocab + 1] + ids[mid:] + [max(152063, vocab + 2), 2**31]


@pytest.mark.parametrize("kind", ["qwen2_dir", "qwen2_vocab_merges", "stories_tokenizer_json"])
def test_decode_past_vocabulary_matches_transformers(kind, qwen, stories, qwen_bare_dir):
    """`tokenizers`-backed kinds: decode of in- and out-of-range ids equals transformers' fast decode (which skips
    the ids past the vocabulary), single and batched, with and without skip_special_tokens."""
    from transformers import AutoTokenizer, Qwen2TokenizerFast

    if kind == "qwen2_dir":
        ours, hf = qwen, AutoTokenizer.from_pretrained(str(QWEN_DIR))
    elif kind == "qwen2_vocab_merges":
        ours = load_tokenizer(qwen_bare_dir)
        hf = Qwen2TokenizerFast(vocab_file=str(QWEN_DIR / "vocab.json"), merges_file=str(QWEN_DIR / "merges.txt"))
    else:
        ours, hf = stories, AutoTokenizer.from_pretrained(str(STORIES_DIR))
    assert isinstance(ours, HFTokenizer) and ours.vocab_size == len(hf)
    batch = []
    for text in OOV_TEXTS:
        ids = with_out_of_range(hf.encode(text, add_special_tokens=True), len(hf))
        assert max(ids) >= len(hf)
        batch.append(ids)
        for skip in (False, True):
            want = hf.decode(ids, skip_special_tokens=skip)
            assert want == hf.decode([i for i in ids if i < len(hf)], skip_special_tokens=skip)  # HF skips them
            assert ours.decode(ids, skip_special_tokens=skip) == want, (kind, text, skip)
    for skip in (False, True):
        assert ours.decode_batch(batch, skip_special_tokens=skip) == hf.batch_decode(batch,
                                                                                      skip_special_tokens=skip)
    assert ours.decode([len(hf), len(hf) + 1]) == hf.decode([len(hf), len(hf) + 1]) == ""
    # a negative id is no token id: transformers raises (OverflowError), we raise ValueError
    with pytest.raises(OverflowError):
        hf.decode([1, -100])
    with pytest.raises(ValueError, match="-100"):
        ours.decode([1, -100])


def test_sentencepiece_decode_past_vocabulary(llama):
    """tokenizer.model: ids past the vocabulary are skipped, as transformers' LlamaTokenizerFast does (the slow
    LlamaTokenizer raises IndexError from SentencePiece). The two decode in-range ids differently (legacy spaces),
    so the comparison is: each one's decode with the extra ids equals its own decode without them."""
    from transformers import LlamaTokenizerFast

    hf = LlamaTokenizerFast(vocab_file=str(LLAMA_MODEL), legacy=True, from_slow=True)
    assert llama.vocab_size == len(hf) == 32000
    for text in OOV_TEXTS + ["a<unk>b"]:
        for tok, encode in ((llama, llama.encode), (hf, hf.encode)):
            ids = encode(text, add_special_tokens=True)
            oov = with_out_of_range(ids, 32000)
            for skip in (False, True):
                assert tok.decode(oov, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip), \
                    (type(tok).__name__, text, skip)
    byte_pieces = llama.encode("🚀")
    assert len(byte_pieces) > 2  # byte-fallback pieces: an id past the vocabulary between them is skipped too
    assert llama.decode(byte_pieces[:2] + [32000] + byte_pieces[2:]) == llama.decode(byte_pieces) == "🚀"
    assert llama.decode([32000, 99999]) == hf.decode([32000, 99999]) == ""
    with pytest.raises(OverflowError):
        hf.decode([1, -1])
    with pytest.raises(ValueError, match="-1"):
        llama.decode([1, -1])


def test_load_from_mindformers_config(tmp_path):
    tok = load_tokenizer_from_config({"vocab_file": "vocab.json", "merges_file": "merges.txt",
                                      "pad_token": "<|im_end|>", "chat_template": None}, base_dir=QWEN_DIR)
    assert tok.pad_token_id == 151645 and tok.eos_token_id == 151645
    assert tok.chat_template is not None
    tok = load_tokenizer_from_config({"path": str(LLAMA_MODEL), "vocab_file": "", "add_bos_token": False})
    assert tok.encode("Hello", add_special_tokens=True) == [15043]
    with pytest.raises(ConfigError, match="vocab_file"):
        load_tokenizer_from_config({"vocab_file": "", "path": ""})


# -- errors -----------------------------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(ConfigError, match="does not exist") as ei:
        load_tokenizer(missing)
    assert str(missing) in str(ei.value) and "tokenizer.json" in str(ei.value)


def test_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(ConfigError, match="no tokenizer files") as ei:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(ei.value) and "README.md" in str(ei.value)


def test_corrupt_tokenizer_model(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x00\x01this is not a protobuf" * 10)
    with pytest.raises(ConfigError, match="not a valid SentencePiece model") as ei:
        load_tokenizer(tmp_path)
    assert str(bad) in str(ei.value)
    bad.write_bytes(b"")
    with pytest.raises(ConfigError, match="empty") as ei:
        load_tokenizer(bad)
    assert str(bad) in str(ei.value)


def test_malformed_json_files(tmp_path):
    (tmp_path / "tokenizer.model").symlink_to(LLAMA_MODEL)
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text('{\n  "bos_token": "<s>",\n  "eos_token": \n}')
    with pytest.raises(ConfigError, match="malformed JSON at line 4") as ei:
        load_tokenizer(tmp_path)
    assert str(cfg) in str(ei.value)
    cfg.write_text('["not", "an", "object"]')
    with pytest.raises(ConfigError, match="list") as ei:
        load_tokenizer(tmp_path)
    assert str(cfg) in str(ei.value)

    tj = tmp_path / "tj" / "tokenizer.json"
    tj.parent.mkdir()
    tj.write_text('{"version": "1.0", "model": ')
    with pytest.raises(ConfigError, match="malformed JSON") as ei:
        load_tokenizer(tj.parent)
    assert str(tj) in str(ei.value)
    tj.write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    with pytest.raises(ConfigError, match="not a valid Hugging Face tokenizer.json") as ei:
        load_tokenizer(tj)
    assert str(tj) in str(ei.value)


def test_vocab_json_errors(tmp_path):
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": 1, "ab": 2}')
    with pytest.raises(ConfigError, match="merges file not found") as ei:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "merges.txt") in str(ei.value)
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nthree parts here\n")
    with pytest.raises(ConfigError, match="line 3") as ei:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "merges.txt") in str(ei.value)
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "ab", "pad_token": null, "unk_token": null}')
    tok = load_tokenizer(tmp_path)
    assert tok.encode("ab") == [2] and tok.eos_token_id == 2 and tok.pad_token_id == 2
    assert tok.pad_token_fallback == "eos"  # no pad and no unk: pad falls back to eos


def test_added_token_id_gap_is_reported(tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).symlink_to(QWEN_DIR / name)
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"added_tokens_decoder": {
        "151650": {"content": "<|x|>", "special": True}}}))
    with pytest.raises(ConfigError, match="declared with id 151650") as ei:
        load_tokenizer(tmp_path)
    assert str(cfg) in str(ei.value)


def test_unknown_option_and_kind():
    with pytest.raises(ConfigError, match="unknown option"):
        load_tokenizer(LLAMA_MODEL, eos_id=3)
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        load_tokenizer(QWEN_DIR, kind="tokenizer.json")
