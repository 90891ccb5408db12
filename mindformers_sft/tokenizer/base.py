"""The tokenizer interface shared by every backend, and the reading of the files that sit beside a tokenizer.

A tokenizer directory in the Hugging Face / MindFormers layout may hold, next to the vocabulary itself
(``tokenizer.model``, ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``):

* ``tokenizer_config.json``  -- ``bos_token``/``eos_token``/``pad_token``/``unk_token`` (a string, a
  ``{"content": ...}`` object or ``null``), ``add_bos_token``/``add_eos_token``, ``added_tokens_decoder``,
  ``additional_special_tokens``, ``chat_template``, ``split_special_tokens``, ``clean_up_tokenization_spaces``;
* ``special_tokens_map.json`` -- the same special-token keys;
* ``added_tokens.json``       -- ``{content: id}`` of tokens added after the base vocabulary;
* ``chat_template.jinja``     -- the chat template (takes priority over ``tokenizer_config.json``, as in HF);
* ``generation_config.json`` / ``config.json`` -- ``bos_token_id``/``eos_token_id``/``pad_token_id`` of the model.

Resolution order of each special token (bos, eos, unk, pad):

1. an explicit override passed to :func:`mindformers_sft.tokenizer.load_tokenizer`;
2. ``tokenizer_config.json`` if it has the key (``null`` means "this tokenizer has none", e.g. Qwen2 bos);
3. ``special_tokens_map.json`` if it has the key;
4. the backend's own default: the SentencePiece model's ``bos_id/eos_id/unk_id/pad_id``, or the
   Hugging Face class defaults of Qwen2 (eos/pad/unk ``<|endoftext|>``, no bos) / GPT-2;
5. ``config.json`` then ``generation_config.json`` ``<name>_token_id`` (bos/eos/pad only).

If no pad token results, ``pad_token_id`` falls back to the **unk** id (MindFormers' Llama convention,
``pad_token_id: 0``), or to the **eos** id when there is no unk token either; :attr:`Tokenizer.pad_token_fallback`
records which ("unk"/"eos"/None).

Over 400 lines on purpose: the interface and the side-file resolution above are one contract (every backend's
special tokens come from it), read best in one place.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from mindformers_sft.errors import ConfigError

SPECIAL_NAMES = ("bos", "eos", "unk", "pad")

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS = "added_tokens.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"

_UNSET = object()


def read_json(path: Path, *, what: str = "a JSON object") -> Any:
    """Read a JSON file, turning every failure into a ConfigError naming the file and the expectation."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read file ({exc.strerror or exc}); expected {what}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); expected {what}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; expected {what}"
        ) from exc
    return data


def read_json_object(path: Path, *, what: str = "a JSON object") -> dict:
    data = read_json(path, what=what)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level is a JSON {type(data).__name__}, expected {what}")
    return data


