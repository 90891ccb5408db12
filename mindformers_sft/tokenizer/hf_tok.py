"""Tokenizers backed by the Hugging Face `tokenizers` library: a ``tokenizer.json``, or a byte-level BPE built from
``vocab.json`` + ``merges.txt`` exactly as transformers converts Qwen2Tokenizer (or GPT2Tokenizer) to its fast form.

Added tokens from ``tokenizer_config.json`` (``added_tokens_decoder``) and ``added_tokens.json`` are registered
with their declared ids (which must follow the base vocabulary without gaps, as in HF), and every special token
string is made a special added token, so each is recognised as one token inside text.

``add_special_tokens=True`` runs the tokenizer's post-processor. If ``add_bos_token``/``add_eos_token`` are given
(tokenizer_config.json or an override) the post-processor is rebuilt from them (as HF's LlamaTokenizerFast does);
otherwise the one in ``tokenizer.json`` is kept (Qwen2's adds nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as _HFTok
from tokenizers import decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from mindformers_sft.errors import ConfigError
from mindformers_sft.tokenizer.base import (
    ADDED_TOKENS, TOKENIZER_CONFIG, Tokenizer, TokenizerFiles, bool_setting, clean_up_tokenization, decode_ids,
    read_json_object)

# transformers.convert_slow_tokenizer.Qwen2Converter
QWEN2_SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                       r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Special-token defaults of the HF classes, used when no file names the token.
CLASS_DEFAULTS = {
    "qwen2": {"bos": None, "eos": "<|endoftext|>", "unk": "<|endoftext|>", "pad": "<|endoftext|>"},
    "gpt2": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>", "pad": None},
}
_BPE_CLASSES = {"qwen2tokenizer": "qwen2", "qwen2tokenizerfast": "qwen2",
                "gpt2tokenizer": "gpt2", "gpt2tokenizerfast": "gpt2"}


def bpe_style(files: TokenizerFiles) -> str:
    """Which byte-level BPE a vocab.json + merges.txt pair is: tokenizer_config's tokenizer_class, else Qwen2."""
    cls = files.setting("tokenizer_class")
    if cls is None:
        return "qwen2"
    style = _BPE_CLASSES.get(str(cls).lower())
    if style is None:
        raise ConfigError(f"{files.path(TOKENIZER_CONFIG)}: tokenizer_class {cls!r} cannot be built from vocab.json + "
                          f"merges.txt here; supported: Qwen2Tokenizer(Fast), GPT2Tokenizer(Fast) "
                          f"(or provide a tokenizer.json)")
    return style


def read_merges(merges_file: Path) -> list[tuple[str, str]]:
    """merges.txt as HF's slow Qwen2/GPT2 tokenizers read it: skip the '#version' header and blank lines."""
    try:
        text = merges_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{merges_file}: cannot read file ({exc.strerror or exc}); expected BPE merges "
                          f"(merges.txt, one 'left right' pair a line)") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{merges_file}: not UTF-8 text; expected BPE merges (merges.txt)") from exc
    merges = []
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{merges_file}: line {lineno}: expected two space-separated tokens "
                              f"('left right'), got {line[:80]!r}")
        merges.append((parts[0], parts[1]))
    return merges


def read_vocab(vocab_file: Path) -> dict[str, int]:
    vocab = read_json_object(vocab_file, what="a JSON object {token: id} (vocab.json)")
    for tok, idx in vocab.items():
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise ConfigError(f"{vocab_file}: id of {tok!r} must be a non-negative integer, got {idx!r}")
    if not vocab:
        raise ConfigError(f"{vocab_file}: vocabulary is empty")
    return vocab


def build_byte_level_bpe(vocab_file: Path, merges_file: Path, style: str = "qwen2",
                         add_prefix_space: bool = False) -> _HFTok:
    """The fast tokenizer transformers' Qwen2Converter (or GPT2Converter) builds from vocab.json + merges.txt."""
    vocab = read_vocab(vocab_file)
    merges = read_merges(merges_file)
    try:
        model = BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                    end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    except Exception as exc:  # e.g. a merge whose parts are not in the vocabulary
        raise ConfigError(f"{merges_file}: merges do not fit {vocab_file} ({exc})") from exc
    tok = _HFTok(model)
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def load_tokenizer_json(path: Path) -> _HFTok:
    # Parse with json first so a syntax error names its line and column.
    read_json_object(path, what="a serialized Hugging Face tokenizer (tokenizer.json)")
    try:
        return _HFTok.from_file(str(path))
    except Exception as exc:
        raise ConfigError(f"{path}: not a valid Hugging Face tokenizer.json ({exc})") from exc


