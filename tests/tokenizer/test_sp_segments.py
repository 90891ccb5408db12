"""Word-by-word SentencePiece encoding with a cache (tokenizer/sp_segments.py) gives SentencePiece's own ids."""

from __future__ import annotations

import json
import random
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from mindformers_sft.tokenizer import load_tokenizer
from mindformers_sft.tokenizer import sp_segments
from mindformers_sft.tokenizer.sp_segments import segment_encoder

ASSETS = Path(__file__).resolve().parents[2] / "assets"
LLAMA_MODEL = ASSETS / "tokenizers" / "llama2" / "tokenizer.model"
ALPHABET = [" ", "  ", "a", "b", "\n", "\t", "\u00e9", "\u4f60", "\U0001F600", "\u2581", "1", "23", ".", "\u00a0",
            "\r", "x ", " y", "e\u0301", "\u200b", "<", ">", "\ufeff", "\x00", "the", " of", "ASSISTANT:"]


def awkward_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_segments_equal_sentencepiece(monkeypatch):
    tok = load_tokenizer(LLAMA_MODEL)
    seg = tok._segments
    assert seg is not None, "Llama-2's BPE model qualifies for word-by-word encoding"
    data = json.loads((ASSETS / "data" / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    texts = [r["instruction"] + "\n" + r["input"] + " " + r["output"] for r in data[:300]]
    texts += awkward_texts(3000) + ["", " ", "  ", "\u2581", "\u2581 ", "a ", "a  ", " a", "\u2581a b\u2581 c  "]
    ref = tok.sp_model.encode(texts)                       # SentencePiece itself, whole texts
    assert seg.encode(texts) == ref
    assert seg.encode(texts) == ref                        # second pass: all from the cache
    assert seg.hits > seg.misses > 0
    arrays = tok.encode_batch_arrays(texts)
    assert all(a.dtype.name == "int32" for a in arrays) and [a.tolist() for a in arrays] == ref
    # a small cache that is cleared between (and within) batches gives the same ids
    monkeypatch.setattr(sp_segments, "MAX_CACHE", 40)
    out = []
    for i in range(0, len(texts), 13):
        out += seg.encode(texts[i:i + 13])
    assert out == ref
    # the whole vocabulary in one call, as SentencePiece names each id
    assert tok.tokens() == [tok.sp_model.id_to_piece(i) for i in range(tok.sp_model.get_piece_size())]
    # through the tokenizer, with special tokens inside the texts
    mixed = [t + "</s>" + t[:7] + "<s>x" for t in texts[:500]]
    assert tok.encode_batch(mixed) == [tok.encode(t) for t in mixed]


def test_not_used_when_not_exact():
    proto = LLAMA_MODEL.read_bytes()
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    assert segment_encoder(sp, proto) is not None
    m = pb.ModelProto()
    m.ParseFromString(proto)
    m.normalizer_spec.remove_extra_whitespaces = True      # "a  b" == "a b" then: words are not independent
    changed = m.SerializeToString()
    sp2 = spm.SentencePieceProcessor()
    sp2.LoadFromSerializedProto(changed)
    assert sp2.encode("a  b") == sp2.encode("a b")
    assert segment_encoder(sp2, changed) is None


def test_not_used_when_a_piece_spans_words():
    """A piece with a space mark after its start ("a▁b") can join two words: segment-wise encoding is not exact."""
    proto = LLAMA_MODEL.read_bytes()
    m = pb.ModelProto()
    m.ParseFromString(proto)
    m.pieces[1000].piece = "of\u2581the"
    changed = m.SerializeToString()
    sp2 = spm.SentencePieceProcessor()
    sp2.LoadFromSerializedProto(changed)
    assert sp2.id_to_piece(1000) == "of\u2581the"
    assert segment_encoder(sp2, changed) is None
