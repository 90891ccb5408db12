"""Qwen3-MoE as Qwen3 plus its differences (transformers' modular_qwen3_moe.py): sparse MoE blocks (models/moe.py)
in the layers `config.is_moe_layer` picks (decoder_sparse_step, mlp_only_layers; the others keep Qwen3's dense MLP),
and the load-balancing auxiliary loss.

Parameter names: the table in models/qwen3.py (sparse layers: `decoder.layers.N.mlp.router.weight`,
`mlp.experts.weight1`, `mlp.experts.weight2`).

Training loss (as transformers' Qwen3MoeForCausalLM): mean token cross-entropy + router_aux_loss_coef * aux, where
aux = load_balancing_loss_func over the router logits of every sparse layer, counted over the non-padding tokens
(segment_ids != 0 when given, as transformers' attention_mask; all tokens otherwise). As in transformers the aux
loss joins the loss only when output_router_logits is True (Qwen3-30B-A3B's config.json says false; set
`output_router_logits: True` in model_config to train with it). loss_sum_and_count returns
(ce_sum + coef * aux * count, count), so the trainer's sum / count is exactly ce_mean + coef * aux; with gradient
accumulation each micro-batch's aux is weighted by its supervised tokens.
"""
from __future__ import annotations

from mindspore import ops

from .config import LlamaConfig
from .moe import MoEBlock, load_balancing_loss
from .qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, TransformerBlock


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    """A Qwen3 layer whose mlp is a MoEBlock (sparse) or Qwen3's MLP; returns router logits or None as 4th output."""

    def __init__(self, cfg: LlamaConfig, fused: bool, cpu_kernel: bool, sparse: bool):
        super().__init__(cfg, fused, cpu_kernel, MoEBlock(cfg, fused, cpu_kernel) if sparse else None)
        self.sparse = sparse

    def construct(self, x, cos, sin, mask, past_k=None, past_v=None):
        a, k, v = self.self_attention(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        x = x + a
        h = self.pre_mlp_layernorm(x)
        if self.sparse:
            y, router_logits = self.mlp(h)
            return x + y, k, v, router_logits
        return x + self.mlp(h), k, v, None


class MoeTransformerBlock(TransformerBlock):
    """construct -> (hidden (B, S, H), tuple of router logits (B*S, E) fp32, one per sparse layer);
    forward_with_cache as TransformerBlock (router logits unused)."""

    def construct(self, x, position_ids, mask):
        cos, sin = self.rope(position_ids, not isinstance(mask, tuple))
        router_logits = ()
        for layer in self.layers:
            x, _, _, logits = layer(x, cos, sin, mask)
            if logits is not None:
                router_logits = router_logits + (logits,)
        return self.final_layernorm(x), router_logits


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    """Qwen3-MoE causal LM (interface: causal_lm.CausalLM); the training loss includes the aux loss (module doc)."""
    BLOCK = MoeTransformerBlock

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.aux_coef = float(config.router_aux_loss_coef)
        self.with_aux = bool(config.output_router_logits) and any(
            config.is_moe_layer(i) for i in range(config.num_layers))

    def _layers(self, config):
        return [Qwen3MoeDecoderLayer(config, self.fused, self.cpu_kernel, config.is_moe_layer(i))
                for i in range(config.num_layers)]

    def _decoder(self, tokens, position_ids, mask):
        h, _ = self.decoder(self.embedding(tokens), position_ids, mask)
        return h

    def router_logits(self, input_ids, position_ids=None, segment_ids=None):
        """Tuple of (B*S, E) fp32 router logits of the sparse layers for tokens (B, S)."""
        position_ids, mask = self._inputs(input_ids, position_ids, segment_ids)
        return self.decoder(self.embedding(input_ids), position_ids, mask)[1]

    def loss_sum_and_count(self, input_ids, labels=None, position_ids=None, segment_ids=None):
        tokens = input_ids[:, :-1]
        targets = labels[:, 1:] if labels is not None else input_ids[:, 1:]
        position_ids, mask = self._inputs(tokens, position_ids, segment_ids)
        h, router_logits = self.decoder(self.embedding(tokens), position_ids, mask)
        ce_sum, count = self._ce_sum_and_count(h, targets)
        if not self.with_aux:
            return ce_sum, count
        token_mask = None if segment_ids is None else ops.not_equal(segment_ids, 0)
        aux = load_balancing_loss(router_logits, self.num_experts, self.top_k, token_mask)
        return ce_sum + self.aux_coef * aux * count, count
