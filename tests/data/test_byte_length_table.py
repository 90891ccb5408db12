"""data/tokenize.py byte_length_table: the vectorized pass over the joined pieces gives, piece by piece, the UTF-8
byte length of the piece's text (``▁`` a space, ``<0xNN>`` one byte, unknown/special -1), on the real vocabularies."""
import os

import numpy as np
import pytest

from mindformers_sft.data import tokenize as T
from mindformers_sft.tokenizer import load_tokenizer
from tests.paths import ASSETS


def _per_piece(tokens):
    """The definition, piece by piece (independent of the module's code)."""
    out = []
    for t in tokens:
        if t is None:
            out.append(-1)
        elif len(t) == 6 and t[:3] == "<0x" and t[5] == ">" and all(c in "0123456789abcdefABCDEF" for c in t[3:5]):
            out.append(1)
        else:
            out.append(len(t.replace("\u2581", " ").encode("utf-8")))
    return np.array(out, dtype=np.int64)


@pytest.mark.parametrize("path", ["tokenizers/llama2/tokenizer.model", "models/stories260K/tokenizer.json"])
def test_table_matches_per_piece_definition(path):
    tok = load_tokenizer(os.path.join(ASSETS, path))
    table = T.byte_length_table(tok)
    want = _per_piece([tok.id_to_token(i) for i in range(tok.vocab_size)])
    specials = set((getattr(tok, "special_tokens", {}) or {}).values()) | {getattr(tok, "unk_token_id", None)}
    specials = [i for i in specials if i is not None]
    want[specials] = -1
    assert table.shape == (tok.vocab_size,)
    np.testing.assert_array_equal(table, want)
    assert (table == 1).sum() >= 256          # the byte pieces are there


def test_piece_lengths_edge_cases():
    pieces = ["\u2581the", "<0x0A>", "<0x0G>", None, "\u4f60\u597d", "\u2581\u2581", "", "caf\u00e9", "<0x0A>x"]
    np.testing.assert_array_equal(T._piece_byte_lengths(pieces), _per_piece(pieces))
    with_nul = ["a", "b\x00c", "\u2581x", "<0x41>", None]        # a NUL inside a piece: the per-piece loop
    np.testing.assert_array_equal(T._piece_byte_lengths(with_nul), _per_piece(with_nul))
