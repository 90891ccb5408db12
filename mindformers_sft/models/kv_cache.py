"""The KV caches of cached generation: KVCache (MindSpore tensors per layer; the eager path of causal_lm.py and the
compiled decode step of decode_graph.py) and HostKVCache (one host array; the fused CPU decode step of
fused_decode.py). Both offer what the batching engine needs: used(), merge_rows() and take_rows()."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
from mindspore import Tensor, ops

MIN_CAPACITY = 256


def power_of_two_at_least(length: int, smallest: int) -> int:
    """The smallest power-of-two multiple of `smallest` that is >= length (few distinct shapes)."""
    c = smallest
    while c < length:
        c *= 2
    return c


def capacity_for(length: int) -> int:
    """Columns a static cache gets for `length` tokens: a power of two >= MIN_CAPACITY."""
    return power_of_two_at_least(length, MIN_CAPACITY)


class KVCache:
    """KV cache: per layer (k, v) of shape (B, Nkv, capacity, D), post-RoPE; columns [0, length) hold the sequence,
    later ones (a static cache's free space, written in place by the compiled decode step) are unused."""

    def __init__(self, layers: List[Tuple[Tensor, Tensor]], length: int):
        self.layers, self.length = layers, length

    @property
    def capacity(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else self.length

    def used(self) -> List[Tuple[Tensor, Tensor]]:
        """The layers cut to their first `length` columns."""
        if self.capacity == self.length:
            return self.layers
        return [(k[:, :, :self.length], v[:, :, :self.length]) for k, v in self.layers]

    def merge_rows(self, other, width: int) -> "KVCache":
        """This cache's rows, then `other`'s, each left-padded (zeros) to `width` used columns."""
        if isinstance(other, HostKVCache):
            other = KVCache(other.used(), other.length)
        return KVCache([(ops.cat((_left_pad(k0, width), _left_pad(k1, width)), 0),
                         ops.cat((_left_pad(v0, width), _left_pad(v1, width)), 0))
                        for (k0, v0), (k1, v1) in zip(self.used(), other.used())], width)

    def take_rows(self, keep: List[int], start: int) -> "KVCache":
        """Rows `keep` (in that order), used columns from `start` on."""
        idx = Tensor(np.array(keep, dtype=np.int32))
        return KVCache([(_take(k, idx, start), _take(v, idx, start)) for k, v in self.used()], self.length - start)


def _left_pad(x, width):
    b, n, t, d = x.shape
    return x if t == width else ops.cat((ops.zeros((b, n, width - t, d), x.dtype), x), 2)


def _take(x, idx, start):
    x = ops.gather(x, idx, 0)
    return x[:, :, start:, :] if start else x


class HostKVCache:
    """KV cache in one C-contiguous host array `data` (L, 2, B, Nkv, capacity, D) float32 (k then v per layer,
    post-RoPE); columns [0, length) hold the sequence. The fused decode step writes column `length` in place and
    returns a new HostKVCache sharing the array (so a cache object must not be stepped twice). `plan` is the
    fused_decode.DecodePlan of the model it belongs to."""

    def __init__(self, data: np.ndarray, length: int, plan):
        self.data, self.length, self.plan = data, length, plan

    @property
    def capacity(self) -> int:
        return self.data.shape[4]

    @property
    def rows(self) -> int:
        return self.data.shape[2]

    @classmethod
    def empty(cls, plan, rows: int, length: int, room: int = 1) -> "HostKVCache":
        """Zeros with capacity for `length` + `room` columns."""
        shape = (plan.n_layers, 2, rows, plan.n_kv, capacity_for(length + room), plan.head_dim)
        return cls(np.zeros(shape, dtype=np.float32), length, plan)

    @classmethod
    def from_cache(cls, cache: KVCache, plan) -> "HostKVCache":
        """A host copy of a tensor KVCache (e.g. a prefill's), with free columns for the next tokens."""
        used = cache.used()
        out = cls.empty(plan, used[0][0].shape[0], cache.length)
        for i, (k, v) in enumerate(used):
            out.data[i, 0, :, :, :cache.length] = k.asnumpy()
            out.data[i, 1, :, :, :cache.length] = v.asnumpy()
        return out

    def with_capacity(self, capacity: int) -> "HostKVCache":
        shape = self.data.shape[:4] + (capacity,) + self.data.shape[5:]
        data = np.zeros(shape, dtype=np.float32)
        data[:, :, :, :, :self.length] = self.data[:, :, :, :, :self.length]
        return HostKVCache(data, self.length, self.plan)

    def used(self) -> List[Tuple[Tensor, Tensor]]:
        """Per layer (k, v) tensors (B, Nkv, length, D) (copies)."""
        n = self.length
        return [(Tensor(np.ascontiguousarray(self.data[i, 0, :, :, :n])),
                 Tensor(np.ascontiguousarray(self.data[i, 1, :, :, :n]))) for i in range(self.data.shape[0])]

    def merge_rows(self, other, width: int) -> "HostKVCache":
        """This cache's rows, then `other`'s (a KVCache or HostKVCache), each left-padded to `width` used columns."""
        if isinstance(other, KVCache):
            other = HostKVCache.from_cache(other, self.plan)
        out = HostKVCache.empty(self.plan, self.rows + other.rows, width)
        out.data[:, :, :self.rows, :, width - self.length:width] = self.data[:, :, :, :, :self.length]
        out.data[:, :, self.rows:, :, width - other.length:width] = other.data[:, :, :, :, :other.length]
        return out

    def take_rows(self, keep: List[int], start: int) -> "HostKVCache":
        """Rows `keep` (in that order), used columns from `start` on."""
        n = self.length - start
        out = HostKVCache.empty(self.plan, len(keep), n)
        out.data[:, :, :, :, :n] = self.data[:, :, keep, :, start:self.length]
        return out
