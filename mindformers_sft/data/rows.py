"""Training rows held in memory: :class:`ArrayDataset`, the base of every dataset the trainer reads
(MindRecord, online SFT, Hugging Face ``datasets``)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import DataError
from .packing import positions_and_segments


class ArrayDataset:
    """Rows held as int32 arrays [N, S+1] (and actual_seq_len [N, K] for packed data)."""

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, actual_seq_len: Optional[np.ndarray] = None,
                 source: str = ""):
        self.input_ids = np.ascontiguousarray(input_ids, dtype=np.int32)
        self.labels = np.ascontiguousarray(labels, dtype=np.int32)
        self.actual_seq_len = None if actual_seq_len is None else np.ascontiguousarray(actual_seq_len, np.int32)
        self.source = source
        if self.input_ids.shape != self.labels.shape:
            raise DataError(f"{source}: input_ids {self.input_ids.shape} and labels {self.labels.shape} differ")

    @property
    def seq_length(self) -> int:
        return int(self.input_ids.shape[1]) - 1 if self.input_ids.ndim == 2 and self.input_ids.shape[1] else 0

    @property
    def packed(self) -> bool:
        return self.actual_seq_len is not None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, i) -> dict:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} rows")
        item = {"input_ids": self.input_ids[i].copy(), "labels": self.labels[i].copy()}
        if self.actual_seq_len is not None:
            pos, seg = positions_and_segments(self.actual_seq_len[i], self.seq_length)
            item["position_ids"], item["segment_ids"] = pos, seg
        return item
