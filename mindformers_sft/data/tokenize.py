"""Tokenize rendered conversations and build the loss mask (labels), batched.

For a batch of Conversations, every rendering is cut at the tokenizer's special tokens (``</s>``, ``<|im_end|>``,
...): tokenizers split those out before anything else, so the text pieces between them tokenize independently
and the special tokens map to their ids directly. All pieces of the whole batch go to the tokenizer in one
``encode_batch_arrays`` call (int32 arrays; ``encode_batch`` for tokenizers without it), and samples are
assembled from the arrays with numpy. A supervised span (see templates.py) that starts or ends inside a piece is located by
also encoding the piece's text up to that point and taking the longest common token prefix with the piece's
tokens; a token straddling the boundary (SentencePiece's ``▁Hello`` holding the space of ``ASSISTANT: `` and
the first letter of the reply) belongs to the assistant span. For FastChat's vicuna template with the legacy
Llama-2 tokenizer this gives exactly FastChat's ``train.preprocess`` ids and labels (tests/data).
Shortcut (same result, no second tokenization): for SentencePiece-style and byte-level BPE vocabularies the
boundary is placed from the UTF-8 byte lengths of the piece's tokens (numpy cumsum); it is used only after it
agreed with the prefix method on a few awkward probe conversations, and a chunk whose token bytes do not add
up to its text (normalization, unknown tokens) falls back to the prefix method. The first ``verify`` records
are also checked against tokenizing the whole rendered text at once (DataError if they differ).

Labels are -100 on the system prompt, user turns and template glue, and the token id on every assistant turn
from its first token through its end token (eos ``</s>``, ``<|im_end|>``, ``<|eot_id|>``): the model learns to
stop. ``train_on_prompt`` supervises every token; ``mask_history`` only the last assistant turn.

Samples hold at most ``seq_length + 1`` tokens (the model predicts tokens 1..S from tokens 0..S-1). A longer
sample is truncated as ``truncation`` says (truncation.py: ``proportional``, the default, LLaMA-Factory's rule;
``cut``, FastChat's and MindFormers'; ``turn``; ``drop``), with its labels masked as in the whole sample.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError, DataError
from .formats import Conversation, Location, RecordError
from .templates import Template
from .truncation import DEFAULT_TRUNCATION, TRUNCATIONS, fit

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class _Fallback(Exception):
    """The byte-offset shortcut cannot place a boundary in this record; use prefix tokenization."""


def _piece_byte_lengths(tokens: list) -> np.ndarray:
    """UTF-8 byte lengths of SentencePiece-style pieces: ``▁`` counts 1 byte (a space), ``<0xNN>`` 1, None -1. One
    pass over the pieces joined by NUL (about 3x the per-piece loop on a 32000-piece vocabulary); the loop when a
    piece holds a NUL itself."""
    joined = "\x00".join("" if t is None else t for t in tokens)
    if joined.count("\x00") != len(tokens) - 1:
        byte_piece = _BYTE_PIECE.match
        return np.array([-1 if t is None else 1 if byte_piece(t) else len(t.replace("\u2581", " ").encode("utf-8"))
                         for t in tokens], dtype=np.int64)
    b = np.frombuffer(joined.encode("utf-8"), dtype=np.uint8)
    sep = np.flatnonzero(b == 0)
    starts = np.concatenate(([0], sep + 1))
    lens = np.append(sep, b.size) - starts
    marks = np.flatnonzero((b[:-2] == 0xE2) & (b[1:-1] == 0x96) & (b[2:] == 0x81))     # "▁" in UTF-8
    if marks.size:
        lens -= 2 * np.bincount(np.searchsorted(sep, marks), minlength=len(tokens))
    byte_piece = _BYTE_PIECE.match
    for i in np.flatnonzero((lens == 6) & (b[np.minimum(starts, b.size - 1)] == ord("<"))).tolist():
        if tokens[i] is not None and byte_piece(tokens[i]):                             # <0xNN>: one byte
            lens[i] = 1
    lens[[i for i, t in enumerate(tokens) if t is None]] = -1
    return lens.astype(np.int64)


def byte_length_table(tokenizer) -> Optional[np.ndarray]:
    """UTF-8 byte length of the text of every token id (-1: unknown), for SentencePiece-style pieces (``▁`` is a
    space, ``<0xNN>`` one byte) and byte-level BPE (one character per byte); None for other tokenizers."""
    backend = getattr(tokenizer, "backend", "")
    byte_level = False
    if backend == "tokenizers":
        bt = getattr(tokenizer, "backend_tokenizer", None)
        dec = repr(getattr(bt, "decoder", None))
        if dec.startswith("ByteLevel"):
            byte_level = True
        elif "▁" not in dec:
            return None
    elif backend != "sentencepiece":
        return None
    specials = set((getattr(tokenizer, "special_tokens", {}) or {}).values())
    unk = getattr(tokenizer, "unk_token_id", None)
    n = int(tokenizer.vocab_size)
    tokens = tokenizer.tokens() if hasattr(tokenizer, "tokens") else [tokenizer.id_to_token(i) for i in range(n)]
    if byte_level:
        table = np.array([-1 if t is None else len(t) for t in tokens], dtype=np.int64)
    else:
        table = _piece_byte_lengths(tokens)
    skip = [i for i in specials | {unk} if i is not None and 0 <= i < n]
    table[skip] = -1
    return table

IGNORE_INDEX = -100


@dataclass
class Sample:
    input_ids: np.ndarray          # int32 [L], L <= seq_length + 1
    labels: np.ndarray             # int32 [L], IGNORE_INDEX where not supervised
    loc: Location
    truncated: bool = False


def _lcp(full: list, pre: list) -> int:
    """Length of the longest common prefix of two token lists (C-level slice compares, binary search)."""
    n = min(len(full), len(pre))
    if full[:n] == pre[:n]:
        return n
    lo, hi = 0, n - 1                      # invariant: prefix lo equal, prefix hi+1 differs
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if full[:mid] == pre[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class SFTEncoder:
    """Conversations -> (input_ids, labels) samples for one tokenizer/template/seq_length."""

    def __init__(self, tokenizer, template: Template, seq_length: int, train_on_prompt: bool = False,
                 mask_history: bool = False, truncation: str = DEFAULT_TRUNCATION, verify: int = 8,
                 fast_offsets: bool = True):
        if truncation not in TRUNCATIONS:
            raise ConfigError(f"truncation {truncation!r} is not supported; expected one of {', '.join(TRUNCATIONS)}")
        if int(seq_length) < 1:
            raise ConfigError(f"seq_length must be a positive integer, got {seq_length!r}")
        self.tokenizer = tokenizer
        self.template = template
        self.seq_length = int(seq_length)
        self.max_len = self.seq_length + 1
        self.train_on_prompt = bool(train_on_prompt)
        self.mask_history = bool(mask_history)
        self.truncation = truncation
        self.verify = int(verify)          # records checked against tokenizer.encode(whole text), first batch
        specials = {} if getattr(tokenizer, "split_special_tokens", False) else dict(tokenizer.special_tokens or {})
        self._special_ids = specials
        toks = sorted(specials, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(t) for t in toks)) if toks else None
        self.bos_id = tokenizer.bos_token_id
        self._table = byte_length_table(tokenizer) if fast_offsets else None
        if self._table is not None:
            self._table = self._probe_fast_path()

    # -- planning: which strings to encode ---------------------------------------------------------------------------
    def _plan(self, text: str, spans: List[Tuple[int, int]], strings: list, fast: bool = False):
        """Pieces of `text`: ("s", id, start, end) special tokens and ("t", a, b, k, [(p, k_p)]) text chunks,
        k the index of the chunk's string in `strings`, k_p of its prefix up to boundary p (-1 with `fast`:
        the boundary is placed from the tokens' byte lengths instead)."""
        bounds = sorted({p for s in spans for p in s})
        pieces = []
        pos = 0
        matches = self._special_re.finditer(text) if self._special_re is not None else ()
        bi = 0

        def chunk(a, b):
            nonlocal bi
            k = len(strings)
            strings.append(text[a:b])
            inner = []
            while bi < len(bounds) and bounds[bi] < b:
                p = bounds[bi]
                if p > a:
                    if fast:
                        inner.append((p, -1))
                    else:
                        inner.append((p, len(strings)))
                        strings.append(text[a:p])
                bi += 1
            pieces.append(("t", a, b, k, inner))

        for m in matches:
            s, e = m.span()
            if s > pos:
                chunk(pos, s)
            while bi < len(bounds) and bounds[bi] <= s:
                bi += 1
            pieces.append(("s", self._special_ids[m.group()], s, e))
            pos = e
        if pos < len(text):
            chunk(pos, len(text))
        return pieces

    # -- assembling ------------------------------------------------------------------------------------------------
    def _byte_boundary(self, text: str, a: int, b: int, p: int, full: np.ndarray):
        """(tokens left of char p, straddles) in the chunk text[a:b] from token byte lengths."""
        lens = self._table[full]
        if lens.size == 0 or (lens < 0).any():
            raise _Fallback()
        ends = np.cumsum(lens)
        dummy = int(ends[-1]) - len(text[a:b].encode("utf-8"))
        if dummy not in (0, 1):
            raise _Fallback()
        target = len(text[a:p].encode("utf-8")) + dummy
        n = int(np.searchsorted(ends, target, side="right"))
        clean = (ends[n - 1] == target) if n > 0 else target == 0
        return n, not clean

    def _assemble(self, pieces, spans, enc, prepend_bos: bool, text: str = ""):
        """Token ids (int32 array) and [start, end) token spans of the assistant turns; `enc`: int32 arrays."""
        parts = [np.array([self.bos_id], dtype=np.int32)] if prepend_bos else []
        size = len(parts)
        at = {}                                  # char position -> (token index, straddles)
        for piece in pieces:
            if piece[0] == "s":
                _, tid, s, e = piece
                at.setdefault(s, (size, False))
                parts.append(np.array([tid], dtype=np.int32))
                size += 1
                at[e] = (size, False)
            else:
                _, a, b, k, inner = piece
                base = size
                at.setdefault(a, (base, False))
                full = enc[k]
                for p, kp in inner:
                    if kp < 0:
                        n, straddle = self._byte_boundary(text, a, b, p, full)
                        at[p] = (base + n, straddle)
                    else:
                        pre = enc[kp]
                        n = _lcp(full.tolist(), pre.tolist())
                        at[p] = (base + n, n < len(pre))
                parts.append(full)
                size += len(full)
                at[b] = (size, False)
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        tok_spans = []
        for s, e in spans:
            ts, _ = at.get(s, (None, False))
            te, straddle = at.get(e, (None, False))
            if ts is None or te is None:
                raise RecordError("internal: a span boundary was not located in the tokens")
            tok_spans.append((ts, te + 1 if straddle else te))
        return ids, tok_spans

    def _finish(self, ids: np.ndarray, tok_spans, loc: Location) -> Sample:
        n = len(ids)
        keep, label_spans, truncated = fit(n, list(tok_spans), self.max_len, self.truncation,
                                           last_first=self.mask_history)
        arr = ids
        if self.train_on_prompt:
            labels = arr.copy()
        else:
            labels = np.full(n, IGNORE_INDEX, dtype=np.int32)
            for ts, te in (label_spans[-1:] if self.mask_history else label_spans):
                labels[ts:te] = arr[ts:te]
        if isinstance(keep, int):
            arr, labels = arr[:keep], labels[:keep]
        else:
            arr, labels = arr[keep], labels[keep]
        if len(arr) < 2 or not (labels[1:] != IGNORE_INDEX).any():
            if truncated:
                raise RecordError(f"no supervised token left after truncation ({self.truncation}): "
                                  f"{n} tokens > seq_length + 1 = {self.max_len}")
            raise RecordError("no supervised token (the assistant replies render to nothing)")
        return Sample(arr, labels, loc, truncated)

    # -- public ----------------------------------------------------------------------------------------------------
    def encode(self, items: Sequence[Tuple[Location, Conversation]]):
        """(samples, rejects): Sample per good item, (Location, reason) per rejected one, in input order."""
        rendered, rejects = [], []                    # rejects: (item index, loc, reason)
        for k, (loc, conv) in enumerate(items):
            try:
                rendered.append((k, loc, self.template.render_spans(conv)))
            except RecordError as e:
                rejects.append((k, loc, str(e)))
        results = [None] * len(rendered)
        todo = list(range(len(rendered)))
        for fast in ((True, False) if self._table is not None else (False,)):
            if not todo:
                break
            strings, plans = [], []
            for i in todo:
                r = rendered[i][2]
                plans.append(self._plan(r.text, r.spans, strings, fast=fast))
            enc = self._encode(strings)
            retry = []
            for i, pieces in zip(todo, plans):
                r = rendered[i][2]
                try:
                    results[i] = self._assemble(pieces, r.spans, enc, r.prepend_bos, r.text)
                except _Fallback:
                    retry.append(i)
            todo = retry
        samples = []
        for (k, loc, r), res in zip(rendered, results):
            try:
                ids, tok_spans = res
                if self.verify > 0:
                    self.verify -= 1
                    self._check(r, ids)
                samples.append(self._finish(ids, tok_spans, loc))
            except RecordError as e:
                rejects.append((k, loc, str(e)))
        rejects.sort(key=lambda x: x[0])
        return samples, [(loc, reason) for _, loc, reason in rejects]

    def _encode(self, strings: list) -> list:
        """Token ids of each string (no bos/eos) as int32 arrays, in one batch."""
        if not strings:
            return []
        as_arrays = getattr(self.tokenizer, "encode_batch_arrays", None)
        if as_arrays is not None:
            return as_arrays(strings)
        return [np.asarray(ids, dtype=np.int32) for ids in self.tokenizer.encode_batch(strings)]

    def _probe_fast_path(self):
        """Use byte offsets only if they place the boundaries of a few awkward conversations exactly where
        prefix tokenization does."""
        probes = [
            Conversation([("user", "Hi"), ("assistant", "Hello!"), ("user", " two  spaces\n"),
                          ("assistant", "\n\nnew lines 12345 \u4f60\u597d\u3002")]),
            Conversation([("user", "caf\u00e9?"), ("assistant", " leading space, trailing space ")], system="Sys."),
            Conversation([("user", "x"), ("assistant", "\u00e9\u00e8 \U0001F600 end.\n")]),
        ]
        table = self._table
        for conv in probes:
            try:
                r = self.template.render_spans(conv)
            except RecordError:
                continue
            outs = []
            for fast in (True, False):
                strings = []
                pieces = self._plan(r.text, r.spans, strings, fast=fast)
                enc = self._encode(strings)
                self._table = table
                try:
                    outs.append(self._assemble(pieces, r.spans, enc, r.prepend_bos, r.text))
                except _Fallback:
                    outs.append(None)
            if outs[0] is not None and (outs[0][0].tolist(), outs[0][1]) != (outs[1][0].tolist(), outs[1][1]):
                return None
        return table

    def _check(self, r, ids):
        whole = ([self.bos_id] if r.prepend_bos else []) + self.tokenizer.encode(r.text)
        if whole != ids.tolist():
            raise DataError(f"tokenizer {getattr(self.tokenizer, 'name_or_path', '')!r}: tokenizing the rendered "
                            "conversation piece by piece (split at special tokens) differs from tokenizing it "
                            "whole; this tokenizer's special tokens strip whitespace or are not split first, "
                            "which the masking code does not support")

    def encode_one(self, conv: Conversation, loc: Optional[Location] = None) -> Sample:
        samples, rejects = self.encode([(loc or Location("<memory>", 0), conv)])
        if rejects:
            raise RecordError(rejects[0][1])
        return samples[0]
