"""SentencePiece tokenizers (Llama-2 ``tokenizer.model``) with the legacy Llama behaviour of HF's LlamaTokenizer.

Text is first split on the added/special tokens (``<s>``, ``</s>``, ``<unk>``, anything in ``added_tokens_decoder``
or ``added_tokens.json``), each special token becomes its id, and every remaining chunk is encoded with
``SentencePieceProcessor.encode`` as-is (legacy=True: each chunk gets SentencePiece's dummy-prefix ``▁``).
This is exactly HF ``LlamaTokenizer(legacy=True)``. ``add_special_tokens=True`` prepends bos / appends eos per
``add_bos_token`` (default: true when the model has a bos) / ``add_eos_token`` (default false).
Batches go to SentencePiece in one ``encode(list)`` call (multi-threaded in C++), word by word with a cache of
the words already seen when that is exact for the model (sp_segments.py: Llama-2's BPE model).

Only the legacy behaviour is implemented (as MindFormers' LlamaTokenizer); a ``"legacy": false`` in
tokenizer_config.json is not honoured (it only changes the ids of text right after a special token).

``decode`` writes special tokens as their text and SentencePiece-decodes the runs between them, so
``decode(encode(text)) == text`` for legacy encodings; unlike HF's slow LlamaTokenizer it inserts no space after a
special token ("<s>Hello", not "<s> Hello"). Ids past the vocabulary are skipped (as HF's LlamaTokenizerFast does;
the slow LlamaTokenizer raises).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from mindformers_sft.errors import ConfigError
from mindformers_sft.tokenizer.base import (
    AddedTokenSpec, Tokenizer, TokenizerFiles, bool_setting, clean_up_tokenization, decode_ids,
    special_split_pattern)
from mindformers_sft.tokenizer.sp_segments import segment_encoder


def load_sentencepiece(model_file: Path) -> tuple[spm.SentencePieceProcessor, bytes]:
    try:
        proto = model_file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{model_file}: cannot read file ({exc.strerror or exc}); "
                          f"expected a SentencePiece model (tokenizer.model)") from exc
    if not proto:
        raise ConfigError(f"{model_file}: file is empty; expected a SentencePiece model (tokenizer.model)")
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except Exception as exc:  # sentencepiece raises RuntimeError/OSError with protobuf parse messages
        raise ConfigError(f"{model_file}: not a valid SentencePiece model ({str(exc).strip()}); expected a "
                          f"serialized SentencePiece ModelProto such as Llama-2's tokenizer.model") from exc
    if sp.get_piece_size() <= 0:
        raise ConfigError(f"{model_file}: SentencePiece model has no pieces")
    return sp, proto


class SentencePieceTokenizer(Tokenizer):
    backend = "sentencepiece"

    def __init__(self, model_file: Path | str, files: TokenizerFiles | None = None, name_or_path: str | None = None):
        model_file = Path(model_file)
        files = files if files is not None else TokenizerFiles(model_file.parent)
        self.name_or_path = str(name_or_path if name_or_path is not None else model_file)
        self.model_file = str(model_file)
        self._sp, self._proto = load_sentencepiece(model_file)
        self._segments = segment_encoder(self._sp, self._proto)
        self._setup(files)

    # -- construction ----------------------------------------------------------------------------------------------
    def _setup(self, files: TokenizerFiles) -> None:
        sp = self._sp
        self._piece_size = sp.get_piece_size()
        self._unk_piece_id = sp.unk_id()
        self._unk_piece = sp.id_to_piece(self._unk_piece_id) if 0 <= self._unk_piece_id < self._piece_size else None
        defaults = {}
        for name in ("bos", "eos", "unk", "pad"):
            idx = getattr(sp, f"{name}_id")()
            defaults[name] = sp.id_to_piece(idx) if 0 <= idx < self._piece_size else None

        # Added tokens: ids may re-use a piece id (HF overrides the mapping) or extend the vocabulary.
        self._added: dict[str, int] = {}
        self._added_rev: dict[int, str] = {}
        self._specs: dict[str, AddedTokenSpec] = {}
        for spec in files.added_tokens:
            self._register(spec)
        planned = self.planned_special_tokens(files, defaults)
        for content in planned:  # special tokens that are pieces become split-out added tokens too (HF)
            if content in self._specs:
                if not self._specs[content].special:
                    self._specs[content] = replace(self._specs[content], special=True)
                continue
            idx = self.token_to_id(content)
            if idx is None:  # HF appends a special token the vocabulary lacks
                idx = self.vocab_size
            self._register(AddedTokenSpec(content=content, id=idx, special=True))

        self._resolve_specials(files, defaults)
        add_bos = bool_setting(files, "add_bos_token", None)
        add_eos = bool_setting(files, "add_eos_token", None)
        for name, flag in (("bos", add_bos), ("eos", add_eos)):
            if flag and getattr(self, f"{name}_token_id") is None:
                raise ConfigError(f"{files.directory}: add_{name}_token is true but the tokenizer has no {name} token")
        self.add_bos_token = (self.bos_token_id is not None) if add_bos is None else add_bos
        self.add_eos_token = bool(add_eos)
        self.split_special_tokens = bool(bool_setting(files, "split_special_tokens", False))
        self.clean_up_tokenization_spaces = bool(bool_setting(files, "clean_up_tokenization_spaces", False))

        self._special: dict[str, int] = {c: i for c, i in self._added.items() if self._specs[c].special}
        for name in ("bos", "eos", "unk", "pad"):
            c, i = getattr(self, f"{name}_token"), getattr(self, f"{name}_token_id")
            if c is not None and i is not None:
                self._special.setdefault(c, i)
        split = [c for c, s in self._specs.items() if not (self.split_special_tokens and s.special)]
        self._split_re = special_split_pattern(split)
        self._split_ids = {c: self._added[c] for c in split}
        self._marked_ids = frozenset(self._added_rev) | frozenset(self._special.values())
        self._special_ids = frozenset(self._special.values())

    def _register(self, spec: AddedTokenSpec) -> None:
        if spec.id is None or spec.id < 0:
            raise ConfigError(f"{self.name_or_path}: added token {spec.content!r} has no valid id")
        if spec.id in self._added_rev and self._added_rev[spec.id] != spec.content:
            raise ConfigError(f"{self.name_or_path}: added tokens {self._added_rev[spec.id]!r} and "
                              f"{spec.content!r} share id {spec.id}")
        self._added[spec.content] = spec.id
        self._added_rev[spec.id] = spec.content
        self._specs[spec.content] = spec

    # -- pickling (for data-loader worker processes) ---------------------------------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_sp"], state["_segments"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(self._proto)
        self._segments = segment_encoder(self._sp, self._proto)

    # -- vocabulary ------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return max(self._piece_size, max(self._added_rev, default=-1) + 1)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def sp_model(self) -> spm.SentencePieceProcessor:
        return self._sp

    def token_to_id(self, token: str) -> int | None:
        idx = self._added.get(token)
        if idx is not None:
            return idx
        idx = self._sp.piece_to_id(token)
        if idx == self._unk_piece_id and token != self._unk_piece:
            return None
        return idx

    def id_to_token(self, idx: int) -> str | None:
        idx = int(idx)
        tok = self._added_rev.get(idx)
        if tok is not None:
            return tok
        if 0 <= idx < self._piece_size:
            return self._sp.id_to_piece(idx)
        return None

    def tokens(self) -> list:
        """``[id_to_token(i) for i in range(vocab_size)]``, read in one SentencePiece call."""
        out = self._sp.id_to_piece(list(range(self._piece_size))) + [None] * (self.vocab_size - self._piece_size)
        for idx, tok in self._added_rev.items():
            out[idx] = tok
        return out

    # -- encoding --------------------------------------------------------------------------------------------------
    def _plan(self, text: str) -> list:
        """HF slow-tokenizer splitting: chunks of text (str) and added-token ids (int), honouring l/rstrip."""
        parts = self._split_re.split(text)  # odd positions are the matched tokens
        n = len(parts)
        keep = [i % 2 == 1 for i in range(n)]
        for i in range(1, n, 2):
            spec = self._specs[parts[i]]
            left, right = parts[i - 1], parts[i + 1]
            if spec.rstrip and right:
                parts[i + 1] = right = right.lstrip()
            if spec.lstrip and left:
                parts[i - 1] = left = left.rstrip()
            if spec.single_word and left and left[-1] != " ":
                parts[i - 1] += parts[i]
                parts[i], keep[i] = "", False
            elif spec.single_word and right and right[0] != " ":
                parts[i] += right
                parts[i + 1], keep[i] = "", False
        return [self._split_ids[p] if keep[i] else p for i, p in enumerate(parts) if p]

    def _affixes(self, add_special_tokens: bool) -> tuple[list[int], list[int]]:
        if not add_special_tokens:
            return [], []
        pre = [self.bos_token_id] if self.add_bos_token and self.bos_token_id is not None else []
        post = [self.eos_token_id] if self.add_eos_token and self.eos_token_id is not None else []
        return pre, post

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        pre, post = self._affixes(add_special_tokens)
        if self._split_re is None or self._split_re.search(text) is None:
            ids = self._sp.encode(text)
        else:
            ids = []
            for p in self._plan(text):
                if isinstance(p, int):
                    ids.append(p)
                else:
                    ids.extend(self._sp.encode(p))
        return pre + ids + post if (pre or post) else ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        texts = texts if isinstance(texts, list) else list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch expects str items, got {type(t).__name__}")
        if not texts:
            return []
        pre, post = self._affixes(add_special_tokens)
        pattern = self._split_re
        plans = None
        flat = texts
        if pattern is not None:
            search = pattern.search
            if any(search(t) is not None for t in texts):
                plans, flat = [], []
                for t in texts:
                    if search(t) is None:
                        plans.append(None)
                        flat.append(t)
                    else:
                        plan = self._plan(t)
                        plans.append(plan)
                        flat.extend(p for p in plan if isinstance(p, str))
        if not flat:
            encoded = []
        elif self._segments is not None:
            encoded = self._segments.encode(flat)
        else:
            encoded = self._sp.encode(flat)
        if plans is None:
            if pre or post:
                return [pre + ids + post for ids in encoded]
            return encoded
        out, k = [], 0
        for plan in plans:
            if plan is None:
                ids = encoded[k]
                k += 1
            else:
                ids = []
                for p in plan:
                    if isinstance(p, int):
                        ids.append(p)
                    else:
                        ids.extend(encoded[k])
                        k += 1
            out.append(pre + ids + post if (pre or post) else ids)
        return out

    def encode_batch_arrays(self, texts: Sequence[str]) -> list:
        """``encode_batch(texts)`` (no bos/eos) as int32 numpy arrays, without Python lists on the word-cache path
        (texts holding added tokens go through ``encode_batch``)."""
        texts = texts if isinstance(texts, list) else list(texts)
        pattern = self._split_re
        if self._segments is None or not all(isinstance(t, str) for t in texts) or (
                pattern is not None and any(pattern.search(t) is not None for t in texts)):
            return [np.asarray(ids, dtype=np.int32) for ids in self.encode_batch(texts)]
        return self._segments.encode_arrays(texts)

    # -- decoding --------------------------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = decode_ids(ids, self.name_or_path)
        # ids with no vocabulary entry (past the vocabulary) are skipped, as by HF's LlamaTokenizerFast
        # (the slow LlamaTokenizer raises IndexError from SentencePiece)
        if ids and max(ids) >= self._piece_size:
            ids = [i for i in ids if i < self._piece_size or i in self._added_rev]
        if self._marked_ids.isdisjoint(ids):
            text = self._sp.decode(ids)
        else:
            chunks, run = [], []
            for i in ids:
                if i in self._marked_ids:
                    if run:
                        chunks.append(self._sp.decode(run))
                        run = []
                    if not (skip_special_tokens and i in self._special_ids):
                        chunks.append(self._added_rev.get(i) or self._sp.id_to_piece(i))
                else:
                    run.append(i)
            if run:
                chunks.append(self._sp.decode(run))
            text = "".join(chunks)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text