def token_content(value: Any, *, where: str) -> str | None:
    """A special-token entry as written by HF: a string, ``{"content": str, ...}`` or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ConfigError(f"{where}: expected a token string, an object with a 'content' string, or null; got {value!r}")


@dataclass(frozen=True)
class AddedTokenSpec:
    """One token added on top of the base vocabulary (``added_tokens_decoder`` / ``added_tokens.json``)."""

    content: str
    id: int | None
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False
    single_word: bool = False


class TokenizerFiles:
    """The side files of one tokenizer directory, read once; missing files read as empty."""

    def __init__(self, directory: Path | None, overrides: dict | None = None):
        self.directory = directory
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        self.tokenizer_config: dict = self._optional(TOKENIZER_CONFIG)
        self.special_tokens_map: dict = self._optional(SPECIAL_TOKENS_MAP)
        self.generation_config: dict = self._optional(GENERATION_CONFIG)
        self.model_config: dict = self._optional(MODEL_CONFIG)
        self.added_tokens: list[AddedTokenSpec] = self._added_tokens()
        self.chat_template: str | None = self._chat_template()

    # -- files ---------------------------------------------------------------------------------------------------
    def path(self, name: str) -> Path | None:
        return None if self.directory is None else self.directory / name

    def _optional(self, name: str) -> dict:
        p = self.path(name)
        if p is None or not p.is_file():
            return {}
        return read_json_object(p, what=f"a JSON object ({name})")

    def _added_tokens(self) -> list[AddedTokenSpec]:
        specs: dict[str, AddedTokenSpec] = {}
        where = f"{self.path(TOKENIZER_CONFIG)}: added_tokens_decoder"
        decoder = self.tokenizer_config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise ConfigError(f"{where}: expected an object {{id: {{content, special, ...}}}}, got {decoder!r}")
        for key, entry in decoder.items():
            try:
                idx = int(key)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: key {key!r} is not an integer token id") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
                raise ConfigError(f"{where}[{key}]: expected an object with a 'content' string, got {entry!r}")
            specs[entry["content"]] = AddedTokenSpec(
                content=entry["content"], id=idx, special=bool(entry.get("special", False)),
                lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                normalized=bool(entry.get("normalized", not entry.get("special", False))),
                single_word=bool(entry.get("single_word", False)))
        p = self.path(ADDED_TOKENS)
        if p is not None and p.is_file():
            data = read_json_object(p, what="a JSON object {token: id}")
            specials = set(self.special_token_strings())
            for content, idx in data.items():
                if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
                    raise ConfigError(f"{p}: id of {content!r} must be a non-negative integer, got {idx!r}")
                if content in specs:
                    if specs[content].id != idx:
                        raise ConfigError(
                            f"{p}: {content!r} has id {idx} but {self.path(TOKENIZER_CONFIG)} "
                            f"added_tokens_decoder gives {specs[content].id}")
                    continue
                special = content in specials
                specs[content] = AddedTokenSpec(content=content, id=idx, special=special, normalized=not special)
        by_id: dict[int, str] = {}
        for s in specs.values():
            if s.id in by_id:
                raise ConfigError(f"{self.directory}: tokens {by_id[s.id]!r} and {s.content!r} share id {s.id}")
            by_id[s.id] = s.content
        return sorted(specs.values(), key=lambda s: s.id)

    def _chat_template(self) -> str | None:
        if "chat_template" in self.overrides:
            return self.overrides["chat_template"]
        p = self.path(CHAT_TEMPLATE_FILE)
        if p is not None and p.is_file():
            try:
                return p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{p}: cannot read the chat template as UTF-8 text ({exc})") from exc
        tpl = self.tokenizer_config.get("chat_template")
        if tpl is None or isinstance(tpl, str):
            return tpl
        if isinstance(tpl, list):  # HF's named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            if isinstance(named.get("default"), str):
                return named["default"]
        raise ConfigError(f"{self.path(TOKENIZER_CONFIG)}: chat_template must be a string or a list of "
                          f"{{name, template}} with a 'default' entry, got {type(tpl).__name__}")

    # -- settings --------------------------------------------------------------------------------------------------
    def setting(self, key: str, default: Any = None) -> Any:
        """A plain tokenizer setting: override, then tokenizer_config.json, then default."""
        if key in self.overrides:
            return self.overrides[key]
        return self.tokenizer_config.get(key, default)

    def special_token(self, name: str) -> Any:
        """``<name>_token`` from overrides/tokenizer_config/special_tokens_map; _UNSET when none mentions it."""
        key = f"{name}_token"
        if key in self.overrides:
            return token_content(self.overrides[key], where=f"override {key}")
        for fname, data in ((TOKENIZER_CONFIG, self.tokenizer_config), (SPECIAL_TOKENS_MAP, self.special_tokens_map)):
            if key in data:
                return token_content(data[key], where=f"{self.path(fname)}: {key}")
        return _UNSET

    def model_token_id(self, name: str) -> int | None:
        """``<name>_token_id`` from config.json, then generation_config.json (first entry of a list)."""
        key = f"{name}_token_id"
        for data in (self.model_config, self.generation_config):
            v = data.get(key)
            if isinstance(v, list):
                v = v[0] if v else None
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        return None

    def additional_special_tokens(self) -> list[str]:
        out: list[str] = []
        for fname, data in ((TOKENIZER_CONFIG, self.tokenizer_config), (SPECIAL_TOKENS_MAP, self.special_tokens_map)):
            vals = data.get("additional_special_tokens") or []
            if not isinstance(vals, list):
                raise ConfigError(f"{self.path(fname)}: additional_special_tokens must be a list, got {vals!r}")
            for v in vals:
                c = token_content(v, where=f"{self.path(fname)}: additional_special_tokens")
                if c is not None and c not in out:
                    out.append(c)
        return out

    def special_token_strings(self) -> list[str]:
        out = []
        for name in SPECIAL_NAMES:
            v = self.special_token(name)
            if isinstance(v, str):
                out.append(v)
        return out + self.additional_special_tokens()

    def generation_eos_ids(self) -> list[int]:
        out = []
        for data in (self.generation_config, self.model_config):
            v = data.get("eos_token_id")
            for i in (v if isinstance(v, list) else [v]):
                if isinstance(i, int) and not isinstance(i, bool) and i not in out:
                    out.append(i)
        return out


_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text: str) -> str:
    """HF's ``clean_up_tokenization`` (applied only when the config sets clean_up_tokenization_spaces)."""
    for a, b in _CLEANUP:
        text = text.replace(a, b)
    return text


