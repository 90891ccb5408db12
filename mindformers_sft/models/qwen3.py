"""Qwen3 (dense) as Llama plus its differences, with the parameter names of MindFormers 1.8's training model.

What Qwen3 changes (transformers' modular_qwen3.py): an RMSNorm over each head of q and k before the rotary
embedding (q_layernorm / k_layernorm, weight (head_dim,)), a head_dim that may differ from hidden/heads, no qkv
bias; GQA, tied or untied embeddings and rope_theta as Llama. Everything else is llama.py's blocks.

Parameter names and layouts -- MindFormers 1.8 `TrainingQwen3ForCausalLM` (mcore GPTModel, cells without a
`model.` prefix), configs/qwen3/finetune_qwen3.yaml settings; HF <-> MF code in convert/names_qwen3.py.
Nq = num_heads, Nkv = n_kv_heads, D = head_dim, H = hidden_size, I = intermediate_size, V = vocab_size,
rep = Nq / Nkv, E = num_experts, Im = moe_intermediate_size. All Dense weights are (out, in) as in HF.

  MF name (N = layer)                                   shape                 HF source
  embedding.word_embeddings.weight                      (V, H)                model.embed_tokens.weight
  decoder.layers.N.input_layernorm.weight               (H,)                  model.layers.N.input_layernorm.weight
  decoder.layers.N.self_attention.linear_qkv.weight     ((Nq+2Nkv)*D, H)      q_proj (Nq*D,H), k_proj, v_proj (Nkv*D,H)
      qkv_concat True (default). Rows interleaved per kv group g = 0..Nkv-1: [q heads g*rep..g*rep+rep-1, k head g,
      v head g] (rep+2 blocks of D rows per group); with use_contiguous_weight_layout_attention: [q; k; v].
  decoder.layers.N.self_attention.linear_q|linear_k|linear_v.weight   qkv_concat False: the HF matrices as they are
  decoder.layers.N.self_attention.q_layernorm.weight    (D,)                  self_attn.q_norm.weight
  decoder.layers.N.self_attention.k_layernorm.weight    (D,)                  self_attn.k_norm.weight
  decoder.layers.N.self_attention.linear_proj.weight    (H, Nq*D)             self_attn.o_proj.weight
  decoder.layers.N.pre_mlp_layernorm.weight             (H,)                  post_attention_layernorm.weight
  decoder.layers.N.mlp.linear_fc1.weight                (2I, H)               mlp.gate_proj, mlp.up_proj (I, H)
      qkv_concat True. Rows interleaved [gate_0, up_0, gate_1, up_1, ...] (use_interleaved_weight_layout_mlp True,
      MindFormers' default); with use_interleaved_weight_layout_mlp False: [gate; up].
  decoder.layers.N.mlp.gating|hidden.weight             (I, H)                qkv_concat False: gate_proj | up_proj
  decoder.layers.N.mlp.linear_fc2.weight                (H, I)                mlp.down_proj.weight
  decoder.final_layernorm.weight                        (H,)                  model.norm.weight
  output_layer.weight                                   (V, H)                lm_head.weight (absent when tied)
Qwen3-MoE (models/qwen3_moe.py) sparse layers replace mlp.* by (layout of MindFormers' concat_expert_weight):
  decoder.layers.N.mlp.router.weight                    (E, H)                mlp.gate.weight
  decoder.layers.N.mlp.experts.weight1                  (E*H, 2*Im)           block e = [gate_e; up_e].T (H, 2Im)
  decoder.layers.N.mlp.experts.weight2                  (E*Im, H)             block e = down_e.T (Im, H)
      where gate_e/up_e = mlp.experts.e.gate_proj/up_proj.weight (Im, H), down_e = mlp.experts.e.down_proj (H, Im).
  Dense layers of a MoE model (mlp_only_layers, decoder_sparse_step) have the dense mlp.* names above.
LoRA (pet/lora.py) adds `<layer>.lora_a` (r, in) and `<layer>.lora_b` (out, r) to a targeted Linear, e.g.
`decoder.layers.0.self_attention.linear_qkv.lora_b` whose rows follow linear_qkv's layout.
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops

from . import fused_decode
from .config import LlamaConfig
from .causal_lm import MS_DTYPES, CausalLM
from .llama import Attention, Embedding, FeedForward, Linear, LlamaModel, RMSNorm, layers_with_cache, rope_inv_freq


def qkv_order(nq, nkv, d):
    """Rows of the per-kv-group linear_qkv ([rep q heads, k, v] per group) in [q; k; v] order."""
    rep, blk = nq // nkv, (nq // nkv + 2) * d
    q = [g * blk + r * d + np.arange(d) for g in range(nkv) for r in range(rep)]
    k = [g * blk + rep * d + np.arange(d) for g in range(nkv)]
    v = [g * blk + (rep + 1) * d + np.arange(d) for g in range(nkv)]
    return np.concatenate(q + k + v)


def _dense_args(cfg):
    return MS_DTYPES[cfg.param_init_type], MS_DTYPES[cfg.compute_dtype], cfg.initializer_range


class Qwen3Attention(Attention):
    """Llama attention with per-head q/k RMSNorm before the rotary embedding and MindFormers' fused linear_qkv."""

    def __init__(self, cfg: LlamaConfig, fused: bool, cpu_kernel=False):
        nn.Cell.__init__(self)
        self._setup(cfg, fused)
        pd, cd, std = _dense_args(cfg)
        h, d, nq, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.n_kv_heads
        self.qkv_concat, self.contiguous = cfg.qkv_concat, cfg.use_contiguous_weight_layout_attention
        self.rep = nq // nkv
        if self.qkv_concat:
            self.linear_qkv = Linear(h, (nq + 2 * nkv) * d, cfg.qkv_has_bias, pd, cd, std)
        else:
            self.linear_q = Linear(h, nq * d, cfg.qkv_has_bias, pd, cd, std)
            self.linear_k = Linear(h, nkv * d, cfg.qkv_has_bias, pd, cd, std)
            self.linear_v = Linear(h, nkv * d, cfg.qkv_has_bias, pd, cd, std)
        self.q_layernorm = RMSNorm(d, cfg.rms_norm_eps, pd, fused, cpu_kernel)
        self.k_layernorm = RMSNorm(d, cfg.rms_norm_eps, pd, fused, cpu_kernel)
        self.linear_proj = Linear(nq * d, h, False, pd, cd, std)
        self.split_qkv = self.contiguous      # linear_qkv's output is [q; k; v]
        if cpu_kernel and self.qkv_concat and not self.contiguous:
            self.linear_qkv.set_out_perm(qkv_order(nq, nkv, d))
            self.split_qkv = True

    def _project(self, x):
        b, s, _ = x.shape
        d, nq, nkv = self.head_dim, self.n_heads, self.n_kv
        if not self.qkv_concat:
            q = ops.reshape(self.linear_q(x), (b, s, nq, d))
            k = ops.reshape(self.linear_k(x), (b, s, nkv, d))
            v = ops.reshape(self.linear_v(x), (b, s, nkv, d))
        elif self.split_qkv:
            qkv = self.linear_qkv(x)
            q = ops.reshape(qkv[:, :, :nq * d], (b, s, nq, d))
            k = ops.reshape(qkv[:, :, nq * d:(nq + nkv) * d], (b, s, nkv, d))
            v = ops.reshape(qkv[:, :, (nq + nkv) * d:], (b, s, nkv, d))
        else:   # per kv group: rep q heads, then its k head and v head
            g = ops.reshape(self.linear_qkv(x), (b, s, nkv, (self.rep + 2) * d))
            q = ops.reshape(g[:, :, :, :self.rep * d], (b, s, nq, d))
            k = g[:, :, :, self.rep * d:(self.rep + 1) * d]
            v = g[:, :, :, (self.rep + 1) * d:]
        return self.q_layernorm(q), self.k_layernorm(k), v

    def _out(self, o):
        return self.linear_proj(o)


