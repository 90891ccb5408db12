"""Tokenizers behind one interface (:class:`Tokenizer`), with special tokens read from the tokenizer's own files.

``load_tokenizer(path)`` accepts a SentencePiece ``tokenizer.model`` (Llama-2, legacy LlamaTokenizer behaviour),
a Hugging Face ``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` (Qwen2 byte-level BPE, built like
transformers' Qwen2TokenizerFast), or a directory holding one of them. See :mod:`.base` for how bos/eos/unk/pad
are resolved and for the pad fallback (unk, else eos).
"""

from mindformers_sft.tokenizer.base import Tokenizer, TokenizerFiles
from mindformers_sft.tokenizer.hf_tok import HFTokenizer, build_byte_level_bpe
from mindformers_sft.tokenizer.loader import load_tokenizer, load_tokenizer_from_config
from mindformers_sft.tokenizer.sentencepiece_tok import SentencePieceTokenizer

__all__ = [
    "Tokenizer", "TokenizerFiles", "SentencePieceTokenizer", "HFTokenizer", "build_byte_level_bpe",
    "load_tokenizer", "load_tokenizer_from_config",
]
