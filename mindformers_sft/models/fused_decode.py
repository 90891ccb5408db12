"""The fused CPU decode step: one new token per row through the whole decoder in ONE kernel call.

On CPU a decode step of a small model is ~100 tiny ops, and MindSpore's launch cost per op (or per compiled graph
call) is far larger than their arithmetic. `MfsftDecodeStep` (cpu_decode_kernels.cc, in the library of the other
fused CPU kernels, called directly through ctypes: see _call_native) runs embedding, every layer and the logits in
one call:

  * the weights are read in place: the op gets one int64 `table` with the data pointers of the model's
    parameters (and the layout of fused projections), written by `DecodePlan` from the family's
    `decode_layout()` (llama.py, qwen3.py; a family without it, or with a MoE layer, uses decode_graph.py);
  * the KV cache is a host array (kv_cache.HostKVCache) that the op appends the new token's k and v to in place;
  * LoRA adapters (unmerged, dropout off at inference) are applied inside, so a LoRA checkpoint decodes as fast.

Used by CausalLM.forward_with_cache for one token per row when the fused CPU kernels are built and every weight is
fp32 (CPU compute); `MFSFT_FUSED_DECODE=0` turns it off. The table is rebuilt whenever a host cache is made from a
prefill, so weights loaded between generations are picked up; the parameters must not change while a cache is in
use (they do not: generation never trains). Numerics: fp32, exact softmax, the same formulas as the layers; it
differs from the layer-by-layer path by float rounding only (summation order).
"""
from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor

from . import kernels
from .kv_cache import HostKVCache, KVCache, capacity_for

# table layout: the k* constants of cpu_decode_kernels.cc
_HEADER, _LIN, _LINEARS = 20, 6, 7
_PER_LAYER = 4 + _LIN * _LINEARS
(_LAYERS, _HIDDEN, _HEADS, _KV_HEADS, _HEAD_DIM, _INTER, _VOCAB, _QKV_MODE, _MLP_MODE, _EPS, _EMBED, _FINAL_NORM,
 _OUTPUT, _INV_FREQ, _CACHE, _CAPACITY, _CACHE_ROWS) = range(17)
SEPARATE, FUSED, INTERLEAVED = 0, 1, 2     # modes of q|k|v and gate|up


@dataclass
class LayerWeights:
    """One decoder layer for the fused step. linears: the Linear (or LoRA-wrapped) cells in the order
    q, k, v, o, gate, up, down; with a fused projection (mode FUSED / INTERLEAVED) the fused cell stands at q
    (resp. gate) and k, v (resp. up) are None."""
    attn_norm: object
    ffn_norm: object
    q_norm: object
    k_norm: object
    linears: List[object]


@dataclass
class DecodeLayout:
    """What a family's `decode_layout()` returns: the parameters the fused step reads, and their layout."""
    layers: List[LayerWeights]
    qkv_mode: int
    mlp_mode: int
    embedding: object       # Parameter (V, H)
    final_norm: object      # Parameter (H,)
    output: object          # Parameter (V, H): the output layer's weight, or the embedding when tied
    inv_freq: Tensor        # (.., D/2) rotary inverse frequencies


def enabled() -> bool:
    return os.environ.get("MFSFT_FUSED_DECODE", "1") != "0"


def _ptr(p) -> int:
    if p is None:
        return 0
    if getattr(p, "has_init", False):
        p.init_data()
    if p.dtype != ms.float32:
        raise _Unsupported
    return int(p.data_ptr())


class _Unsupported(Exception):
    """A weight the fused step cannot read (not fp32): decode_graph.py is used instead."""


def _linear_slots(cell) -> list:
    if cell is None:
        return [0] * _LIN
    if hasattr(cell, "lora_a") and hasattr(cell, "base"):       # pet/lora.py's LoraLinear (dropout off)
        base = cell.base
        return [_ptr(base.weight), _ptr(base.bias), _ptr(cell.lora_a), _ptr(cell.lora_b), int(cell.rank),
                _f32_bits(cell.scaling)]
    if not hasattr(cell, "weight"):
        raise _Unsupported
    return [_ptr(cell.weight), _ptr(getattr(cell, "bias", None)), 0, 0, 0, 0]


