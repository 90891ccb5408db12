"""What every decoder family shares (llama.py, qwen3.py, qwen3_moe.py build on it): the MindFormers-style (B, S+1)
loss interface, attention masks, the logits head and KV-cache inference (class CausalLM)."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..errors import ConfigError
from . import decode_graph, fused_decode, kernels
from .kv_cache import HostKVCache, KVCache
from .config import LlamaConfig

MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def _cast(x, dtype):
    return x if x.dtype == dtype else ops.cast(x, dtype)


def make_mask(q_index, k_index, q_seg=None, k_seg=None):
    """Bool (B, 1, Sq, Sk): key j visible to query i iff k_index[j] <= q_index[i] (and same segment if given).

    q_index (Sq,), k_index (Sk,) are positions in the (cached) sequence; q_seg (B, Sq), k_seg (B, Sk) int.
    """
    mask = ops.expand_dims(k_index, 0) <= ops.expand_dims(q_index, 1)              # (Sq, Sk)
    mask = ops.expand_dims(ops.expand_dims(mask, 0), 0)                             # (1, 1, Sq, Sk)
    if q_seg is not None:
        same = ops.expand_dims(q_seg, 2) == ops.expand_dims(k_seg, 1)              # (B, Sq, Sk)
        mask = ops.logical_and(mask, ops.expand_dims(same, 1))
    return mask


class CausalLM(nn.Cell):
    """What every decoder family shares: the MindFormers-style (B, S+1) loss interface, masks, the logits head and
    KV-cache inference. A family implements `_decoder(tokens, position_ids, mask)` -> hidden (B, S, H),
    `_decoder_with_cache(tokens, position_ids, mask, past)` -> (hidden, presents), `_embedding_table()` and
    `_output(h)` (the untied output layer).

    Training / eval (graph-mode safe):
      construct(input_ids, labels=None, position_ids=None, segment_ids=None) -> mean token loss (fp32 scalar)
        input_ids, labels: (B, S+1) int32, UNSHIFTED as in MindFormers: the model reads tokens = input_ids[:, :-1]
        and predicts targets = labels[:, 1:] (labels None -> input_ids[:, 1:]); targets equal to
        config.ignore_token_id (-100) are not supervised. Loss = sum / max(count, 1) of loss_sum_and_count.
        position_ids, segment_ids (packing): (B, S) int32 describing the S model tokens input_ids[:, :-1].
        position_ids restart at 0 at each packed sample (default arange(S)); segment_ids are 1, 2, ... per packed
        sample and 0 for padding; attention is then causal and only within the same segment id.
      loss_sum_and_count(same inputs) -> (sum of token cross-entropies, number of supervised tokens), fp32 scalars.
      logits(input_ids, position_ids=None, segment_ids=None) -> (B, S, vocab) fp32, all positions, no shift.
    Inference with a KV cache (PyNative):
      prefill(input_ids) -> (logits of the last position (B, vocab) fp32, KVCache)
      decode_step(token_ids (B,) or (B, 1), cache) -> (logits (B, vocab) fp32, KVCache)
      forward_with_cache(input_ids (B, s), cache or None, key_mask=None, position_ids=None)
        -> (logits (B, s, vocab) fp32, KVCache)
      Prompts in a batch must have equal length, unless left-padded with key_mask and position_ids (engine.py).
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.fused = kernels.use_fused()
        if not self.fused and config.compute_dtype == "bfloat16":
            raise ConfigError("model_config.compute_dtype: 'bfloat16' needs Ascend (MindSpore's CPU backend has no "
                              "bf16 kernels); use 'float32' on CPU (param_init_type may stay 'bfloat16')")
        self.compute_dtype = MS_DTYPES[config.compute_dtype]
        self.ignore_token_id = config.ignore_token_id
        # our fused CPU kernels (attention with rotary embedding, RMSNorm, SwiGLU, cross entropy; kernels.py):
        # CPU, fp32 compute, library built
        self.cpu_kernel = (not self.fused) and self.compute_dtype == ms.float32 and kernels.cpu_kernels()
        self.tie = config.tie_word_embeddings
        self.head_matmul = ops.MatMul(transpose_b=True)
        # the logits head fused with the cross entropy (kernels.head_cross_entropy) where the head is a plain matmul;
        # MFSFT_FUSED_HEAD=0: a separate matmul and cross-entropy kernel
        self.fused_head = self.cpu_kernel and os.environ.get("MFSFT_FUSED_HEAD", "1") != "0"
        # whether training needs the gradient of the head's weight (set_head_trainable; the fused CPU head skips it)
        self.head_trainable = True

    def set_head_trainable(self, trainable: bool):
        """Whether the logits head's weight is trained (TrainStep sets it before its graphs compile)."""
        self.head_trainable = bool(trainable)

    def head_weight(self):
        """The (V, H) weight of the logits head when it is a plain matmul (tied table or plain output layer)."""
        return self._embedding_table() if self.tie else self._output_weight()

    def _head(self, h):
        """Hidden (B, S, H) -> fp32 logits (B, S, V)."""
        if self.tie:
            b, s, hd = h.shape
            w = _cast(self._embedding_table(), self.compute_dtype)
            y = ops.reshape(self.head_matmul(ops.reshape(h, (-1, hd)), w), (b, s, -1))
        else:
            y = self._output(h)
        return _cast(y, ms.float32)

    def _attention_mask(self, b, s, segment_ids):
        """What every layer's attention gets, built once per forward: the visibility spec (q_index, k_index,
        q_seg, k_seg) for the fused CPU kernel, the fp32 additive mask for basic ops on CPU, the bool mask
        (B, 1, S, S) on Ascend."""
        index = ops.arange(s, dtype=ms.int32)
        if self.cpu_kernel:
            seg = ops.zeros((b, s), ms.int32) if segment_ids is None else ops.cast(segment_ids, ms.int32)
            return (index, index, seg, seg)
        mask = ops.broadcast_to(make_mask(index, index, segment_ids, segment_ids), (b, 1, s, s))
        return mask if self.fused else kernels.attention_bias(mask)

    def _inputs(self, input_ids, position_ids, segment_ids):
        """(position_ids, attention mask) for tokens (B, S)."""
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = ops.broadcast_to(ops.expand_dims(ops.arange(s, dtype=ms.int32), 0), (b, s))
        return position_ids, self._attention_mask(b, s, segment_ids)

    def logits(self, input_ids, position_ids=None, segment_ids=None):
        position_ids, mask = self._inputs(input_ids, position_ids, segment_ids)
        return self._head(self._decoder(input_ids, position_ids, mask))

    def _output_weight(self):
        """The untied output layer's weight (V, H) when that layer is a plain matmul (no bias, no adapter), else
        None. Families override it; None keeps the head a separate op."""
        return None

    def _ce_sum_and_count(self, h, targets):
        """(sum of token cross-entropies, count of supervised targets) of hidden h (B, S, H) vs targets (B, S)."""
        targets = ops.cast(ops.reshape(targets, (-1,)), ms.int32)
        valid = targets != self.ignore_token_id
        safe = ops.select(valid, targets, ops.zeros_like(targets))
        validf = ops.cast(valid, ms.float32)
        weight = self.head_weight() if self.fused_head else None
        if weight is not None:     # the head and the cross entropy in one CPU kernel
            skip = ops.select(valid, targets, ops.full_like(targets, -1))   # rows without a target: no work
            loss = kernels.head_cross_entropy(ops.reshape(h, (-1, h.shape[-1])), _cast(weight, ms.float32), skip,
                                              self.head_trainable)
        else:
            logits = self._head(h)
            loss = kernels.cross_entropy(ops.reshape(logits, (-1, logits.shape[-1])), safe, self.cpu_kernel)
        return ops.sum(loss * validf), ops.sum(validf)

    def loss_sum_and_count(self, input_ids, labels=None, position_ids=None, segment_ids=None):
        tokens = input_ids[:, :-1]
        targets = labels[:, 1:] if labels is not None else input_ids[:, 1:]
        position_ids, mask = self._inputs(tokens, position_ids, segment_ids)
        return self._ce_sum_and_count(self._decoder(tokens, position_ids, mask), targets)

    def construct(self, input_ids, labels=None, position_ids=None, segment_ids=None):
        loss_sum, count = self.loss_sum_and_count(input_ids, labels, position_ids, segment_ids)
        return loss_sum / ops.maximum(count, 1.0)

    # ---- KV-cache inference (PyNative) ----
    def forward_with_cache(self, input_ids, cache: Optional[KVCache] = None, key_mask=None, position_ids=None,
                           last_only=False):
        """key_mask: bool (B, cache length + s), False at (left-)padding keys, which no query sees;
        position_ids: int (B, s) rotary positions per row (default: cache length + arange(s));
        last_only: only the last position's logits are needed ((B, 1, V) may be returned; numpy inputs without
        a cache then run as the fused CPU step (fused_decode.prefill) or one compiled graph per shape
        (decode_graph.prefill)).
        One token per row after a cache runs as the fused CPU decode step (fused_decode.py; the returned cache is
        then a HostKVCache) where it applies, else as decode_graph's compiled step."""
        if (last_only and cache is None and key_mask is not None and position_ids is not None
                and not isinstance(input_ids, Tensor)):
            out = fused_decode.prefill(self, input_ids, key_mask, position_ids)
            if out is not None:
                return out
            if decode_graph.enabled():
                return decode_graph.prefill(self, np.asarray(input_ids, np.int32), np.asarray(key_mask, np.bool_),
                                            np.asarray(position_ids, np.int32))
        if cache is not None and np.shape(input_ids)[1] == 1:     # one token per row: the fused step, or a graph
            out = fused_decode.decode(self, input_ids, cache, key_mask, position_ids)
            if out is not None:
                return out
        if isinstance(cache, HostKVCache):      # a fused step's cache, now continued layer by layer
            cache = KVCache(cache.used(), cache.length)
        input_ids = Tensor(np.asarray(input_ids, dtype=np.int32)) if not isinstance(input_ids, Tensor) else input_ids
        b, s = input_ids.shape
        if cache is not None and s == 1 and decode_graph.enabled():
            return decode_graph.decode(self, input_ids, cache, key_mask, position_ids)
        start = cache.length if cache is not None else 0
        q_index = ops.arange(start, start + s, dtype=ms.int32)
        k_index = ops.arange(0, start + s, dtype=ms.int32)
        mask = ops.broadcast_to(make_mask(q_index, k_index), (b, 1, s, start + s))
        if key_mask is not None:
            keys = Tensor(np.asarray(key_mask, dtype=np.bool_)) if not isinstance(key_mask, Tensor) else key_mask
            mask = ops.logical_and(mask, ops.reshape(keys, (b, 1, 1, start + s)))
        if position_ids is not None:
            position_ids = (Tensor(np.asarray(position_ids, dtype=np.int32)) if not isinstance(position_ids, Tensor)
                            else position_ids)
        else:
            position_ids = ops.broadcast_to(ops.expand_dims(q_index, 0), (b, s))
        h, presents = self._decoder_with_cache(input_ids, position_ids, mask,
                                               cache.used() if cache is not None else None)
        return self._head(h), KVCache(presents, start + s)

    def prefill(self, input_ids):
        logits, cache = self.forward_with_cache(input_ids, None)
        return logits[:, -1], cache

    def decode_step(self, token_ids, cache: KVCache):
        ids = np.asarray(token_ids.asnumpy() if isinstance(token_ids, Tensor) else token_ids, dtype=np.int32)
        logits, cache = self.forward_with_cache(ids.reshape(-1, 1), cache)
        return logits[:, -1], cache
