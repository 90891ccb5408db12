"""Counts of a preprocessing run and the rejects file: nothing is dropped silently.

The rejects file is JSON Lines, one object per rejected record (or warning):
``{"file": ..., "line": 12 | null, "index": 3, "reason": "...", "warning": false}`` (``line`` is null for
Parquet; ``index`` is the 0-based record index in the file).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Optional

from .formats import Location


class Stats:
    def __init__(self):
        self.read = 0                 # records seen (good or not)
        self.kept = 0                 # records that became samples
        self.truncated = 0
        self.rejected = 0
        self.warnings = 0
        self.dropped_leading = 0      # records whose leading assistant turn(s) were dropped (FastChat does so)
        self.tokens = 0               # real tokens of the kept samples
        self.supervised = 0           # supervised label tokens
        self.rows = 0
        self.slots = 0                # rows * (seq_length + 1)
        self.reasons = Counter()

    @property
    def pad_fraction(self) -> float:
        return 1.0 - self.tokens / self.slots if self.slots else 0.0

    def merge_samples(self, samples):
        for s in samples:
            self.kept += 1
            self.truncated += int(s.truncated)
            self.tokens += len(s.input_ids)
            self.supervised += int((s.labels[1:] != -100).sum())

    def line(self) -> str:
        return (f"records read {self.read}, kept {self.kept}, truncated {self.truncated}, rejected {self.rejected}"
                f"{f', warnings {self.warnings}' if self.warnings else ''}; tokens {self.tokens} "
                f"(supervised {self.supervised}); rows {self.rows}, pad fraction {self.pad_fraction:.4f}")

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "truncated": self.truncated, "rejected": self.rejected,
                "warnings": self.warnings, "dropped_leading": self.dropped_leading, "tokens": self.tokens,
                "supervised": self.supervised, "rows": self.rows, "slots": self.slots,
                "pad_fraction": self.pad_fraction, "reasons": dict(self.reasons)}


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split(" (")[0][:60]


class RejectLog:
    """Collects rejects (and warnings); writes them to `path` (JSON Lines) when given."""

    def __init__(self, path: Optional[str] = None, stats: Optional[Stats] = None, keep: int = 1000):
        self.path = path or None
        self.stats = stats
        self.keep = keep
        self.items = []               # the first `keep` entries, as dicts
        self._f = None
        if self.path:
            d = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(d, exist_ok=True)
            self._f = open(self.path, "w", encoding="utf-8")

    def add(self, loc: Location, reason: str, warning: bool = False):
        entry = {**loc.as_dict(), "reason": reason, "warning": bool(warning)}
        if self.stats is not None:
            if warning:
                self.stats.warnings += 1
            else:
                self.stats.rejected += 1
                self.stats.reasons[_reason_kind(reason)] += 1
        if len(self.items) < self.keep:
            self.items.append(entry)
        if self._f is not None:
            self._f.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
