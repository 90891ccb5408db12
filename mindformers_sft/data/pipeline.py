"""The preprocessing pipeline shared by tools/preprocess.py and the online dataset.

files -> records (readers) -> Conversations (formats) -> samples (templates + tokenize, in chunks, optionally
in worker processes) -> rows (packing). Records are read and normalized in the calling process, chunks of
``chunk_records`` Conversations are tokenized by ``num_workers`` processes (``multiprocessing``, spawn; at most
``2 * num_workers`` chunks in flight, results in input order, so the output does not depend on the number of
workers), and rows are packed in the calling process. Every record that is not kept goes to the RejectLog.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from ..errors import ConfigError, DataError
from .formats import ALPACA_PROMPTS, FORMATS, Conversation, Location, RecordError, detect_format, parse_map_keys, \
    to_conversation
from .packing import Packer, pack_strategy
from .readers import read_file, resolve_files
from .stats import RejectLog, Stats
from .templates import get_template
from .tokenize import SFTEncoder
from .truncation import DEFAULT_TRUNCATION, TRUNCATIONS


@dataclass
class SFTOptions:
    seq_length: int
    template: str = "auto"
    data_format: str = "auto"
    map_keys: object = None
    alpaca_prompt: str = "stanford"
    train_on_prompt: bool = False
    mask_history: bool = False
    truncation: str = DEFAULT_TRUNCATION   # proportional | cut | turn | drop (truncation.py)
    enable_thinking: Optional[bool] = None  # Qwen3's template switch; None: unset (the template's default)
    pack: object = False                  # False | True (greedy) | "greedy" | "sequential"
    pack_max_samples: Optional[int] = None
    pack_buffer: int = 4096
    num_workers: int = 0                  # 0 or 1: in this process
    chunk_records: int = 512

    def __post_init__(self):
        if self.data_format not in ("auto",) + FORMATS:
            raise ConfigError(f"data_format {self.data_format!r} is not supported; expected auto, "
                              f"{', '.join(FORMATS)}")
        if self.alpaca_prompt not in ALPACA_PROMPTS:
            raise ConfigError(f"alpaca_prompt {self.alpaca_prompt!r}: expected one of {', '.join(ALPACA_PROMPTS)}")
        if self.truncation not in TRUNCATIONS:
            raise ConfigError(f"truncation {self.truncation!r} (data_loader.truncation / --truncation) is not a mode; "
                              f"expected one of {', '.join(TRUNCATIONS)}")
        if self.enable_thinking is not None and not isinstance(self.enable_thinking, bool):
            raise ConfigError(f"enable_thinking: expected true, false or unset (null), got {self.enable_thinking!r}")
        self.map_keys = parse_map_keys(self.map_keys)
        self.pack = pack_strategy(self.pack)
        self.seq_length = int(self.seq_length)
        if self.seq_length < 1:
            raise ConfigError(f"seq_length must be a positive integer, got {self.seq_length}")


def make_encoder(tokenizer, opts: SFTOptions) -> SFTEncoder:
    template = get_template(opts.template, tokenizer, enable_thinking=opts.enable_thinking)
    enc = SFTEncoder(tokenizer, template, opts.seq_length, train_on_prompt=opts.train_on_prompt,
                     mask_history=opts.mask_history, truncation=opts.truncation)
    # A template that cannot render a plain exchange is a configuration error, not a per-record one.
    probe = Conversation([("user", "Hi"), ("assistant", "Hello")])
    try:
        template.render_spans(probe)
    except RecordError as e:
        raise ConfigError(f"template {opts.template!r} with tokenizer "
                          f"{getattr(tokenizer, 'name_or_path', '')!r}: {e}") from None
    return enc


def iter_conversations(spec, opts: SFTOptions, stats: Stats, rejects: RejectLog
                       ) -> Iterator[Tuple[Location, Conversation]]:
    for path in resolve_files(spec):
        fmt = None if opts.data_format == "auto" else opts.data_format
        for loc, rec in read_file(path):
            if isinstance(rec, RecordError):
                if rec.warning:
                    rejects.add(loc, str(rec), warning=True)
                    continue
                stats.read += 1
                rejects.add(loc, str(rec))
                continue
            stats.read += 1
            if fmt is None:
                fmt = detect_format(rec, opts.map_keys)
                if fmt is None:
                    keys = ", ".join(list(rec)[:8]) if isinstance(rec, dict) else type(rec).__name__
                    raise DataError(f"{loc}: cannot tell the data format from the first record (keys: {keys}); "
                                    f"expected alpaca (instruction/input/output), sharegpt (conversations) or "
                                    f"messages; set data_format (and map_keys)")
            try:
                conv = to_conversation(rec, fmt, opts.map_keys, opts.alpaca_prompt)
            except RecordError as e:
                rejects.add(loc, f"{fmt}: {e}")
                continue
            if conv.dropped_leading:
                stats.dropped_leading += 1
            yield loc, conv


# -- workers ----------------------------------------------------------------------------------------------------

_ENCODER = None


def _worker_init(tokenizer, opts):
    global _ENCODER
    _ENCODER = make_encoder(tokenizer, opts)


def _worker_encode(items):
    return _ENCODER.encode(items)


def _chunks(it, n):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def iter_samples(spec, tokenizer, opts: SFTOptions, stats: Stats, rejects: RejectLog) -> Iterator[list]:
    """Lists of Samples, chunk by chunk, in input order; rejects and counts recorded."""
    convs = iter_conversations(spec, opts, stats, rejects)
    chunks = _chunks(convs, max(1, int(opts.chunk_records)))

    def account(result):
        samples, rej = result
        for loc, reason in rej:
            rejects.add(loc, reason)
        stats.merge_samples(samples)
        return samples

    if opts.num_workers <= 1:
        enc = make_encoder(tokenizer, opts)
        for chunk in chunks:
            yield account(enc.encode(chunk))
        return
    make_encoder(tokenizer, opts)                  # fail early, in this process, on a bad template
    ctx = mp.get_context("spawn")
    with ctx.Pool(opts.num_workers, initializer=_worker_init, initargs=(tokenizer, opts)) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_worker_encode, (chunk,)))
            while len(pending) >= 2 * opts.num_workers:
                yield account(pending.popleft().get())
        while pending:
            yield account(pending.popleft().get())


def pad_id_of(tokenizer) -> int:
    for attr in ("pad_token_id", "unk_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def iter_rows(spec, tokenizer, opts: SFTOptions, stats: Stats, rejects: RejectLog) -> Iterator[List[dict]]:
    """Lists of rows (dicts of int32 arrays), chunk by chunk; stats.rows/slots are updated."""
    packer = Packer(opts.seq_length, pad_id_of(tokenizer), opts.pack, opts.pack_max_samples, opts.pack_buffer)
    for samples in iter_samples(spec, tokenizer, opts, stats, rejects):
        rows = list(packer.add(samples))
        stats.rows, stats.slots = packer.rows, packer.slots
        if rows:
            yield rows
    rows = list(packer.flush())
    stats.rows, stats.slots = packer.rows, packer.slots
    if rows:
        yield rows
