"""Which tensors a model has on each side, with shapes, and how they convert: one :class:`~.plan.Layout` per
model family and config.

Llama family (Llama-2/3, Qwen2/2.5): every tensor is a rename (:mod:`.names`).
Qwen3 / Qwen3-MoE: fused q/k/v and gate/up, stacked experts (:mod:`.layout_qwen3`).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Optional, Tuple

from ..config.model_config import LlamaConfig
from .names import hf_to_mf, mf_to_hf
from .layout_qwen3 import qwen3_layout
from .plan import Layout, rename


def llama_shapes(config: LlamaConfig) -> "OrderedDict[str, Tuple[int, ...]]":
    """MindFormers parameter name -> shape for `config`, in model order.

    q/k/v biases only with ``qkv_has_bias``; no ``lm_head.weight`` with ``tie_word_embeddings``.
    Dense weights are (out_features, in_features), as in both HF and MindFormers.
    """
    h, v, ff = config.hidden_size, config.vocab_size, config.intermediate_size
    hd = config.head_dim
    q, kv = config.num_heads * hd, config.n_kv_heads * hd
    out = OrderedDict()
    out["model.tok_embeddings.embedding_weight"] = (v, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        out[p + "attention.wq.weight"] = (q, h)
        out[p + "attention.wk.weight"] = (kv, h)
        out[p + "attention.wv.weight"] = (kv, h)
        if config.qkv_has_bias:
            out[p + "attention.wq.bias"] = (q,)
            out[p + "attention.wk.bias"] = (kv,)
            out[p + "attention.wv.bias"] = (kv,)
        out[p + "attention.wo.weight"] = (h, q)
        out[p + "feed_forward.w1.weight"] = (ff, h)
        out[p + "feed_forward.w2.weight"] = (h, ff)
        out[p + "feed_forward.w3.weight"] = (ff, h)
        out[p + "attention_norm.weight"] = (h,)
        out[p + "ffn_norm.weight"] = (h,)
    out["model.norm_out.weight"] = (h,)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    return out


def _config_facts(c: LlamaConfig) -> str:
    return (f"vocab_size={c.vocab_size}, hidden_size={c.hidden_size}, num_layers={c.num_layers}, "
            f"num_heads={c.num_heads}, n_kv_heads={c.n_kv_heads}, intermediate_size={c.intermediate_size}, "
            f"qkv_has_bias={c.qkv_has_bias}, tie_word_embeddings={c.tie_word_embeddings}")


def llama_layout(config: LlamaConfig) -> Layout:
    mf = llama_shapes(config)
    hf = OrderedDict((mf_to_hf(k), s) for k, s in mf.items())
    return Layout([rename(mf_to_hf(k), k) for k in mf], hf, mf, hf_to_mf, mf_to_hf, _config_facts(config),
                  tied_head=("lm_head.weight",) if config.tie_word_embeddings else (), family=config.model_type)


def layout_for(config: LlamaConfig, mf_names: Optional[Iterable[str]] = None) -> Layout:
    """The layout of `config`'s model family. For Qwen3, `mf_names` (the tensors of a MindFormers input) pick
    the fused (``linear_qkv``, the default) or split (``linear_q``, ``qkv_concat: False``) layout."""
    if not config.is_qwen3:
        return llama_layout(config)
    fused = config.qkv_concat
    for n in mf_names or ():
        if n.endswith(("self_attention.linear_q.weight", "mlp.gating.weight")):
            fused = False
            break
        if n.endswith(("self_attention.linear_qkv.weight", "mlp.linear_fc1.weight")):
            fused = True
            break
    return qwen3_layout(config, fused)


def expected_shapes(config: LlamaConfig) -> "OrderedDict[str, Tuple[int, ...]]":
    """MindFormers parameter name -> shape for `config`, in model order."""
    return layout_for(config).mf_shapes


def expected_hf_shapes(config: LlamaConfig) -> "OrderedDict[str, Tuple[int, ...]]":
    """Hugging Face parameter name -> shape for `config`, in model order."""
    return layout_for(config).hf_shapes