class Tokenizer(ABC):
    """One interface over SentencePiece and Hugging Face `tokenizers` tokenizers.

    Attributes set by the backends: ``name_or_path``, ``bos_token``/``eos_token``/``unk_token``/``pad_token``
    (strings or None) and their ``*_id``, ``add_bos_token``/``add_eos_token`` (what ``add_special_tokens=True``
    adds), ``chat_template``, ``pad_token_fallback``, ``stop_token_ids`` (eos plus generation_config's eos ids),
    ``model_max_length``.
    """

    name_or_path: str
    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    unk_token_id: int | None = None
    pad_token_id: int | None = None
    pad_token_fallback: str | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    chat_template: str | None = None
    model_max_length: int | None = None
    stop_token_ids: list[int]
    backend: str = ""

    # -- abstract ------------------------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds bos/eos as the tokenizer's config says (HF)."""

    @abstractmethod
    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """``[encode(t) for t in texts]``, computed in one batched library call."""

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens are written out unless ``skip_special_tokens``.

        Ids past the vocabulary (``>= vocab_size``, no entry) are skipped, as Hugging Face fast tokenizers do:
        a model's embedding may have more rows than the tokenizer has tokens (Qwen2.5: 152064 vs 151665), so
        generation can produce them. A negative id (e.g. a -100 label) is no token id and raises ValueError
        (HF raises OverflowError there); see :func:`decode_ids`."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (a piece / byte-level token / added token), None if absent."""

    @abstractmethod
    def id_to_token(self, idx: int) -> str | None:
        """Vocabulary entry of an id, None if out of range."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (HF ``len(tokenizer)``)."""

    @property
    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """``{token: id}`` of every special token (bos/eos/unk/pad, additional and added special tokens)."""

    # -- shared --------------------------------------------------------------------------------------------------
    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    @property
    def all_special_ids(self) -> frozenset[int]:
        return frozenset(self.special_tokens.values())

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_token!r}:{self.bos_token_id}, eos={self.eos_token!r}:{self.eos_token_id}, "
                f"pad={self.pad_token!r}:{self.pad_token_id}, unk={self.unk_token!r}:{self.unk_token_id})")

    @staticmethod
    def planned_special_tokens(files: TokenizerFiles, defaults: dict[str, str | None]) -> list[str]:
        """The special-token strings the tokenizer will carry (named ones and additional ones), before ids.

        Backends make sure each is a single, special vocabulary entry (HF adds a missing one at the end)."""
        out: list[str] = []
        for name in SPECIAL_NAMES:
            content = files.special_token(name)
            if content is _UNSET:
                content = defaults.get(name)
            if isinstance(content, str) and content not in out:
                out.append(content)
        return out + [t for t in files.additional_special_tokens() if t not in out]

    def _resolve_specials(self, files: TokenizerFiles, defaults: dict[str, str | None]) -> None:
        """Set the four special tokens and ids per the module docstring; ``token_to_id`` must be ready."""
        for name in SPECIAL_NAMES:
            content = files.special_token(name)
            idx = None
            if content is _UNSET:
                content = defaults.get(name)
                if content is None and name != "unk":
                    idx = files.model_token_id(name)
                    if idx is not None:
                        content = self.id_to_token(idx)
                        if content is None:
                            raise ConfigError(f"{files.directory}: {name}_token_id {idx} of config.json/"
                                              f"generation_config.json is outside the vocabulary "
                                              f"({self.vocab_size} ids)")
            if content is not None and idx is None:
                idx = self.token_to_id(content)
                if idx is None:
                    raise ConfigError(f"{files.directory or self.name_or_path}: {name}_token {content!r} is not in "
                                      f"the vocabulary of {self.name_or_path}")
            setattr(self, f"{name}_token", content)
            setattr(self, f"{name}_token_id", idx)
        self.pad_token_fallback = None
        if self.pad_token_id is None:
            for fb in ("unk", "eos"):
                if getattr(self, f"{fb}_token_id") is not None:
                    self.pad_token, self.pad_token_id = getattr(self, f"{fb}_token"), getattr(self, f"{fb}_token_id")
                    self.pad_token_fallback = fb
                    break
        stops = [] if self.eos_token_id is None else [self.eos_token_id]
        stops += [i for i in files.generation_eos_ids() if i not in stops and self.id_to_token(i) is not None]
        self.stop_token_ids = stops
        mml = files.setting("model_max_length")
        self.model_max_length = mml if isinstance(mml, int) and not isinstance(mml, bool) and mml < 10**12 else None
        self.chat_template = files.chat_template


U32_LIMIT = 2 ** 32  # token ids are u32 in Hugging Face `tokenizers`


def decode_ids(ids: Iterable[int], name_or_path: str) -> list[int]:
    """``ids`` as a list of ints for ``decode``; ValueError for an id that is no token id at all (negative, or
    beyond u32, where HF's fast tokenizers raise OverflowError). Ids past the vocabulary pass: backends skip them."""
    ids = [int(i) for i in ids]
    if ids and (min(ids) < 0 or max(ids) >= U32_LIMIT):
        bad = next(i for i in ids if i < 0 or i >= U32_LIMIT)
        raise ValueError(f"decode: {bad} is not a token id (ids are non-negative; {name_or_path})")
    return ids


def bool_setting(files: TokenizerFiles, key: str, default: bool | None) -> bool | None:
    v = files.setting(key, default)
    if v is None or isinstance(v, bool):
        return v
    raise ConfigError(f"{files.path(TOKENIZER_CONFIG)}: {key} must be true or false, got {v!r}")


def special_split_pattern(tokens: Iterable[str]) -> re.Pattern | None:
    """A regex matching any of ``tokens`` (longest first), capturing the match; None for no tokens."""
    toks = sorted({t for t in tokens if t}, key=lambda t: (-len(t), t))
    if not toks:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in toks) + ")")