class HFTokenizer(Tokenizer):
    backend = "tokenizers"

    def __init__(self, tok: _HFTok, files: TokenizerFiles, name_or_path: str,
                 defaults: dict[str, str | None] | None = None):
        self.name_or_path = str(name_or_path)
        self._tok = tok
        tok.no_truncation()
        tok.no_padding()
        defaults = defaults or {}
        self._add_declared_tokens(files)
        added = {t.content for t in tok.get_added_tokens_decoder().values()}
        for content in self.planned_special_tokens(files, defaults):
            if content not in added:  # HF makes every special token string a special added token
                tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        self._resolve_specials(files, defaults)

        self.split_special_tokens = bool(bool_setting(files, "split_special_tokens", False))
        if self.split_special_tokens:
            tok.encode_special_tokens = True
        self.clean_up_tokenization_spaces = bool(bool_setting(files, "clean_up_tokenization_spaces", False))
        self._setup_post_processor(files)

        self._special = {t.content: i for i, t in sorted(tok.get_added_tokens_decoder().items()) if t.special}
        for name in ("bos", "eos", "unk", "pad"):
            c, i = getattr(self, f"{name}_token"), getattr(self, f"{name}_token_id")
            if c is not None and i is not None:
                self._special.setdefault(c, i)
        self._vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def _add_declared_tokens(self, files: TokenizerFiles) -> None:
        tok = self._tok
        where = files.path(TOKENIZER_CONFIG) if files.tokenizer_config.get("added_tokens_decoder") \
            else files.path(ADDED_TOKENS)
        known = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
        for spec in files.added_tokens:
            if known.get(spec.content) == spec.id:
                continue
            at = AddedToken(spec.content, single_word=spec.single_word, lstrip=spec.lstrip, rstrip=spec.rstrip,
                            normalized=spec.normalized, special=spec.special)
            if spec.special:
                tok.add_special_tokens([at])
            else:
                tok.add_tokens([at])
            got = tok.token_to_id(spec.content)
            if got != spec.id:
                raise ConfigError(
                    f"{where}: added token {spec.content!r} is declared with id {spec.id}, but on top of the "
                    f"base vocabulary of {self.name_or_path} it gets id {got}; added tokens must take the ids "
                    f"right after the vocabulary, without gaps")

    def _setup_post_processor(self, files: TokenizerFiles) -> None:
        tok = self._tok
        # What the existing post-processor adds around a text.
        bare = tok.encode("a", add_special_tokens=False).ids
        full = tok.encode("a", add_special_tokens=True).ids
        add_bos = add_eos = False
        for k in range(len(full) - len(bare) + 1):
            if full[k:k + len(bare)] == bare:
                add_bos = k == 1 and self.bos_token_id is not None and full[0] == self.bos_token_id
                tail = full[k + len(bare):]
                add_eos = len(tail) == 1 and self.eos_token_id is not None and tail[0] == self.eos_token_id
                break
        want_bos = bool_setting(files, "add_bos_token", None)
        want_eos = bool_setting(files, "add_eos_token", None)
        if want_bos is not None or want_eos is not None:
            add_bos = add_bos if want_bos is None else want_bos
            add_eos = add_eos if want_eos is None else want_eos
            for name, flag in (("bos", add_bos), ("eos", add_eos)):
                if flag and getattr(self, f"{name}_token_id") is None:
                    raise ConfigError(f"{files.directory}: add_{name}_token is true but the tokenizer has no "
                                      f"{name} token")
            bos, eos = self.bos_token, self.eos_token
            for t in ([bos] if add_bos else []) + ([eos] if add_eos else []):
                if ":" in t:
                    raise ConfigError(f"{files.directory}: cannot build a bos/eos template around {t!r} "
                                      f"(a ':' in the token); drop add_bos_token/add_eos_token from the config")
            pre = [f"{bos}:0"] if add_bos else []
            post = [f"{eos}:0"] if add_eos else []
            single = pre + ["$A:0"] + post
            pair = single + [t[:-1] + "1" for t in pre] + ["$B:1"] + [t[:-1] + "1" for t in post]
            specials = {}
            if add_bos:
                specials[bos] = self.bos_token_id
            if add_eos:
                specials[eos] = self.eos_token_id
            tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                               special_tokens=list(specials.items()))
        self.add_bos_token, self.add_eos_token = add_bos, add_eos

    # -- pickling: tokenizers.Tokenizer pickles itself -------------------------------------------------------------
    @property
    def backend_tokenizer(self) -> _HFTok:
        return self._tok

    # -- vocabulary ------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        idx = int(idx)
        return self._tok.id_to_token(idx) if idx >= 0 else None

    # -- encoding --------------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        texts = texts if isinstance(texts, list) else list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch expects str items, got {type(t).__name__}")
        # encode_batch_fast (tokenizers >= 0.21) skips the offsets; both run in parallel in Rust.
        batch = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch
        return [e.ids for e in batch(texts, add_special_tokens=add_special_tokens)]

    # -- decoding --------------------------------------------------------------------------------------------------
    # `tokenizers` itself skips ids past the vocabulary (exactly what transformers' fast tokenizers return);
    # negative ids raise ValueError in decode_ids.
    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        return decode_ids(ids, self.name_or_path)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        text = self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        texts = self._tok.decode_batch([self._check_ids(ids) for ids in batch],
                                       skip_special_tokens=skip_special_tokens)
        return [clean_up_tokenization(t) for t in texts] if self.clean_up_tokenization_spaces else texts