def _f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


class DecodePlan:
    """The int64 table of one model's weights for MfsftDecodeStep (header + one block per layer)."""

    def __init__(self, model, layout: DecodeLayout):
        cfg = model.config
        self.n_layers, self.n_kv, self.head_dim = len(layout.layers), cfg.n_kv_heads, cfg.head_dim
        self.vocab = cfg.vocab_size
        self._inv_freq = np.ascontiguousarray(layout.inv_freq.asnumpy().reshape(-1), dtype=np.float32)
        t = np.zeros(_HEADER + _PER_LAYER * self.n_layers, dtype=np.int64)
        t[[_LAYERS, _HIDDEN, _HEADS, _KV_HEADS, _HEAD_DIM, _INTER, _VOCAB, _QKV_MODE, _MLP_MODE]] = [
            self.n_layers, cfg.hidden_size, cfg.num_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size,
            cfg.vocab_size, layout.qkv_mode, layout.mlp_mode]
        t[_EPS] = _f32_bits(cfg.rms_norm_eps)
        t[_EMBED], t[_FINAL_NORM], t[_OUTPUT] = (_ptr(layout.embedding), _ptr(layout.final_norm),
                                                 _ptr(layout.output))
        t[_INV_FREQ] = self._inv_freq.ctypes.data
        for i, lw in enumerate(layout.layers):
            base = _HEADER + i * _PER_LAYER
            t[base:base + 4] = [_ptr(lw.attn_norm), _ptr(lw.ffn_norm), _ptr(lw.q_norm), _ptr(lw.k_norm)]
            t[base + 4:base + _PER_LAYER] = [s for cell in lw.linears for s in _linear_slots(cell)]
        self.table = t
        self._layout = layout          # keeps every parameter read through the table alive

    def run(self, tokens: np.ndarray, positions: np.ndarray, key_mask: np.ndarray, cache: HostKVCache) -> Tensor:
        """Logits (B, 1, V) fp32 Tensor of each row's last token; tokens, positions (B, S), key_mask (B, length + S);
        appends the S new columns of k, v to `cache` in place (columns length .. length + S - 1)."""
        t = self.table.copy()
        t[_CACHE], t[_CAPACITY], t[_CACHE_ROWS] = cache.data.ctypes.data, cache.capacity, cache.rows
        logits = np.empty((tokens.shape[0], 1, self.vocab), dtype=np.float32)
        _call_native((tokens, positions, key_mask, t, logits))
        return Tensor.from_numpy(logits)


# The kernel is host code on host arrays, so it is called directly (ctypes) rather than as a MindSpore op: a PyNative
# op launch costs ~0.4 ms on CPU, ten times a small model's whole decode step. ctypes releases the GIL during the
# call (a server's event loop runs meanwhile), and the call returns when the step is done, while every array it
# reads and writes through raw pointers (the table, the cache, the plan's inv_freq) is certainly alive.
_NATIVE = {}
_DTYPES = {np.dtype(np.int32): b"int32", np.dtype(np.bool_): b"bool", np.dtype(np.int64): b"int64",
           np.dtype(np.float32): b"float32"}


def _call_native(arrays):
    """MfsftDecodeStep(nparam, params, ndims, shapes, dtypes, stream, extra) on C-contiguous numpy arrays (inputs,
    then the output): the aot convention of every kernel of the library (cpu_kernels.cc, MFSFT_OP)."""
    fn = _NATIVE.get("fn")
    if fn is None:
        lib = ctypes.CDLL(kernels.cpu_kernel_library())
        fn = lib.MfsftDecodeStep
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int),
                       ctypes.POINTER(ctypes.POINTER(ctypes.c_int64)), ctypes.POINTER(ctypes.c_char_p),
                       ctypes.c_void_p, ctypes.c_void_p]
        _NATIVE.update(fn=fn, lib=lib)
    n = len(arrays)
    if not all(x.flags.c_contiguous for x in arrays):
        raise ValueError("fused decode step: the arrays must be C-contiguous")
    shapes = [np.asarray(x.shape, dtype=np.int64) for x in arrays]
    rc = fn(n, (ctypes.c_void_p * n)(*[x.ctypes.data for x in arrays]), (ctypes.c_int * n)(*[x.ndim for x in arrays]),
            (ctypes.POINTER(ctypes.c_int64) * n)(*[sh.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)) for sh in shapes]),
            (ctypes.c_char_p * n)(*[_DTYPES[x.dtype] for x in arrays]), None, None)
    if rc != 0:
        raise RuntimeError(f"MfsftDecodeStep failed (code {rc}) on {[(x.dtype.name, x.shape) for x in arrays]}")