class Qwen3MLP(FeedForward):
    """SwiGLU with MindFormers' linear_fc1 (gate and up in one matrix) and linear_fc2 (down)."""

    def __init__(self, cfg: LlamaConfig, fused: bool, cpu_kernel=False):
        nn.Cell.__init__(self)
        pd, cd, std = _dense_args(cfg)
        self.fused, self.cpu_kernel = fused, cpu_kernel
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.concat, self.interleaved, self.inter = cfg.qkv_concat, cfg.use_interleaved_weight_layout_mlp, i
        if self.concat:
            self.linear_fc1 = Linear(h, 2 * i, False, pd, cd, std)
        else:
            self.gating = Linear(h, i, False, pd, cd, std)
            self.hidden = Linear(h, i, False, pd, cd, std)
        self.linear_fc2 = Linear(i, h, False, pd, cd, std)
        self.split_halves = not self.interleaved    # linear_fc1's output is [gate; up]
        if cpu_kernel and self.concat and self.interleaved:
            self.linear_fc1.set_out_perm(np.concatenate([np.arange(0, 2 * i, 2), np.arange(1, 2 * i, 2)]))
            self.split_halves = True

    def _gate_up(self, x):
        if not self.concat:
            return self.gating(x), self.hidden(x)
        y = self.linear_fc1(x)
        if not self.split_halves:
            y = ops.reshape(y, y.shape[:-1] + (self.inter, 2))
            return y[..., 0], y[..., 1]
        return y[..., :self.inter], y[..., self.inter:]

    def _down(self, y):
        return self.linear_fc2(y)


