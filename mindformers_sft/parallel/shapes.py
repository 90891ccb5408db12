"""The tensor shapes of each model family that the planner, the shard strategies and the layouts need.

A config is read with getattr and defaults, so a Llama/Qwen2 `LlamaConfig` and a Qwen3 / Qwen3-MoE config (explicit
`head_dim`, q/k norms, experts) go through the same code:

  family      names of one decoder layer's projections              q/k norm  MLP
  llama/qwen2 model.layers.N.attention.wq|wk|wv|wo,                 no        dense SwiGLU
              model.layers.N.feed_forward.w1|w3|w2
  qwen3       decoder.layers.N.self_attention.linear_qkv (fused q, k, yes       dense SwiGLU, gate and up fused
              v per kv group) | linear_proj, decoder.layers.N.mlp.  (head_dim
              linear_fc1 (gate/up interleaved) | linear_fc2          weights)
              (qkv_concat False: linear_q|linear_k|linear_v and mlp.gating|mlp.hidden instead of the fused ones)
  qwen3_moe   as qwen3; a sparse layer's mlp is mlp.router.weight (E, h) and the stacked experts, MindFormers'
              2-D layout: mlp.experts.weight1 (E*h, 2*moe_intermediate_size) and mlp.experts.weight2
              (E*moe_intermediate_size, h), expert e in rows e*h..(e+1)*h (resp. e*I..), so a split of axis 0 by
              expert_parallel gives each rank whole experts

A layer is sparse (MoE) as in transformers' Qwen3Moe (`is_moe_layer` of the config when it has one): num_experts > 0,
the layer index is not in mlp_only_layers and (index + 1) % decoder_sparse_step == 0.
"""
from __future__ import annotations

from dataclasses import dataclass

COLUMN, ROW = "column", "row"
QWEN3_TYPES = ("qwen3", "qwen3_moe")


def _attr(mc, name, default):
    v = getattr(mc, name, None)
    if v is None and isinstance(getattr(mc, "extra", None), dict):
        v = mc.extra.get(name)
    return default if v is None else v


@dataclass(frozen=True)
class Linear:
    name: str           # path inside a decoder layer, e.g. "self_attention.linear_qkv"
    fan_in: int
    fan_out: int
    kind: str           # COLUMN (weight split on out by mp) or ROW (split on in)