def plan_for(model) -> Optional[DecodePlan]:
    """A DecodePlan of the model's current weights, or None when the fused step does not apply (turned off, no CPU
    kernels, a family or layer without `decode_layout`, a weight that is not fp32)."""
    if not (enabled() and getattr(model, "cpu_kernel", False) and hasattr(model, "decode_layout")):
        return None
    layout = model.decode_layout()
    if layout is None:
        return None
    try:
        return DecodePlan(model, layout)
    except _Unsupported:
        return None


# a prefill of more tokens than this (rows x width) runs as decode_graph's compiled graph (MindSpore's matmuls)
MAX_PREFILL_TOKENS = 4096


def prefill(model, input_ids: np.ndarray, key_mask: np.ndarray, position_ids: np.ndarray):
    """Left-padded prompts (B, S) int32, key_mask (B, S) bool (False at padding), position_ids (B, S) -> (logits of
    the last position (B, 1, V) fp32 Tensor, HostKVCache of the used columns), or None when the fused step does
    not apply (the caller then uses decode_graph.prefill). Leading columns that only padding uses are dropped."""
    keys = np.asarray(key_mask, np.bool_)
    start = int(np.argmax(keys.any(0))) if keys.any() else 0
    ids = np.ascontiguousarray(np.asarray(input_ids, np.int32)[:, start:])
    if ids.size > MAX_PREFILL_TOKENS:
        return None
    plan = plan_for(model)
    if plan is None:
        return None
    cache = HostKVCache.empty(plan, ids.shape[0], 0, ids.shape[1])
    logits = plan.run(ids, np.ascontiguousarray(np.asarray(position_ids, np.int32)[:, start:]),
                      np.ascontiguousarray(keys[:, start:]), cache)
    return logits, HostKVCache(cache.data, ids.shape[1], plan)


def decode(model, input_ids, cache, key_mask=None, position_ids=None):
    """One token per row (input_ids (B, 1)) after `cache` (a KVCache from a prefill, or the HostKVCache of the
    previous fused step); key_mask (B, length + 1) bool or None, position_ids (B, 1) or None as
    CausalLM.forward_with_cache. Returns (logits (B, 1, V) fp32 Tensor, HostKVCache of length + 1), or None when
    the fused step does not apply to this model (the caller then uses decode_graph)."""
    if isinstance(cache, HostKVCache):
        plan = cache.plan
    else:
        plan = plan_for(model)
        if plan is None:
            return None
        cache = HostKVCache.from_cache(cache, plan)
    ids = np.ascontiguousarray(_numpy(input_ids, np.int32).reshape(-1, 1))
    b, t = ids.shape[0], cache.length
    if cache.capacity <= t:
        cache = cache.with_capacity(capacity_for(t + 1))
    if key_mask is None:
        keys = np.ones((b, t + 1), dtype=np.bool_)
    else:
        keys = np.ascontiguousarray(_numpy(key_mask, np.bool_)[:, :t + 1])
    if position_ids is None:
        positions = np.full((b, 1), t, dtype=np.int32)
    else:
        positions = np.ascontiguousarray(_numpy(position_ids, np.int32).reshape(-1, 1))
    logits = plan.run(ids, positions, keys, cache)
    return logits, HostKVCache(cache.data, t + 1, plan)     # shares the array (the new column is written in it)


def _numpy(x, dtype):
    return np.asarray(x.asnumpy() if isinstance(x, Tensor) else x, dtype=dtype)


__all__ = ["DecodeLayout", "LayerWeights", "DecodePlan", "SEPARATE", "FUSED", "INTERLEAVED", "decode", "prefill",
           "plan_for",
           "enabled", "KVCache"]
