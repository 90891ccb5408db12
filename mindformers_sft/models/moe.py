"""The sparse mixture-of-experts block of Qwen3-MoE (transformers' Qwen3MoeSparseMoeBlock), MindFormers 1.8 names.

Per token: router logits = x @ router.weight^T (fp32), probabilities = softmax(logits), the top-k experts by
probability, their probabilities as routing weights (divided by their sum when norm_topk_prob), and
y = sum over the k experts of weight * down(silu(gate(x)) * up(x)).

Parameters (relative to the block; in the model `decoder.layers.N.mlp.` + these, as MindFormers 1.8's training model):
  router.weight        (E, H)                      = HF `mlp.gate.weight`
  experts.weight1      (E*H, 2F), stored in param_init_type. Rows e*H .. e*H+H-1 are expert e's (H, 2F) matrix:
                       columns [0, F) = HF experts.e.gate_proj.weight^T, columns [F, 2F) = experts.e.up_proj.weight^T
                       (gate and up concatenated contiguously, not interleaved; MindFormers' concat_ffn_weight_infer
                       then concat_expert_weight)
  experts.weight2      (E*F, H): rows e*F .. e*F+F-1 = HF experts.e.down_proj.weight^T
(E = num_experts, H = hidden_size, F = moe_intermediate_size.) convert/names_qwen3.py's `experts_stack` /
`experts_unstack` convert between this layout and HF's per-expert matrices (numpy only).

Experts LoRA (`GroupedExperts.enable_lora`): per-expert low-rank updates of weight1 and weight2, stacked:
  experts.lora_a1 (E, r, H), experts.lora_b1 (E, 2F, r)   delta of expert e's (2F, H) [gate; up] = B1[e] @ A1[e]
  experts.lora_a2 (E, r, F), experts.lora_b2 (E, H, r)    delta of expert e's (H, F) down        = B2[e] @ A2[e]
scaled by alpha / r, the shapes of PEFT's lora_A / lora_B per expert (gate and up share A1: PEFT's gate_proj gets
A1, B1[e, :F], up_proj gets A1, B1[e, F:]). The update is added to the stacked weights before the grouped matmuls
(E*H*2F*r flops, nothing per token); lora_dropout is not applied to expert adapters (a notice says so).

Computation (no per-token or per-expert Python loop):
  - CPU with the fused kernels (`cpu_kernel`): one Custom op (cpu_moe_kernels.cc) sorts the T*k assignments by
    expert, gathers each expert's tokens, runs the two GEMMs per expert (oneDNN sgemm) and scatter-adds the weighted
    outputs back; its backward returns d(x), d(routing weights), d(weight1), d(weight2). An expert with no token
    costs nothing and gets an exact zero gradient.
  - Ascend: kernels.moe_experts_ascend (token permute + GroupedMatmul).
  - Otherwise (MFSFT_CPU_KERNELS=0, no compiler): basic ops, every expert on every token masked by the routing
    weights (E/k times the flops of the sparse path; correct, slower; unused experts get exact zero gradients).
"""
from __future__ import annotations

import math
import sys

import numpy as np
import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import HeUniform, Normal, initializer

from ..errors import ConfigError
from . import kernels

_MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


# ---------------------------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------------------------
def _cpu_moe_op():
    """The fused CPU MoE op (needs kernels.cpu_kernels()): (x, p, idx, w1, w2) -> (y, act, order, o), with bprop."""
    so, f32 = kernels.cpu_kernel_library(), ms.float32
    bwd = ops.Custom(f"{so}:MfsftMoeBwd", out_shape=lambda x, p, i, w1, w2, *rest: (x, p, w1, w2),
                     out_dtype=lambda *a: (f32, f32, f32, f32), func_type="aot")

    def bprop(x, p, idx, w1, w2, out, dout):
        dx, dp, dw1, dw2 = bwd(x, p, idx, w1, w2, out[1], out[2], out[3], dout[0])
        return dx, dp, ops.zeros_like(idx), dw1, dw2

    def out_shape(x, p, i, w1, w2):
        n = p[0] * p[1]
        return x, [n, w1[1]], [n], [n, x[1]]
    return ops.Custom(f"{so}:MfsftMoeFwd", out_shape=out_shape, out_dtype=lambda *a: (f32, f32, ms.int32, f32),
                      func_type="aot", bprop=bprop)


class Router(nn.Cell):
    """router.weight (E, H); logits in fp32."""

    def __init__(self, hidden_size, num_experts, param_dtype, init_std):
        super().__init__()
        self.weight = Parameter(initializer(Normal(init_std), (num_experts, hidden_size), param_dtype), name="weight")
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        return self.matmul(ops.cast(x, ms.float32), ops.cast(self.weight, ms.float32))


