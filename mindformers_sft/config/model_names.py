"""MindFormers 1.6+ `model.model_config` names (use_legacy: False) -> the names of config/model_config.py.

The new configs describe a model with Megatron-style names (`params_dtype`, `layernorm_compute_dtype`,
`untie_embeddings_and_output_weights`, ...) and, when there is no `pretrained_model_dir`, with Hugging Face
names (`num_hidden_layers`, `num_attention_heads`, `rope_theta`, ...). `translate` renames them, drops the
ones that change nothing here (listed in the log once, see config.no_effect_lines), and refuses values this
decoder cannot honour. Keys it does not know are passed on, so LlamaConfig.from_dict still names the closest
key of a typo.
"""
from __future__ import annotations

from ..errors import ConfigError

# Renames beyond the HF names model_config.py already takes (its KEY_ALIASES, passed to translate()).
RENAMES = {
    "add_qkv_bias": "qkv_has_bias",
    "moe_aux_loss_coeff": "router_aux_loss_coef",
}

# Accepted with any value: they select kernels, layouts or parallel placement, not the arithmetic.
NO_EFFECT = {
    "qkv_concat", "input_sliced_sig", "use_contiguous_weight_layout_attention", "offset", "fp32_residual_connection",
    "architectures", "moe_grouped_gemm", "router_dense_type", "moe_token_drop_policy", "moe_router_load_balancing_type",
    "use_fused_rope", "use_fused_swiglu", "recompute_granularity", "sequence_parallel", "bias_swiglu_fusion",
    "masked_softmax_fusion", "apply_residual_connection_post_layernorm", "init_method_std", "transformers_version",
    "torch_dtype", "use_cache", "use_sliding_window", "sliding_window", "max_window_layers",
}
# Accepted only with the value this decoder implements.
FIXED = {
    "hidden_dropout": 0.0, "attention_dropout": 0.0, "position_embedding_type": "rope", "hidden_act": "silu",
    "gated_linear_unit": True, "add_bias_linear": False, "normalization": "RMSNorm", "moe_router_pre_softmax": True,
}


def translate(mc: dict, fields, aliases=None, where: str = "model.model_config"):
    """-> (model_config with this suite's names, [dropped keys]). `fields`: the names LlamaConfig accepts,
    `aliases`: the other names it takes for them (HF name -> field)."""
    out, dropped = {}, []
    fields = set(fields)
    renames = {**(aliases or {}), **RENAMES}
    for k, v in (mc or {}).items():
        if k in fields:
            out[k] = v
        elif k == "untie_embeddings_and_output_weights":
            tie = not bool(v)
            if "tie_word_embeddings" in mc and bool(mc["tie_word_embeddings"]) != tie:
                raise ConfigError(f"{where}: untie_embeddings_and_output_weights {v} contradicts tie_word_embeddings "
                                  f"{mc['tie_word_embeddings']}; keep one of them")
            out["tie_word_embeddings"] = tie
        elif k in renames:
            new = renames[k]
            if new in mc and mc[new] != v:
                raise ConfigError(f"{where}: {k} {v!r} and {new} {mc[new]!r} name the same setting with different "
                                  f"values; keep one of them")
            if new in fields:
                out[new] = v
            else:
                dropped.append(k)
        elif k in FIXED:
            if v != FIXED[k]:
                raise ConfigError(f"{where}.{k}: {v!r} is not supported here; this decoder implements "
                                  f"{k}: {FIXED[k]!r}")      # the value implemented: honoured, nothing to pass
        elif k in NO_EFFECT:
            dropped.append(k)
        else:
            out[k] = v
    return out, dropped
