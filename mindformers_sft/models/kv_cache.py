"""The KV cache of cached generation, shared by the eager path (causal_lm.py) and the compiled decode step
(decode_graph.py)."""
from __future__ import annotations

from typing import List, Tuple

from mindspore import Tensor


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
