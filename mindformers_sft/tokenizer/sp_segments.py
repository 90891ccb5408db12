"""Batch encoding for SentencePiece BPE models word by word, with a cache of the words already encoded.

SentencePiece BPE (Llama-2's ``tokenizer.model``) turns the text into ``▁``-escaped characters (a ``▁`` for each
space, one more in front: the dummy prefix) and merges adjacent symbols by piece score. When no piece holds a
``▁`` after another character (checked on the model's pieces), no merge ever joins the text left of a space run
to the run itself, so the text splits, before each run of spaces, into segments that BPE encodes independently:
``"Hi  there you"`` -> ``"Hi"``, ``"  there"``, ``" you"`` (a literal ``▁`` in the text counts as a space). A
segment ``" " + rest`` normalizes to what ``encode(rest)`` normalizes to (the dummy prefix stands for the
segment's first space); the first segment is encoded as it is. So the ids of a text are the concatenation of its segments' ids, and the ids of a segment
already seen come from a cache (as Hugging Face tokenizers' BPE caches words): most words of a corpus repeat,
so SentencePiece only sees each distinct word once per cache lifetime.

:func:`segment_encoder` returns a :class:`SegmentEncoder` only for models where this is exact: BPE, identity
normalization (no NFKC, no whitespace removal), dummy prefix, whitespace escaped as a prefix, and no piece with
an inner ``▁`` after another character; it also checks a set of awkward probe texts against SentencePiece's own
``encode`` and returns None (callers then use ``encode`` directly) if any differs.
"""
from __future__ import annotations

import re
from itertools import chain, compress, repeat
from operator import is_
from typing import List, Optional, Sequence

import numpy as np

_SPACE = "\u2581"
_SEGMENT = re.compile(r"[ \u2581]*[^ \u2581]+|[ \u2581]+\Z")   # a literal "▁" in the text is a space too
_PROBES = [
    "Hello world", " leading", "trailing ", "two  spaces", "   three lead", "end   ", " ", "  ", "a b c",
    "tab\tand\nnew line\n\n  indented", "caf\u00e9 \u4f60\u597d \U0001F600 \u00a0nbsp", "x", "12345 678",
    "ASSISTANT: Sure.", "USER: Hi ASSISTANT:", "\u2581already escaped \u2581\u2581", "e\u0301 \u200b zero",
    "\u2581 ", "x\u2581 \u00a0", "a \u2581\u2581 b\u2581", "\ufeff\u00a0 . \r\n",
]
MAX_CACHE = 1 << 18                        # segments held (then the pool starts afresh)


def _exact_for(sp, proto: bytes) -> bool:
    """True when the model's settings make segment-wise encoding exact (see the module docstring)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
        m = pb.ModelProto()
        m.ParseFromString(proto)
    except Exception:                       # no protobuf, or a proto this version cannot read: stay exact
        return False
    ns, ts = m.normalizer_spec, m.trainer_spec
    if ts.model_type != pb.TrainerSpec.BPE or ts.treat_whitespace_as_suffix:
        return False
    if ns.name != "identity" or ns.precompiled_charsmap or ns.normalization_rule_tsv:
        return False
    if not ns.add_dummy_prefix or ns.remove_extra_whitespaces or not ns.escape_whitespaces:
        return False
    pieces = sp.id_to_piece(list(range(sp.get_piece_size())))     # one call (faster than the proto's pieces)
    joined = "\x00".join(pieces)                 # one regex pass: a space mark after another character
    if joined.count("\x00") == len(pieces) - 1:
        return re.search(f"[^\x00{_SPACE}]{_SPACE}", joined) is None
    return not any(_SPACE in p.lstrip(_SPACE) for p in pieces)


class SegmentEncoder:
    """``encode(texts)`` -> ids per text, as ``SentencePieceProcessor.encode(texts)`` gives them; ``encode_arrays``
    the same as int32 arrays. The ids of every segment seen live in one flat int32 pool (``_start``/``_len`` per
    segment), so a batch is assembled by numpy gathers, not Python lists."""

    def __init__(self, sp):
        self._sp = sp
        self._space_id = sp.piece_to_id(_SPACE)
        self._reset()
        self.hits = 0
        self.misses = 0

    def _reset(self):
        self._index: dict = {"": 0}                 # segment -> its row in the pool ("": a lone trailing space)
        self._tokens = np.array([self._space_id], dtype=np.int32)
        self._start = np.zeros(1, dtype=np.int64)
        self._len = np.ones(1, dtype=np.int64)

    def _add(self, keys: list):
        encoded = self._sp.encode(keys)
        lens = np.fromiter(map(len, encoded), dtype=np.int64, count=len(keys))
        flat = np.fromiter(chain.from_iterable(encoded), dtype=np.int32, count=int(lens.sum()))
        base = len(self._index)
        self._index.update(zip(keys, range(base, base + len(keys))))
        self._start = np.concatenate([self._start, len(self._tokens) + np.cumsum(lens) - lens])
        self._len = np.concatenate([self._len, lens])
        self._tokens = np.concatenate([self._tokens, flat])

    def _segments(self, text: str) -> list:
        """What to give ``encode`` for each segment of `text`: the first segment, then each later one without its
        first space (``""`` for a lone trailing space: the pool holds ``[id("▁")]`` for it)."""
        if not text:
            return []
        if "  " not in text and _SPACE not in text and text[0] != " ":
            return text.split(" ")                # single spaces only: the words themselves
        segs = _SEGMENT.findall(text)
        return segs[:1] + [s[1:] for s in segs[1:]]

    def encode_arrays(self, texts: Sequence[str]) -> List[np.ndarray]:
        if not texts:
            return []
        segss = [self._segments(t) for t in texts]
        flat = list(chain.from_iterable(segss))
        rows = list(map(self._index.get, flat))
        added = 0
        if None in rows:                            # segments not seen yet: encode them once, then look up again
            todo = set(compress(flat, map(is_, rows, repeat(None))))
            if len(self._index) + len(todo) > MAX_CACHE:    # pool full: start afresh with this batch's segments
                self._reset()
                todo = set(flat)
                todo.discard("")
            added = len(todo)
            if todo:
                self._add(sorted(todo))
            rows = list(map(self._index.__getitem__, flat))
        self.misses += added
        self.hits += len(flat) - added
        rows = np.array(rows, dtype=np.int64)
        counts = np.fromiter(map(len, segss), dtype=np.int64, count=len(segss))
        lens = self._len[rows]
        ends = np.cumsum(lens)
        total = int(ends[-1]) if len(ends) else 0
        # token k of the batch is pool[start of its segment + (k - where its segment begins in the batch)]
        tokens = self._tokens[np.arange(total) + np.repeat(self._start[rows] - (ends - lens), lens)]
        seg_ends = np.cumsum(counts)
        text_ends = np.concatenate([[0], ends])[seg_ends]
        return np.split(tokens, text_ends[:-1])

    def encode(self, texts: Sequence[str]) -> List[List[int]]:
        return [a.tolist() for a in self.encode_arrays(texts)]


def segment_encoder(sp, proto: bytes) -> Optional[SegmentEncoder]:
    """A SegmentEncoder for this model, or None when segment-wise encoding would not be exact."""
    if not _exact_for(sp, proto):
        return None
    enc = SegmentEncoder(sp)
    if enc.encode(_PROBES) != sp.encode(_PROBES):
        return None
    enc._reset()
    return enc
