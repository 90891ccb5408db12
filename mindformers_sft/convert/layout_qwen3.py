"""The :class:`~.plan.Layout` of a Qwen3 / Qwen3-MoE model: MindFormers 1.8 training-model names (mcore).

Per layer N (HF ``model.layers.N.`` <-> MF ``decoder.layers.N.``; names and layouts from :mod:`.names_qwen3`):

=========================================================  ===========================================  ========
Hugging Face                                               MindFormers 1.8                               how
=========================================================  ===========================================  ========
``self_attn.q_proj/k_proj/v_proj.weight``                  ``self_attention.linear_qkv.weight``          concat
``self_attn.o_proj.weight``                                ``self_attention.linear_proj.weight``         rename
``self_attn.q_norm/k_norm.weight``                         ``self_attention.q_layernorm/k_layernorm``    rename
``input_layernorm`` / ``post_attention_layernorm``         ``input_layernorm`` / ``pre_mlp_layernorm``   rename
``mlp.gate_proj/up_proj.weight`` (dense layers)            ``mlp.linear_fc1.weight``                     concat
``mlp.down_proj.weight`` (dense layers)                    ``mlp.linear_fc2.weight``                     rename
``mlp.gate.weight`` (MoE layers)                           ``mlp.router.weight``                         rename
``mlp.experts.{0..E-1}.gate_proj/up_proj/down_proj``       ``mlp.experts.weight1`` / ``weight2``         stack
=========================================================  ===========================================  ========

plus ``model.embed_tokens`` <-> ``embedding.word_embeddings``, ``model.norm`` <-> ``decoder.final_layernorm``,
``lm_head`` <-> ``output_layer`` (absent when tied). ``linear_qkv`` is interleaved per kv group
([q heads of group g, k_g, v_g] for each g, MindFormers' ``concat_qkv_interleaved``) unless
``use_contiguous_weight_layout_attention`` ([q; k; v]); dense ``linear_fc1`` interleaves gate/up rows
([g0, u0, g1, u1, ...], ``use_interleaved_weight_layout_mlp``, MindFormers' default) or is [gate; up].
Experts are stacked: ``weight1`` (E*hidden, 2*moe_intermediate) holds expert e's ``[gate_e; up_e].T`` in rows
e*hidden..(e+1)*hidden, ``weight2`` (E*moe_intermediate, hidden) holds ``down_e.T`` (MindFormers'
``concat_expert_weight``; its GroupedMLP reads them as (E, hidden, 2*Im) and (E, Im, hidden)).

A model built with ``qkv_concat: False`` keeps q/k/v and gate/up apart (``linear_q/k/v``, ``mlp.gating/hidden``);
:func:`qwen3_layout` describes either (``fused``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List

import numpy as np

from . import names_qwen3 as nq
from .plan import Assembler, Layout, Rule, rename

_FUSED_MF = ("self_attention.linear_qkv.weight", "mlp.linear_fc1.weight", "mlp.experts.weight1",
             "mlp.experts.weight2")


def _check_mf_name(name: str, source: str = ""):
    """Raises CheckpointError unless `name` is a MindFormers Qwen3 parameter name (fused or split)."""
    m = nq._MF_L.match(name)
    if m and m.group(2) in _FUSED_MF:
        return name
    return nq.mf_to_hf(name, source)


def _is_moe(cfg, i: int) -> bool:
    return bool(getattr(cfg, "num_experts", 0)) and cfg.is_moe_layer(i)


def facts(cfg) -> str:
    s = (f"vocab_size={cfg.vocab_size}, hidden_size={cfg.hidden_size}, num_layers={cfg.num_layers}, "
         f"num_heads={cfg.num_heads}, n_kv_heads={cfg.n_kv_heads}, head_dim={cfg.head_dim}, "
         f"intermediate_size={cfg.intermediate_size}, tie_word_embeddings={cfg.tie_word_embeddings}")
    if getattr(cfg, "num_experts", 0):
        moe = [i for i in range(cfg.num_layers) if _is_moe(cfg, i)]
        s += (f", num_experts={cfg.num_experts} (experts 0..{cfg.num_experts - 1}), "
              f"moe_intermediate_size={cfg.moe_intermediate_size}, MoE layers {moe}")
    return s


def qwen3_layout(cfg, fused: bool = True) -> Layout:
    """Every tensor of a Qwen3 / Qwen3-MoE model `cfg` on both sides and the rules between them."""
    h, v, d = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    nh, nkv = cfg.num_heads, cfg.n_kv_heads
    contiguous = bool(getattr(cfg, "use_contiguous_weight_layout_attention", False))
    interleaved = bool(getattr(cfg, "use_interleaved_weight_layout_mlp", True))
    rules: List[Rule] = []
    hf, mf = OrderedDict(), OrderedDict()

    def one(hname, mname, shape):
        hf[hname], mf[mname] = shape, shape
        rules.append(rename(hname, mname))

    def concat(hnames, mname, shapes, mshape, to_mf, to_hf):
        for n, s in zip(hnames, shapes):
            hf[n] = s
        mf[mname] = mshape
        rules.append(Rule(tuple(hnames), (mname,), to_mf, to_hf))

    one("model.embed_tokens.weight", "embedding.word_embeddings.weight", (v, h))
    for i in range(cfg.num_layers):
        H, M = f"model.layers.{i}.", f"decoder.layers.{i}."
        one(H + "input_layernorm.weight", M + "input_layernorm.weight", (h,))
        qkv = [H + f"self_attn.{p}_proj.weight" for p in "qkv"]
        qkv_shapes = [(nh * d, h), (nkv * d, h), (nkv * d, h)]
        if fused:
            concat(qkv, M + "self_attention.linear_qkv.weight", qkv_shapes, ((nh + 2 * nkv) * d, h),
                   lambda a: [nq.qkv_concat(*a, nh, nkv, d, contiguous)],
                   lambda a: nq.qkv_split(a[0], nh, nkv, d, contiguous))
        else:
            for n, s in zip(qkv, qkv_shapes):
                one(n, nq.hf_to_mf(n), s)
        if cfg.qkv_has_bias:     # attention_bias: true (not in released Qwen3 models)
            qkv_b = [n[: -len("weight")] + "bias" for n in qkv]
            if fused:
                concat(qkv_b, M + "self_attention.linear_qkv.bias", [(s[0],) for s in qkv_shapes],
                       ((nh + 2 * nkv) * d,), lambda a: [nq.qkv_concat(*a, nh, nkv, d, contiguous)],
                       lambda a: nq.qkv_split(a[0], nh, nkv, d, contiguous))
            else:
                for n, s in zip(qkv_b, qkv_shapes):
                    one(n, nq.hf_to_mf(n[: -len("bias")] + "weight")[: -len("weight")] + "bias", (s[0],))
        one(H + "self_attn.o_proj.weight", M + "self_attention.linear_proj.weight", (h, nh * d))
        one(H + "self_attn.q_norm.weight", M + "self_attention.q_layernorm.weight", (d,))
        one(H + "self_attn.k_norm.weight", M + "self_attention.k_layernorm.weight", (d,))
        one(H + "post_attention_layernorm.weight", M + "pre_mlp_layernorm.weight", (h,))
        if _is_moe(cfg, i):
            _experts(cfg, H, M, hf, mf, rules, one)
            continue
        ff = cfg.intermediate_size
        gate_up = [H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"]
        if fused:
            concat(gate_up, M + "mlp.linear_fc1.weight", [(ff, h), (ff, h)], (2 * ff, h),
                   lambda a: [nq.fc1_concat(*a, interleaved)], lambda a: nq.fc1_split(a[0], interleaved))
        else:
            for n in gate_up:
                one(n, nq.hf_to_mf(n), (ff, h))
        one(H + "mlp.down_proj.weight", M + "mlp.linear_fc2.weight", (h, ff))
    one("model.norm.weight", "decoder.final_layernorm.weight", (h,))
    if not cfg.tie_word_embeddings:
        one("lm_head.weight", "output_layer.weight", (v, h))
    tied = ("lm_head.weight", "output_layer.weight") if cfg.tie_word_embeddings else ()
    return Layout(rules, hf, mf, nq.hf_to_mf, _check_mf_name, facts(cfg), tied_head=tied,
                  family=getattr(cfg, "model_type", "qwen3"))


class _StackExperts(Assembler):
    """Places each expert into preallocated weight1/weight2 as soon as its gate, up and down are in (inputs
    ordered gate_0, up_0, down_0, gate_1, ...), so a MoE layer is held once, not twice."""

    def __init__(self, e: int, h: int, im: int):
        super().__init__(3 * e)
        self.shape1, self.shape2, self.h, self.im = (e * h, 2 * im), (e * im, h), h, im
        self.w1 = self.w2 = None
        self.parts = {}

    def put(self, j, arr):
        e, kind = divmod(j, 3)
        got = self.parts.setdefault(e, [None, None, None])
        got[kind] = arr
        self.left -= 1
        if any(x is None for x in got):
            return
        b1, b2 = nq.experts_stack([got[0]], [got[1]], [got[2]])
        del self.parts[e], got
        if self.w1 is None:
            self.w1, self.w2 = np.empty(self.shape1, b1.dtype), np.empty(self.shape2, b2.dtype)
        self.w1[e * self.h:(e + 1) * self.h] = b1
        self.w2[e * self.im:(e + 1) * self.im] = b2

    def outputs(self):
        w1, w2, self.w1, self.w2 = self.w1, self.w2, None, None
        return [w1, w2]


def _unstack_experts(a, e, h, im):
    """weight1, weight2 -> gate_0, up_0, down_0, gate_1, ... one expert at a time (a generator)."""
    w1, w2 = a
    for j in range(e):
        gates, ups, downs = nq.experts_unstack(w1[j * h:(j + 1) * h], w2[j * im:(j + 1) * im], 1)
        yield gates[0]
        yield ups[0]
        yield downs[0]


def _experts(cfg, H, M, hf, mf, rules, one):
    """Router (rename) and the E experts of one MoE layer <-> stacked weight1/weight2 (one group)."""
    h, e, im = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    one(H + "mlp.gate.weight", M + "mlp.router.weight", (e, h))
    names = []
    for j in range(e):
        x = H + f"mlp.experts.{j}."
        names += [x + "gate_proj.weight", x + "up_proj.weight", x + "down_proj.weight"]
        hf[x + "gate_proj.weight"], hf[x + "up_proj.weight"], hf[x + "down_proj.weight"] = (im, h), (im, h), (h, im)
    w1, w2 = M + "mlp.experts.weight1", M + "mlp.experts.weight2"
    mf[w1], mf[w2] = (e * h, 2 * im), (e * im, h)
    rules.append(Rule(tuple(names), (w1, w2), None, lambda a: _unstack_experts(a, e, h, im),
                      assemble_mf=lambda: _StackExperts(e, h, im)))
