"""The compiled decode step (KV-cache generation, one new token per row): a static cache and one graph per shape.

The cache of every layer is preallocated as (B, Nkv, capacity, D) (capacity: a power of two >= 256 that holds
the sequence); the step writes the new token's k, v into column `length` (a one-hot blend, exact) and attends
over all columns with an additive mask that hides free columns and left padding. Every input therefore has the
same shape from step to step, and the whole step (embedding, layers, head) runs as ONE MindSpore graph
(`mindspore.jit`) compiled once per (batch, capacity) instead of ~20 PyNative ops per layer.
The new token's key is attended as the last column of (cache ++ new) inside the layer (the layers' usual cached
path, unchanged); only the order of the softmax sum differs from the concatenating cache (float rounding).
`MFSFT_GRAPH_DECODE=0` turns it off (the concatenating PyNative path of CausalLM.forward_with_cache).
"""
from __future__ import annotations

import os

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from . import kernels
from .kv_cache import MIN_CAPACITY, KVCache, capacity_for, power_of_two_at_least  # noqa: F401  (re-exported)


def enabled() -> bool:
    return os.environ.get("MFSFT_GRAPH_DECODE", "1") != "0"


class DecodeGraph(nn.Cell):
    """construct(tokens (B, 1), position_ids (B, 1), mask (B, 1, 1, C+1), slot (1, 1, C, 1), caches (k0, v0, k1,
    ...)) -> (logits (B, 1, V) fp32, new caches); `shapes` lists the (batch, capacity) shapes seen."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.n_layers = len(model.decoder_layers())
        self.shapes = []

    @ms.jit(jit_level="O1", backend="ms_backend")   # O1: operator fusion, about half the kernels of O0
    def construct(self, tokens, position_ids, mask, slot, caches):
        past = []
        for i in range(self.n_layers):
            past.append((caches[2 * i], caches[2 * i + 1]))
        h, presents = self.model._decoder_with_cache(tokens, position_ids, mask, past)
        logits = self.model._head(h)
        keep = 1.0 - slot
        out = ()
        for i in range(self.n_layers):
            k, v = presents[i]
            out = out + (caches[2 * i] * keep + k[:, :, -1:] * slot, caches[2 * i + 1] * keep + v[:, :, -1:] * slot)
        return logits, out


def graph_of(model) -> DecodeGraph:
    """The model's DecodeGraph (made once; kept outside the Cell tree so it adds no parameters)."""
    g = model.__dict__.get("_decode_graph")
    if g is None:
        g = DecodeGraph(model)
        object.__setattr__(model, "_decode_graph", g)
    return g


def _pad_right(x, width):
    b, n, t, d = x.shape
    return x if t == width else ops.cat((x, ops.zeros((b, n, width - t, d), x.dtype)), 2)


def decode(model, input_ids, cache, key_mask=None, position_ids=None):
    """One token per row (input_ids (B, 1) int32 Tensor) after `cache` (a KVCache of `length` tokens); key_mask
    (B, length + 1) bool or None, position_ids (B, 1) or None as CausalLM.forward_with_cache.
    Returns (logits (B, 1, V) fp32, KVCache of length + 1 with a static capacity)."""
    b, t = input_ids.shape[0], cache.length
    cap, layers = cache.capacity, cache.layers
    if cap <= t:
        cap = capacity_for(t + 1)
        layers = [(_pad_right(k, cap), _pad_right(v, cap)) for k, v in cache.used()]
    keys = np.zeros((b, cap + 1), dtype=np.bool_)
    if key_mask is None:
        keys[:, :t] = True
        keys[:, cap] = True
    else:
        km = key_mask.asnumpy() if isinstance(key_mask, Tensor) else np.asarray(key_mask, dtype=np.bool_)
        keys[:, :t], keys[:, cap] = km[:, :t], km[:, t]
    keys = keys.reshape(b, 1, 1, cap + 1)
    mask = Tensor(keys) if model.fused else Tensor(np.where(keys, 0.0, kernels.NEG_INF).astype(np.float32))
    dtype = layers[0][0].dtype
    slot = np.zeros((1, 1, cap, 1), dtype=np.float32)
    slot[0, 0, t, 0] = 1.0
    if position_ids is None:
        position_ids = np.full((b, 1), t, dtype=np.int32)
    elif isinstance(position_ids, Tensor):
        position_ids = position_ids.asnumpy()
    g = graph_of(model)
    if (b, cap) not in g.shapes:
        g.shapes.append((b, cap))
    flat = tuple(x for kv in layers for x in kv)
    logits, new = g(input_ids, Tensor(np.asarray(position_ids, dtype=np.int32).reshape(b, 1)), mask,
                    ops.cast(Tensor(slot), dtype), ms.mutable(flat))
    return logits, KVCache([(new[2 * i], new[2 * i + 1]) for i in range(len(layers))], t + 1)


MIN_PREFILL = 32


def prefill_width(length: int) -> int:
    """Columns a batch of prompts is left-padded to for the compiled prefill: a power of two >= MIN_PREFILL."""
    return power_of_two_at_least(length, MIN_PREFILL)


class PrefillGraph(nn.Cell):
    """construct(tokens (B, S), position_ids (B, S), mask (B, 1, S, S)) -> (logits of the last position (B, 1, V)
    fp32, (k0, v0, k1, ...) each (B, Nkv, S, D)); `shapes` lists the (batch, width) shapes seen."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.n_layers = len(model.decoder_layers())
        self.shapes = []

    @ms.jit
    def construct(self, tokens, position_ids, mask):
        h, presents = self.model._decoder_with_cache(tokens, position_ids, mask, None)
        logits = self.model._head(h[:, -1:])
        out = ()
        for i in range(self.n_layers):
            k, v = presents[i]
            out = out + (k, v)
        return logits, out


def prefill(model, input_ids: np.ndarray, key_mask: np.ndarray, position_ids: np.ndarray):
    """Left-padded prompts (B, S) int32 (S best a prefill_width, so the graph is reused), key_mask (B, S) bool
    (False at padding), position_ids (B, S) -> (logits of the last position (B, 1, V) fp32, KVCache of S)."""
    b, s = input_ids.shape
    keys = np.tril(np.ones((s, s), dtype=np.bool_))[None, None] & np.asarray(key_mask, np.bool_)[:, None, None, :]
    mask = Tensor(keys) if model.fused else Tensor(np.where(keys, 0.0, kernels.NEG_INF).astype(np.float32))
    g = model.__dict__.get("_prefill_graph")
    if g is None:
        g = PrefillGraph(model)
        object.__setattr__(model, "_prefill_graph", g)
    if (b, s) not in g.shapes:
        g.shapes.append((b, s))
    logits, new = g(Tensor(np.asarray(input_ids, np.int32)), Tensor(np.asarray(position_ids, np.int32)), mask)
    return logits, KVCache([(new[2 * i], new[2 * i + 1]) for i in range(len(new) // 2)], s)