def route(logits, top_k: int, norm_topk_prob: bool):
    """Router logits (T, E) fp32 -> (routing weights (T, k) fp32, expert indices (T, k) int32), as transformers."""
    probs = ops.softmax(logits, -1)
    _, idx = ops.topk(ops.stop_gradient(probs), top_k)
    idx = ops.cast(idx, ms.int32)
    weights = ops.gather_elements(probs, 1, idx)
    if norm_topk_prob:
        weights = weights / ops.sum(weights, -1, keepdim=True)
    return weights, idx


class GroupedExperts(nn.Cell):
    """E SwiGLU experts with stacked weights weight1 (E*H, 2F) and weight2 (E*F, H) (layout: module docstring)."""

    def __init__(self, num_experts, hidden_size, ffn_size, param_dtype, compute_dtype, init_std, fused, cpu_kernel):
        super().__init__()
        self.num_experts, self.hidden_size, self.ffn_size = num_experts, hidden_size, ffn_size
        self.compute_dtype, self.fused = compute_dtype, fused
        self.cpu_kernel = bool(cpu_kernel) and compute_dtype == ms.float32
        self.weight1 = Parameter(initializer(Normal(init_std), (num_experts * hidden_size, 2 * ffn_size), param_dtype),
                                 name="weight1")
        self.weight2 = Parameter(initializer(Normal(init_std), (num_experts * ffn_size, hidden_size), param_dtype),
                                 name="weight2")
        self.moe_op = _cpu_moe_op() if self.cpu_kernel else None
        self.bmm_lora = ops.BatchMatMul(transpose_a=True, transpose_b=True)
        self.bmm = ops.BatchMatMul()
        self.lora_rank, self.lora_scaling = 0, 1.0

    def enable_lora(self, rank: int, alpha: float, dropout: float = 0.0):
        """Adds per-expert LoRA adapters lora_a1/lora_b1 (weight1) and lora_a2/lora_b2 (weight2); A ~ HeUniform,
        B = 0 (a no-op at start). Names: the experts cell's prefix + `.lora_a1` etc. The base weights are not frozen
        here (the caller freezes). Returns the four new parameters."""
        if self.lora_rank:
            raise ConfigError(f"{self.weight1.name}: LoRA is already enabled on these experts")
        if dropout > 0:
            print(f"[lora] {self.weight1.name.rpartition('.')[0] or 'experts'}: lora_dropout {dropout} is not "
                  "applied to expert adapters (they are merged into the stacked weights)", file=sys.stderr)
        e, h, f, pd = self.num_experts, self.hidden_size, self.ffn_size, self.weight1.dtype
        prefix = self.weight1.name.rpartition(".")[0]
        name = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
        he = HeUniform(negative_slope=math.sqrt(5))
        self.lora_a1 = Parameter(initializer(he, (e, rank, h), pd), name=name("lora_a1"))
        self.lora_b1 = Parameter(initializer("zeros", (e, 2 * f, rank), pd), name=name("lora_b1"))
        self.lora_a2 = Parameter(initializer(he, (e, rank, f), pd), name=name("lora_a2"))
        self.lora_b2 = Parameter(initializer("zeros", (e, h, rank), pd), name=name("lora_b2"))
        self.lora_rank, self.lora_scaling = rank, alpha / rank
        return [self.lora_a1, self.lora_b1, self.lora_a2, self.lora_b2]

    def weights(self):
        """(weight1 (E*H, 2F), weight2 (E*F, H)) in compute dtype, LoRA updates included."""
        cd = self.compute_dtype
        w1, w2 = ops.cast(self.weight1, cd), ops.cast(self.weight2, cd)
        if self.lora_rank:
            d1 = self.bmm_lora(ops.cast(self.lora_a1, cd), ops.cast(self.lora_b1, cd))   # (E, H, 2F)
            d2 = self.bmm_lora(ops.cast(self.lora_a2, cd), ops.cast(self.lora_b2, cd))   # (E, F, H)
            w1 = w1 + ops.reshape(d1, w1.shape) * self.lora_scaling
            w2 = w2 + ops.reshape(d2, w2.shape) * self.lora_scaling
        return w1, w2

    def merged_weights(self):
        """numpy (weight1, weight2) with the LoRA updates merged, in the parameters' dtype (for export)."""
        w1, w2 = (p.asnumpy().astype(np.float32) for p in (self.weight1, self.weight2))
        if self.lora_rank:
            a1, b1, a2, b2 = (p.asnumpy().astype(np.float32)
                              for p in (self.lora_a1, self.lora_b1, self.lora_a2, self.lora_b2))
            w1 = w1 + self.lora_scaling * np.matmul(a1.transpose(0, 2, 1), b1.transpose(0, 2, 1)).reshape(w1.shape)
            w2 = w2 + self.lora_scaling * np.matmul(a2.transpose(0, 2, 1), b2.transpose(0, 2, 1)).reshape(w2.shape)
        dt = self.weight1.asnumpy().dtype
        return w1.astype(dt), w2.astype(dt)

    def construct(self, x, weights, idx):
        """x (T, H), routing weights (T, k) fp32, expert indices (T, k) int32 -> (T, H) in compute dtype."""
        e, h, f = self.num_experts, self.hidden_size, self.ffn_size
        x = ops.cast(x, self.compute_dtype)
        w1, w2 = self.weights()
        if self.cpu_kernel:
            y, _, _, _ = self.moe_op(x, weights, idx, w1, w2)
            return y
        weights = ops.cast(weights, self.compute_dtype)
        if self.fused:  # Ascend
            return kernels.moe_experts_ascend(x, weights, idx, ops.reshape(w1, (e, h, 2 * f)),
                                              ops.reshape(w2, (e, f, h)), e)
        # basic ops: all experts on all tokens, combined with the (T, E) routing weights (0 for unselected experts)
        t = x.shape[0]
        w1_all = ops.reshape(ops.transpose(ops.reshape(w1, (e, h, 2 * f)), (1, 0, 2)), (h, e * 2 * f))
        hid = ops.reshape(ops.matmul(x, w1_all), (t, e, 2 * f))
        act = kernels.swiglu(hid[:, :, :f], hid[:, :, f:], False)                        # (T, E, F)
        out = self.bmm(ops.transpose(act, (1, 0, 2)), ops.reshape(w2, (e, f, h)))       # (E, T, H)
        onehot = ops.one_hot(idx, e, ops.ones((), self.compute_dtype), ops.zeros((), self.compute_dtype))
        combine = ops.sum(onehot * ops.expand_dims(weights, -1), 1)                     # (T, E)
        return ops.sum(out * ops.expand_dims(ops.transpose(combine, (1, 0)), -1), 0)