@dataclass(frozen=True)
class Shapes:
    family: str                 # "llama" (also qwen2) or "qwen3" (also qwen3_moe)
    hidden: int
    head_dim: int
    q_dim: int                  # num_heads * head_dim
    kv_dim: int                 # n_kv_heads * head_dim
    intermediate: int           # dense MLP
    qkv_bias: bool
    qk_norm: bool
    num_experts: int            # 0: no MoE layer
    top_k: int
    moe_intermediate: int
    sparse: tuple               # per layer: True when its MLP is the MoE block
    qkv_concat: bool            # qwen3: fused linear_qkv / linear_fc1
    layer_prefix: str           # "model.layers" or "decoder.layers"

    def dense_linears(self) -> tuple:
        """(attention projections, dense-MLP projections) of a layer, named as LoRA and the strategies see them."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        if self.family == "llama":
            attn = [Linear("attention.wq", h, q, COLUMN), Linear("attention.wk", h, kv, COLUMN),
                    Linear("attention.wv", h, kv, COLUMN), Linear("attention.wo", q, h, ROW)]
            mlp = [Linear("feed_forward.w1", h, i, COLUMN), Linear("feed_forward.w3", h, i, COLUMN),
                   Linear("feed_forward.w2", i, h, ROW)]
        elif self.qkv_concat:
            attn = [Linear("self_attention.linear_qkv", h, q + 2 * kv, COLUMN),
                    Linear("self_attention.linear_proj", q, h, ROW)]
            mlp = [Linear("mlp.linear_fc1", h, 2 * i, COLUMN), Linear("mlp.linear_fc2", i, h, ROW)]
        else:
            attn = [Linear("self_attention.linear_q", h, q, COLUMN), Linear("self_attention.linear_k", h, kv, COLUMN),
                    Linear("self_attention.linear_v", h, kv, COLUMN), Linear("self_attention.linear_proj", q, h, ROW)]
            mlp = [Linear("mlp.gating", h, i, COLUMN), Linear("mlp.hidden", h, i, COLUMN),
                   Linear("mlp.linear_fc2", i, h, ROW)]
        return attn, mlp

    def layer_linears(self, layer: int) -> list:
        """The projections of decoder layer `layer` (a sparse layer has only the attention ones)."""
        attn, mlp = self.dense_linears()
        return attn if self.sparse[layer] else attn + mlp

    def layer_params(self, layer: int) -> dict:
        """Parameter counts of decoder layer `layer` by part: attention (matrices + biases, split by mp),
        norms (replicated: the two RMSNorms, and q/k norms), mlp (dense, split by mp), router (replicated),
        experts (split by ep)."""
        attn, mlp = self.dense_linears()
        p = {"attention": sum(x.fan_in * x.fan_out for x in attn)
                          + (self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0),
             "norms": 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0),
             "mlp": 0, "router": 0, "experts": 0}
        if self.sparse[layer]:
            p["router"] = self.num_experts * self.hidden
            p["experts"] = self.num_experts * 3 * self.hidden * self.moe_intermediate
        else:
            p["mlp"] = sum(x.fan_in * x.fan_out for x in mlp)
        return p

    def expert_weight_shapes(self) -> dict:
        """Stacked expert weights of one sparse layer in MindFormers' 2-D layout (see the module docstring)."""
        e, h, i = self.num_experts, self.hidden, self.moe_intermediate
        return {"mlp.experts.weight1": (e * h, 2 * i), "mlp.experts.weight2": (e * i, h)}


def shapes_of(mc) -> Shapes:
    """Shapes of `mc` (a LlamaConfig, a Qwen3 config, or any object with the same attribute names)."""
    h, nh = mc.hidden_size, mc.num_heads
    nkv = _attr(mc, "n_kv_heads", nh)
    head_dim = int(_attr(mc, "head_dim", 0) or h // nh)
    mtype = _attr(mc, "model_type", "llama")
    qwen3 = mtype in QWEN3_TYPES
    experts = int(_attr(mc, "num_experts", 0) or 0)
    step = max(int(_attr(mc, "decoder_sparse_step", 1) or 1), 1)
    dense_only = set(_attr(mc, "mlp_only_layers", []) or [])
    if callable(getattr(mc, "is_moe_layer", None)):
        sparse = tuple(bool(mc.is_moe_layer(i)) for i in range(mc.num_layers))
    else:
        sparse = tuple(experts > 0 and i not in dense_only and (i + 1) % step == 0 for i in range(mc.num_layers))
    experts = experts if any(sparse) else 0
    return Shapes(family="qwen3" if qwen3 else "llama", hidden=h, head_dim=head_dim, q_dim=nh * head_dim,
                  kv_dim=nkv * head_dim, intermediate=int(_attr(mc, "intermediate_size", 0) or 0),
                  qkv_bias=bool(_attr(mc, "qkv_has_bias", False)), qk_norm=qwen3, num_experts=experts,
                  top_k=int(_attr(mc, "num_experts_per_tok", 0) or 0) if experts else 0,
                  moe_intermediate=int(_attr(mc, "moe_intermediate_size", 0) or 0) if experts else 0,
                  sparse=sparse, qkv_concat=bool(_attr(mc, "qkv_concat", True)),
                  layer_prefix="decoder.layers" if qwen3 else "model.layers")


def expert_parallel(pc) -> int:
    """parallel_config.expert_parallel (MindFormers' key), 1 when absent."""
    v = pc.get("expert_parallel") if isinstance(pc, dict) else getattr(pc, "expert_parallel", None)
    return 1 if v is None else int(v)
