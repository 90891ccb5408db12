"""Rows of seq_length + 1 tokens: one padded sample, or several samples packed.

Layout (MindFormers'): ``input_ids`` and ``labels`` int32 of length ``S + 1``, unshifted; the model reads
``input_ids[:-1]`` and predicts ``labels[1:]``. Padding is the tokenizer's pad id in input_ids and -100 in labels.

Packed rows also carry ``actual_seq_len`` (MindFormers' EOD-reset column): int32, the cumulative end offsets of
the samples in the row, in model-token coordinates (positions of ``input_ids[:-1]``, so an end is clipped to S),
padded to a fixed length ``K`` (``pack_max_samples``, default ``min(S, 512)``; a row never holds more samples)
by repeating the last end. Example, S = 9, samples of 3 and 4 tokens, K = 4: ``[3, 7, 7, 7]``; tokens 7..8 are
padding. From it (:func:`positions_and_segments`): ``segment_ids`` 1, 2, ... per sample and 0 for padding,
``position_ids`` restarting at 0 at each sample (and at the padding). In a packed row the label of each
sample's first token is -100: it would otherwise be predicted from the previous sample's last token (in an
unpadded row that label is never used), so each sample gets exactly the loss it has alone.

Packing strategies: ``greedy`` (best-fit decreasing over a buffer of ``pack_buffer`` samples; deterministic)
and ``sequential`` (samples in input order, a new row when the next one does not fit).
"""
from __future__ import annotations

from typing import Iterable, Iterator, List, Optional

import numpy as np

from ..errors import ConfigError
from .tokenize import IGNORE_INDEX, Sample

PACK_STRATEGIES = ("greedy", "sequential")


def default_pack_max_samples(seq_length: int) -> int:
    return int(min(seq_length, 512))


def pack_strategy(pack) -> Optional[str]:
    """None (no packing) or a strategy name from a bool / str option."""
    if pack is None or pack is False or (isinstance(pack, str) and pack.lower() in ("", "false", "none", "no", "0")):
        return None
    if pack is True or (isinstance(pack, str) and pack.lower() in ("true", "yes", "1")):
        return "greedy"
    if isinstance(pack, str) and pack in PACK_STRATEGIES:
        return pack
    raise ConfigError(f"pack: expected true/false or one of {', '.join(PACK_STRATEGIES)}, got {pack!r}")


def pad_row(sample: Sample, seq_length: int, pad_id: int) -> dict:
    n = seq_length + 1
    ids = np.full(n, pad_id, dtype=np.int32)
    labels = np.full(n, IGNORE_INDEX, dtype=np.int32)
    L = len(sample.input_ids)
    ids[:L] = sample.input_ids
    labels[:L] = sample.labels
    return {"input_ids": ids, "labels": labels}


def pack_row(samples: List[Sample], seq_length: int, pad_id: int, max_samples: int) -> dict:
    n = seq_length + 1
    ids = np.full(n, pad_id, dtype=np.int32)
    labels = np.full(n, IGNORE_INDEX, dtype=np.int32)
    ends = []
    pos = 0
    for s in samples:
        L = len(s.input_ids)
        ids[pos:pos + L] = s.input_ids
        labels[pos:pos + L] = s.labels
        labels[pos] = IGNORE_INDEX
        pos += L
        ends.append(min(pos, seq_length))
    if pos > n or len(samples) > max_samples:
        raise ValueError("internal: packed row overflow")
    asl = np.full(max_samples, ends[-1], dtype=np.int32)
    asl[:len(ends)] = ends
    return {"input_ids": ids, "labels": labels, "actual_seq_len": asl}


def positions_and_segments(actual_seq_len, seq_length: int):
    """(position_ids, segment_ids) int32 [S] from one row's actual_seq_len (see the module docstring)."""
    a = np.asarray(actual_seq_len, dtype=np.int64).reshape(-1)
    a = np.minimum(a, seq_length)
    keep = np.concatenate([[True], a[1:] > a[:-1]]) & (a > 0)
    ends = a[keep]
    idx = np.arange(seq_length)
    if ends.size == 0:
        return idx.astype(np.int32), np.zeros(seq_length, np.int32)
    seg = np.searchsorted(ends, idx, side="right")             # 0-based sample index; == len(ends) on padding
    starts = np.concatenate([[0], ends])
    pos = idx - starts[seg]
    segment_ids = np.where(seg < ends.size, seg + 1, 0)
    return pos.astype(np.int32), segment_ids.astype(np.int32)


class Packer:
    """Turns a stream of samples into rows (dicts of numpy arrays)."""

    def __init__(self, seq_length: int, pad_id: int, strategy: Optional[str] = None,
                 max_samples: Optional[int] = None, buffer_size: int = 4096):
        self.seq_length = int(seq_length)
        self.capacity = self.seq_length + 1
        self.pad_id = int(pad_id)
        self.strategy = strategy
        self.max_samples = int(max_samples or default_pack_max_samples(self.seq_length))
        if self.max_samples < 1:
            raise ConfigError(f"pack_max_samples must be >= 1, got {max_samples}")
        self.buffer_size = int(buffer_size)
        self._buf: List[Sample] = []
        self._cur: List[Sample] = []
        self._cur_len = 0
        self.rows = 0
        self.used_tokens = 0

    def _emit(self, group: List[Sample]) -> dict:
        self.rows += 1
        self.used_tokens += sum(len(s.input_ids) for s in group)
        if self.strategy is None:
            return pad_row(group[0], self.seq_length, self.pad_id)
        return pack_row(group, self.seq_length, self.pad_id, self.max_samples)

    def add(self, samples: Iterable[Sample]) -> Iterator[dict]:
        for s in samples:
            if self.strategy is None:
                yield self._emit([s])
            elif self.strategy == "sequential":
                L = len(s.input_ids)
                if self._cur and (self._cur_len + L > self.capacity or len(self._cur) >= self.max_samples):
                    yield self._emit(self._cur)
                    self._cur, self._cur_len = [], 0
                self._cur.append(s)
                self._cur_len += L
            else:
                self._buf.append(s)
                if len(self._buf) >= self.buffer_size:
                    yield from self._first_fit()

    def _first_fit(self) -> Iterator[dict]:
        """Best-fit decreasing over the buffer: longest sample first, into the open row with the least room
        that still fits it (bisect over a sorted list of (room, row))."""
        import bisect
        order = sorted(range(len(self._buf)), key=lambda i: -len(self._buf[i].input_ids))
        bins: List[List[Sample]] = []
        rooms: list = []                           # sorted (room, bin index) of rows that can take more
        for i in order:
            s = self._buf[i]
            L = len(s.input_ids)
            k = bisect.bisect_left(rooms, (L, -1))
            if k < len(rooms):
                room, b = rooms.pop(k)
                bins[b].append(s)
                room -= L
            else:
                b = len(bins)
                bins.append([s])
                room = self.capacity - L
            if room > 0 and len(bins[b]) < self.max_samples:
                bisect.insort(rooms, (room, b))
        self._buf = []
        for group in bins:
            yield self._emit(group)

    def flush(self) -> Iterator[dict]:
        if self.strategy == "sequential" and self._cur:
            yield self._emit(self._cur)
            self._cur, self._cur_len = [], 0
        elif self.strategy == "greedy" and self._buf:
            yield from self._first_fit()

    @property
    def slots(self) -> int:
        return self.rows * self.capacity