class MoEBlock(nn.Cell):
    """Qwen3-MoE sparse block: construct(x (B, S, H)) -> (y (B, S, H), router logits (B*S, E) fp32).

    cfg: hidden_size, num_experts, num_experts_per_tok, moe_intermediate_size, norm_topk_prob, param_init_type,
    compute_dtype, initializer_range. fused: Ascend ops; cpu_kernel: the fused CPU op (fp32 compute).
    """

    def __init__(self, cfg, fused: bool, cpu_kernel: bool):
        super().__init__()
        pd = _MS_DTYPES[getattr(cfg, "param_init_type", "float32")]
        cd = _MS_DTYPES[getattr(cfg, "compute_dtype", "float32")]
        std = getattr(cfg, "initializer_range", 0.02)
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, bool(getattr(cfg, "norm_topk_prob", True))
        if not 0 < self.top_k <= cfg.num_experts:
            raise ConfigError(f"model_config.num_experts_per_tok: {self.top_k}; expected 1 .. num_experts "
                             f"({cfg.num_experts})")
        self.router = Router(cfg.hidden_size, cfg.num_experts, pd, std)
        self.experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, pd, cd, std,
                                      fused, cpu_kernel)

    def construct(self, x):
        b, s, h = x.shape
        x2 = ops.reshape(x, (b * s, h))
        logits = self.router(x2)
        weights, idx = route(logits, self.top_k, self.norm_topk_prob)
        y = self.experts(x2, weights, idx)
        return ops.reshape(ops.cast(y, x.dtype), (b, s, h)), logits


def load_balancing_loss(router_logits, num_experts: int, top_k: int, token_mask=None):
    """transformers' load_balancing_loss_func: router_logits a tuple/list of (T, E) per sparse layer (T = B*S);
    token_mask (B, S) 1 for real tokens (its attention_mask) or None. fp32 scalar. Differs from transformers only
    when every token is masked (0 here, NaN there)."""
    logits = ops.cat([ops.cast(l, ms.float32) for l in router_logits], 0)              # (L*T, E)
    probs = ops.softmax(logits, -1)
    _, sel = ops.topk(ops.stop_gradient(probs), top_k)
    one = ops.ones((), ms.float32)
    hit = ops.one_hot(ops.cast(sel, ms.int32), num_experts, one, ops.zeros((), ms.float32))   # (L*T, k, E)
    if token_mask is None:
        tokens_per_expert = ops.mean(hit, 0)
        prob_per_expert = ops.mean(probs, 0)
    else:
        m = ops.tile(ops.reshape(ops.cast(token_mask, ms.float32), (-1,)), (len(router_logits),))   # (L*T,)
        count = ops.maximum(ops.sum(m), one)
        tokens_per_expert = ops.sum(hit * ops.reshape(m, (-1, 1, 1)), 0) / count
        prob_per_expert = ops.sum(probs * ops.reshape(m, (-1, 1)), 0) / count
    return ops.sum(tokens_per_expert * ops.expand_dims(prob_per_expert, 0)) * num_experts