class Qwen3DecoderLayer(nn.Cell):
    def __init__(self, cfg: LlamaConfig, fused: bool, cpu_kernel=False, mlp=None):
        super().__init__()
        pd = MS_DTYPES[cfg.param_init_type]
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, fused, cpu_kernel)
        self.self_attention = Qwen3Attention(cfg, fused, cpu_kernel)
        self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, fused, cpu_kernel)
        self.mlp = mlp if mlp is not None else Qwen3MLP(cfg, fused, cpu_kernel)

    def construct(self, x, cos, sin, mask, past_k=None, past_v=None):
        a, k, v = self.self_attention(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        x = x + a
        return x + self.mlp(self.pre_mlp_layernorm(x)), k, v


class WordEmbedding(Embedding):
    """llama.Embedding with its table named `weight`."""

    def table(self):
        return self.weight


class Qwen3Embedding(nn.Cell):
    """`embedding.word_embeddings.weight`."""

    def __init__(self, cfg: LlamaConfig, fused: bool):
        super().__init__()
        pd, cd, std = _dense_args(cfg)
        self.word_embeddings = WordEmbedding(cfg.vocab_size, cfg.hidden_size, pd, cd, std, fused, param_name="weight")

    def construct(self, tokens):
        return self.word_embeddings(tokens)


class TransformerBlock(nn.Cell):
    """`decoder`: the layers and `final_layernorm`; rotary tables as LlamaModel."""
    rope = LlamaModel.rope

    def __init__(self, cfg: LlamaConfig, layers, fused: bool, cpu_kernel=False):
        super().__init__()
        self.layers = nn.CellList(layers)
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, MS_DTYPES[cfg.param_init_type], fused,
                                       cpu_kernel)
        self.inv_freq = Tensor(rope_inv_freq(cfg).reshape(1, 1, -1))

    def construct(self, x, position_ids, mask):
        cos, sin = self.rope(position_ids, not isinstance(mask, tuple))
        for layer in self.layers:
            x, _, _ = layer(x, cos, sin, mask)
        return self.final_layernorm(x)

    def forward_with_cache(self, x, position_ids, mask, past):
        cos, sin = self.rope(position_ids)
        x, presents = layers_with_cache(self.layers, x, cos, sin, mask, past)
        return self.final_layernorm(x), presents


class Qwen3ForCausalLM(CausalLM):
    """Qwen3 causal LM (interface: causal_lm.CausalLM; parameter names: the table above)."""
    EMBEDDING_NAME, OUTPUT_NAME = "embedding.word_embeddings.weight", "output_layer.weight"
    BLOCK = TransformerBlock

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        self.embedding = Qwen3Embedding(config, self.fused)
        self.decoder = self.BLOCK(config, self._layers(config), self.fused, self.cpu_kernel)
        if not self.tie:
            self.output_layer = Linear(config.hidden_size, config.vocab_size, False,
                                       MS_DTYPES[config.param_init_type], self.compute_dtype, config.initializer_range)

    def _layers(self, config):
        return [Qwen3DecoderLayer(config, self.fused, self.cpu_kernel) for _ in range(config.num_layers)]

    def decoder_layers(self):
        return list(self.decoder.layers)

    def _embedding_table(self):
        return self.embedding.word_embeddings.weight

    def _output(self, h):
        return self.output_layer(h)

    def _output_weight(self):
        return self.output_layer.plain_weight() if isinstance(self.output_layer, Linear) else None

    def _decoder(self, tokens, position_ids, mask):
        return self.decoder(self.embedding(tokens), position_ids, mask)

    def _decoder_with_cache(self, tokens, position_ids, mask, past):
        return self.decoder.forward_with_cache(self.embedding(tokens), position_ids, mask, past)

    def decode_layout(self):
        """The weights of the fused CPU decode step (fused_decode.py), or None with a MoE layer (decode_graph.py)."""
        fd = fused_decode
        layers, qkv_mode, mlp_mode = [], fd.SEPARATE, fd.SEPARATE
        for layer in self.decoder.layers:
            a, mlp = layer.self_attention, layer.mlp
            if not isinstance(mlp, Qwen3MLP):
                return None
            if a.qkv_concat:
                qkv_mode = fd.FUSED if a.contiguous else fd.INTERLEAVED
                qkv = [a.linear_qkv, None, None]
            else:
                qkv = [a.linear_q, a.linear_k, a.linear_v]
            if mlp.concat:
                mlp_mode = fd.INTERLEAVED if mlp.interleaved else fd.FUSED
                gate_up = [mlp.linear_fc1, None]
            else:
                gate_up = [mlp.gating, mlp.hidden]
            layers.append(fd.LayerWeights(layer.input_layernorm.weight, layer.pre_mlp_layernorm.weight,
                                          a.q_layernorm.weight, a.k_layernorm.weight,
                                          qkv + [a.linear_proj] + gate_up + [mlp.linear_fc2]))
        table = self.embedding.word_embeddings.weight
        output = table if self.tie else getattr(self.output_layer, "weight", None)
        if output is None:
            return None
        return fd.DecodeLayout(layers, qkv_mode, mlp_mode, table, self.decoder.final_layernorm.weight, output,
                               self.decoder.inv_freq)
