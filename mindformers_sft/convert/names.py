"""Hugging Face <-> MindFormers parameter names for the Llama family (Llama-2/3, Qwen2/2.5).

MindFormers names (as in its llama/qwen2_5 convert_weight.py `name_replace`):
  model.tok_embeddings.embedding_weight            <- model.embed_tokens.weight
  model.layers.N.attention.wq|wk|wv|wo.weight|bias <- model.layers.N.self_attn.q|k|v|o_proj.weight|bias
  model.layers.N.feed_forward.w1|w2|w3.weight      <- model.layers.N.mlp.gate|down|up_proj.weight
  model.layers.N.attention_norm.weight             <- model.layers.N.input_layernorm.weight
  model.layers.N.ffn_norm.weight                   <- model.layers.N.post_attention_layernorm.weight
  model.norm_out.weight                            <- model.norm.weight
  lm_head.weight                                   <- lm_head.weight
Both layouts store Dense weights as (out_features, in_features) and q/k in the same (rotate-half) order,
so conversion is a rename: values are copied bit for bit.
"""
from __future__ import annotations

import re

from ..errors import CheckpointError

_LAYER = r"model\.layers\.(\d+)\."
# (HF pattern, MindFormers pattern), both with one layer-index group where relevant.
_PAIRS = [
    (r"model\.embed_tokens\.weight", "model.tok_embeddings.embedding_weight"),
    (r"model\.norm\.weight", "model.norm_out.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]
_LAYER_PAIRS = [
    ("self_attn.q_proj.", "attention.wq."),
    ("self_attn.k_proj.", "attention.wk."),
    ("self_attn.v_proj.", "attention.wv."),
    ("self_attn.o_proj.", "attention.wo."),
    ("mlp.gate_proj.", "feed_forward.w1."),
    ("mlp.down_proj.", "feed_forward.w2."),
    ("mlp.up_proj.", "feed_forward.w3."),
    ("input_layernorm.", "attention_norm."),
    ("post_attention_layernorm.", "ffn_norm."),
]
_HF_LAYER_RE = re.compile(_LAYER + r"(.+?\.)(weight|bias)$")
_MF_LAYER_RE = re.compile(_LAYER + r"(.+?\.)(weight|bias)$")
_HF2MF_LAYER = dict(_LAYER_PAIRS)
_MF2HF_LAYER = {v: k for k, v in _LAYER_PAIRS}
_HF2MF_TOP = {p.replace("\\", ""): m for p, m in _PAIRS}
_MF2HF_TOP = {m: p for p, m in _HF2MF_TOP.items()}

# HF names that carry no weights we need (rotary caches in old checkpoints).
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_to_mf(name: str, source: str = "") -> str:
    """MindFormers name of a HF parameter name; CheckpointError naming the tensor if it is not a Llama weight."""
    if name in _HF2MF_TOP:
        return _HF2MF_TOP[name]
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _HF2MF_LAYER:
        return f"model.layers.{m.group(1)}.{_HF2MF_LAYER[m.group(2)]}{m.group(3)}"
    where = f"{source}: " if source else ""
    raise CheckpointError(f"{where}tensor '{name}' is not a Llama/Qwen2 weight name (expected e.g. "
                          "'model.layers.0.self_attn.q_proj.weight')")


def mf_to_hf(name: str, source: str = "") -> str:
    """HF name of a MindFormers parameter name; CheckpointError naming the tensor if unknown."""
    if name in _MF2HF_TOP:
        return _MF2HF_TOP[name]
    m = _MF_LAYER_RE.match(name)
    if m and m.group(2) in _MF2HF_LAYER:
        return f"model.layers.{m.group(1)}.{_MF2HF_LAYER[m.group(2)]}{m.group(3)}"
    where = f"{source}: " if source else ""
    raise CheckpointError(f"{where}tensor '{name}' is not a MindFormers Llama parameter name (expected e.g. "
                          "'model.layers.0.attention.wq.weight')")


def is_ignored_hf(name: str) -> bool:
    return name.endswith(HF_IGNORED_SUFFIXES)


# Entries of MindFormers training checkpoints that are not model weights (optimizer state, counters).
MF_IGNORED_PREFIXES = ("adam_m.", "adam_v.", "accu_grads.", "moment1.", "moment2.", "moments.", "optimizer.")
MF_IGNORED_NAMES = frozenset({"global_step", "epoch_num", "step_num", "loss_scale", "scale_sense",
                              "current_iterator_step", "last_overflow_iterator_step", "learning_rate",
                              "beta1_power", "beta2_power"})
# Training-time statistics of MindFormers 1.8 mcore layers (router load counters, expert load history, max
# attention logits): not weights, absent from Hugging Face models. (`router.expert_bias`, a routing parameter,
# is not skipped: Qwen3-MoE has none, so a checkpoint carrying one is refused by name.)
MF_IGNORED_SUFFIXES = (".router.fi_accu", ".router.expert_load", ".expert_load_history", ".expert_load_history_cnt",
                       ".experts.num_tokens_per_expert", ".max_logits_val")


def is_ignored_mf(name: str) -> bool:
    """True for optimizer states and training counters stored in MindFormers checkpoints."""
    return name in MF_IGNORED_NAMES or name.startswith(MF_IGNORED_PREFIXES) or name.endswith(MF_IGNORED_SUFFIXES)
