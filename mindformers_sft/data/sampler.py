"""Which samples form each optimizer step, on each data-parallel rank: a pure function of
(seed, epoch, step), so a resumed run reads exactly the samples the interrupted one would have read.

A global batch holds micro_batch * accumulation * dp_size samples, drawn from a permutation of the
dataset seeded by (seed, epoch). Rank r takes the r-th contiguous slice of it, split into `accumulation`
micro-batches. Ranks therefore see disjoint samples, and together the global batch of a single process.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError


class BatchPlan:
    def __init__(self, num_samples, micro_batch, accumulation=1, dp_size=1, dp_rank=0, seed=0, shuffle=True):
        self.num_samples = int(num_samples)
        self.micro_batch = int(micro_batch)
        self.accumulation = int(accumulation)
        self.dp_size, self.dp_rank = int(dp_size), int(dp_rank)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.global_batch = self.micro_batch * self.accumulation * self.dp_size
        if self.num_samples < self.global_batch:
            raise ConfigError(
                f"the dataset has {self.num_samples} samples, fewer than one global batch "
                f"(batch_size {micro_batch} x gradient_accumulation_steps {accumulation} x data_parallel {dp_size} "
                f"= {self.global_batch}); lower batch_size or add data")
        self.steps_per_epoch = self.num_samples // self.global_batch   # the remainder is dropped, as drop_remainder

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def micro_batches(self, epoch: int, step: int, order=None):
        """Index lists of this rank's micro-batches for step `step` (0-based within the epoch)."""
        order = self.order(epoch) if order is None else order
        start = step * self.global_batch + self.dp_rank * self.micro_batch * self.accumulation
        mine = order[start:start + self.micro_batch * self.accumulation]
        return [mine[i * self.micro_batch:(i + 1) * self.micro_batch].tolist() for i in range(self.accumulation)]


def collate(samples):
    """Stack a list of sample dicts (numpy arrays) into one batch dict."""
    keys = samples[0].keys()
    return {k: np.stack([s[k] for s in samples]) for k in keys}
