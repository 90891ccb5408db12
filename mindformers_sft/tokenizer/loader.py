"""``load_tokenizer``: find the tokenizer files at a path and build the matching backend."""

from __future__ import annotations

import os
from pathlib import Path

from mindformers_sft.errors import ConfigError
from mindformers_sft.tokenizer.base import Tokenizer, TokenizerFiles
from mindformers_sft.tokenizer.hf_tok import (
    CLASS_DEFAULTS, HFTokenizer, bpe_style, build_byte_level_bpe, load_tokenizer_json)
from mindformers_sft.tokenizer.sentencepiece_tok import SentencePieceTokenizer

EXPECTED = ("a tokenizer.model (SentencePiece) file, a tokenizer.json file, a vocab.json file (with merges.txt "
            "beside it), or a directory containing tokenizer.json, tokenizer.model, or vocab.json + merges.txt")
KINDS = ("tokenizer.json", "tokenizer.model", "vocab.json")
OVERRIDE_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token",
                 "chat_template", "model_max_length", "split_special_tokens", "tokenizer_class")


def _pick_in_dir(d: Path, kind: str | None) -> tuple[str, Path]:
    present = {k: d / k for k in KINDS if (d / k).is_file()}
    if kind is not None:
        if kind not in present:
            raise ConfigError(f"{d}: no {kind} in this directory (asked for kind={kind!r})")
        return kind, present[kind]
    for k in KINDS:
        if k in present:
            return k, present[k]
    found = sorted(p.name for p in d.iterdir())[:20] if d.is_dir() else []
    raise ConfigError(f"{d}: no tokenizer files found; expected tokenizer.json, tokenizer.model, or vocab.json + "
                      f"merges.txt (the directory holds: {', '.join(found) or 'nothing'})")


def load_tokenizer(path: str | os.PathLike, *, merges_file: str | os.PathLike | None = None,
                   kind: str | None = None, **overrides) -> Tokenizer:
    """Load the tokenizer at ``path``.

    ``path`` is a ``tokenizer.model`` / ``*.model`` SentencePiece file, a ``tokenizer.json`` file, a ``vocab.json``
    file (``merges_file`` defaults to the ``merges.txt`` beside it), or a directory; a directory is searched for
    ``tokenizer.json``, then ``tokenizer.model``, then ``vocab.json`` + ``merges.txt`` (``kind`` forces one of
    these three names). The side files (tokenizer_config.json, special_tokens_map.json, added_tokens.json,
    chat_template.jinja, generation_config.json, config.json) are read from the same directory.

    ``overrides`` (None values ignored) take priority over the files: ``bos_token``, ``eos_token``, ``unk_token``,
    ``pad_token``, ``add_bos_token``, ``add_eos_token``, ``chat_template``, ``model_max_length``,
    ``split_special_tokens``, ``tokenizer_class``. Any problem raises ConfigError naming the file.
    """
    unknown = set(overrides) - set(OVERRIDE_KEYS)
    if unknown:
        raise ConfigError(f"load_tokenizer: unknown option(s) {sorted(unknown)}; known: {list(OVERRIDE_KEYS)}")
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"load_tokenizer: kind must be one of {KINDS}, got {kind!r}")
    if path is None or str(path) == "":
        raise ConfigError(f"no tokenizer path given; expected {EXPECTED}")
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{p}: tokenizer path does not exist; expected {EXPECTED}")
    if p.is_dir():
        directory = p
        which, file = _pick_in_dir(p, kind)
    else:
        directory = p.parent
        file = p
        if p.suffix == ".model":
            which = "tokenizer.model"
        elif p.name == "vocab.json" or (merges_file is not None and p.suffix == ".json"):
            which = "vocab.json"
        elif p.suffix == ".json":
            which = "tokenizer.json"
        else:
            raise ConfigError(f"{p}: unrecognised tokenizer file; expected {EXPECTED}")
    files = TokenizerFiles(directory, overrides)
    name = str(path)

    if which == "tokenizer.model":
        return SentencePieceTokenizer(file, files, name_or_path=name)
    if which == "tokenizer.json":
        return HFTokenizer(load_tokenizer_json(file), files, name_or_path=name)
    merges = Path(merges_file) if merges_file is not None else file.parent / "merges.txt"
    if not merges.is_file():
        raise ConfigError(f"{merges}: merges file not found; a vocab.json tokenizer ({file}) needs the BPE merges "
                          f"(merges.txt) beside it")
    style = bpe_style(files)
    add_prefix_space = files.setting("add_prefix_space", False)
    tok = build_byte_level_bpe(file, merges, style=style, add_prefix_space=bool(add_prefix_space))
    return HFTokenizer(tok, files, name_or_path=name, defaults=CLASS_DEFAULTS[style])


def load_tokenizer_from_config(cfg: dict, base_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Load from a MindFormers-style ``processor.tokenizer`` section.

    The first non-empty of ``path``, ``tokenizer_file``, ``vocab_file`` is the path (with ``merges_file`` for a
    vocab.json); relative paths are taken from ``base_dir``. ``bos_token``/``eos_token``/``pad_token``/
    ``unk_token``/``add_bos_token``/``add_eos_token``/``chat_template``/``model_max_length`` override the files.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"processor.tokenizer must be a mapping, got {type(cfg).__name__}")

    def _abs(v):
        if not v:
            return None
        v = Path(str(v)).expanduser()
        return v if base_dir is None or v.is_absolute() else Path(base_dir) / v

    path = next((_abs(cfg.get(k)) for k in ("path", "tokenizer_file", "vocab_file") if cfg.get(k)), None)
    if path is None:
        raise ConfigError("processor.tokenizer: none of path, tokenizer_file, vocab_file is set; expected "
                          + EXPECTED)
    overrides = {k: cfg.get(k) for k in OVERRIDE_KEYS if k != "tokenizer_class" and cfg.get(k) is not None}
    return load_tokenizer(path, merges_file=_abs(cfg.get("merges_file")), **overrides)
