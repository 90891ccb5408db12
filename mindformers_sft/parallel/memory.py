"""Parameter counts and the per-device memory estimate of a parallel plan (bytes; `plan.py` checks and prints it).

Memory model (bytes per device, worst pipeline stage; `estimate_memory` returns it as a dict):
  weights      per-device parameters x bytes(param_init_type). Attention and dense-MLP matrices (and q/k/v biases)
               are split by model_parallel (column- or row-wise); norms (also Qwen3's q/k norms) and the MoE router
               are replicated; stacked expert weights (E, ...) are split on the expert axis by expert_parallel (not
               by model_parallel, as MindFormers' GroupedMLP); the embedding and lm_head are split by model_parallel
               only when vocab-parallel (vocab_emb_dp False), as MindFormers. Stage 0 holds the embedding, the last
               stage the final norm and lm_head (and a copy of a tied embedding when pp > 1). LoRA adapter weights
               are added to the frozen base.
  gradients    trainable parameters only (LoRA: the adapters) x bytes(param_init_type): MindSpore's gradient of
               a parameter has the parameter's dtype, so fp32 parameters give fp32 gradients even with a bf16
               compute_dtype. Plus an accumulation buffer of the same size when gradient_accumulation_steps > 1 or
               pipeline_stage > 1 (MindFormers' accu_grads).
  optimizer    AdamW m and v in fp32 = 8 B per trainable parameter, + a 4 B fp32 master copy when param_init_type
               is bf16/fp16. With optimizer sharding (parallel_config.optimizer_shard, or
               parallel.enable_parallel_optimizer when that is unset) each parameter's states are divided over its
               replicas: data_parallel for the rest, data_parallel x model_parallel / expert_parallel for experts.
               Weights and gradients are NOT divided here (conservative: MindSpore's parallel optimizer also slices
               parameters above parallel_optimizer_threshold, then all-gathers them for the step).
  activations  per layer and micro-batch, Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
               Transformer Models", eqs. 1-2) for 2-byte activations, scaled by bytes(compute_dtype) / 2, split into
               the attention + norms part and the MLP part:
                 attention + norms   s*b*h * (7 + 8/t) + 5*a*s*s*b/t        (sequence parallel: 15/t)
                 dense MLP           s*b*h * (3 + 16/t)                      (sequence parallel: 19/t)
                 (sum: s*b*h * (10 + 24/t + 5*a*s/(h*t)), and 34/t with sequence parallel, as the paper)
                 MoE MLP, n tokens per device (s*b, / t with sequence parallel), k = top-k, E experts, I =
                 moe_intermediate_size, routing assumed balanced (each device computes about n*k routed tokens):
                   2*n*h (block input) + 8*n*E (fp32 router logits + probabilities, not scaled) + 8*n*k (fp32
                   top-k weights + int32 indices, not scaled) + 4*n*k*h (dispatched tokens, expert outputs)
                   + 6*n*k*I (gate and up outputs, SwiGLU output)
                 full recompute (stored input): 2*s*b*h  (/ t with sequence parallel or recompute_slice_activation)
               t = model_parallel, a = num_heads, s = seq_length, b = batch_size (per data-parallel rank and
               micro-batch), h = hidden_size. With use_flash_attention the 5as^2b term (the s x s scores, softmax
               and its dropout mask) is dropped. The GPT constants are used unchanged for SwiGLU and GQA (an
               approximation). The first `recompute` layers of a stage are recomputed; one of them needs its full
               activations once more while it is recomputed (+ the largest). Pipeline (1F1B): stage i keeps
               min(pp - i, micro_batch_num) micro-batches in flight.
  logits       last stage: fp32 logits and their softmax for the loss, 2 x 4 B x s*b*V (/ mp if vocab-parallel).
GiB = 2**30 bytes; context.max_device_memory "58GB" is read as 58 GiB, as MindSpore does.
"""
from __future__ import annotations

import re

from ..errors import ConfigError
from .shapes import COLUMN, expert_parallel, shapes_of
from .strategies import dims, layers_per_stage, vocab_parallel

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GIB = 1 << 30


def _get(obj, key, default=None):
    if obj is None or isinstance(obj, str):
        return default
    v = obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)
    return default if v is None else v


# ---------------------------------------------------------------------------------------------- parameter counts
def param_counts(mc) -> dict:
    """Parameters of the whole model, by component (not sharded).

    layers: per decoder layer {attention, norms, mlp, router, experts}; layer / layer_parts: layer 0's total and
    parts; experts: all expert weights; activated: parameters one token uses (top-k of the experts)."""
    sh = shapes_of(mc)
    layers = [sh.layer_params(i) for i in range(mc.num_layers)]
    emb = mc.vocab_size * mc.hidden_size
    head = 0 if mc.tie_word_embeddings else emb
    body = sum(sum(p.values()) for p in layers)
    experts = sum(p["experts"] for p in layers)
    unused = sum(p["experts"] for p in layers) * (1 - sh.top_k / sh.num_experts) if sh.num_experts else 0
    total = emb + body + mc.hidden_size + head
    return {"embedding": emb, "layers": layers, "layer": sum(layers[0].values()), "layer_parts": layers[0],
            "norm_out": mc.hidden_size, "lm_head": head, "experts": experts, "total": total,
            "activated": int(total - unused)}


def layer_params_per_device(parts: dict, mp: int, ep: int) -> tuple:
    """(all, expert) parameters of one layer on one device."""
    experts = parts["experts"] // ep
    return (parts["attention"] + parts["mlp"]) // mp + parts["norms"] + parts["router"] + experts, experts


def lora_adapters(mc, mp: int, ep: int = 1) -> tuple:
    """(per-layer (adapter params per device, of which on experts) list, lm_head adapter params per device, total
    adapters), or (None, 0, 0) without pet_config. Target names are matched as pet/lora.py matches them; a sparse
    layer's `mlp.experts` target gets stacked per-expert adapters (models/moe.py: A1 (E, r, h), B1 (E, 2F, r),
    A2 (E, r, F), B2 (E, h, r)), split by ep like the experts."""
    if not mc.pet_config:
        return None, 0, 0
    from ..pet.lora import parse_pet_config
    pet = parse_pet_config(mc.pet_config)
    r, pattern = pet["lora_rank"], re.compile(pet["target_modules"])
    sh = shapes_of(mc)
    per_layer, total = [], 0
    for i in range(mc.num_layers):
        n_dev = n_exp = 0
        for lin in sh.layer_linears(i):
            if pattern.fullmatch(f"{sh.layer_prefix}.{i}.{lin.name}"):
                total += r * (lin.fan_in + lin.fan_out)
                # column-parallel base: lora_a (r, in) replicated, lora_b (out, r) split; row-parallel: the reverse
                n_dev += (r * lin.fan_in + lin.fan_out * r // mp if lin.kind == COLUMN
                          else r * lin.fan_in // mp + lin.fan_out * r)
        if sh.sparse[i] and pattern.fullmatch(f"{sh.layer_prefix}.{i}.mlp.experts"):
            n = sh.num_experts * r * (2 * sh.hidden + 3 * sh.moe_intermediate)
            total += n
            n_exp = n // ep
        per_layer.append((n_dev + n_exp, n_exp))
    head = 0
    head_name = "lm_head" if sh.family == "llama" else "output_layer"
    if not mc.tie_word_embeddings and pattern.fullmatch(head_name):
        total += r * (mc.hidden_size + mc.vocab_size)
        head = r * mc.hidden_size + r * mc.vocab_size
    return per_layer, head, total


# ---------------------------------------------------------------------------------------------- activations
def activation_bytes_per_layer(mc, pc, batch_size: int, seq_length: int, recompute: bool,
                               slice_activation: bool = False, sparse: bool = False) -> int:
    """Activation bytes one decoder layer keeps for backward, for one micro-batch (see the module docstring);
    `sparse`: the layer's MLP is the MoE block."""
    _, t, _ = dims(pc)
    s, b, h, a = seq_length, batch_size, mc.hidden_size, mc.num_heads
    sp = t > 1 and bool(_get(pc, "use_seq_parallel", False))
    scale = DTYPE_BYTES[mc.compute_dtype] / 2
    if recompute:
        return int(2 * s * b * h * scale / (t if (sp or slice_activation) else 1))
    scores = 0.0 if mc.use_flash_attention else 5.0 * a * s * s * b / t
    attn = s * b * h * (15.0 / t if sp else 7.0 + 8.0 / t) + scores
    if not sparse:
        return int((attn + s * b * h * (19.0 / t if sp else 3.0 + 16.0 / t)) * scale)
    sh = shapes_of(mc)
    n, k, e, inter = s * b / (t if sp else 1), sh.top_k, sh.num_experts, sh.moe_intermediate
    moe = (2 * n * h + 4 * n * k * h + 6 * n * k * inter) * scale + 8 * n * e + 8 * n * k
    return int(attn * scale + moe)


def _recompute_counts(recompute, layer_counts) -> list:
    """Layers fully recomputed on each stage (recompute True/False/None or a per-stage list)."""
    if recompute is None or recompute is False:
        return [0] * len(layer_counts)
    if recompute is True:
        return list(layer_counts)
    out = []
    for n, c in zip(recompute, layer_counts):
        out.append(c if n is True else 0 if n is False else min(int(n), c))
    return out


def _stage(i, layer_ids, n_rec, ctx) -> dict:
    """One pipeline stage's memory (bytes and counts)."""
    mc, pp, micro = ctx["mc"], ctx["pp"], ctx["micro"]
    params = sum(ctx["layer_dev"][j][0] for j in layer_ids)
    expert_params = sum(ctx["layer_dev"][j][1] for j in layer_ids)
    if i == 0:
        params += ctx["emb_dev"]
    if i == pp - 1:
        params += mc.hidden_size + (ctx["emb_dev"] if not mc.tie_word_embeddings or pp > 1 else 0)
    expert_weights = expert_params * ctx["wbytes"]
    adapters = 0
    lora = ctx["lora_layers"]
    if lora is not None:                     # the base (experts too) is frozen: only adapters train
        adapters = sum(lora[j][0] for j in layer_ids) + (ctx["lora_head"] if i == pp - 1 else 0)
        expert_params = sum(lora[j][1] for j in layer_ids)
    trainable = adapters if lora is not None else params
    params += adapters
    in_flight = min(pp - i, micro) if pp > 1 else 1
    full, kept = ctx["act_full"], ctx["act_kept"]

    def act(n):
        if not layer_ids:
            return 0
        rec, rest = layer_ids[:n], layer_ids[n:]
        return (in_flight * (sum(kept[j] for j in rec) + sum(full[j] for j in rest))
                + (max(full[j] for j in rec) if rec else 0))

    wb, opp, dp, rep = ctx["wbytes"], ctx["opt_per_param"], ctx["dp"], ctx["expert_replicas"]
    st = {"stage": i, "layers": len(layer_ids), "recompute_layers": n_rec, "micro_batches_in_flight": in_flight,
          "params_per_device": params, "trainable_per_device": trainable, "expert_trainable_per_device": expert_params,
          "weights": params * wb, "expert_weights": expert_weights, "gradients": trainable * wb,
          "grad_accumulation": trainable * wb if ctx["accumulate"] else 0,
          "optimizer_states_unsharded": trainable * opp,
          "optimizer_states_sharded": (-(-(trainable - expert_params) * opp // dp)
                                       + -(-expert_params * opp // rep)),
          "activations": act(n_rec), "activations_no_recompute": act(0),
          "activations_full_recompute": act(len(layer_ids)), "logits": ctx["logits"] if i == pp - 1 else 0}
    st["optimizer_states"] = st["optimizer_states_sharded" if ctx["shard"] else "optimizer_states_unsharded"]
    fixed = st["weights"] + st["gradients"] + st["grad_accumulation"] + st["logits"]
    st["total"] = fixed + st["optimizer_states"] + st["activations"]
    st["total_no_optimizer_shard"] = fixed + st["optimizer_states_unsharded"] + st["activations"]
    st["total_optimizer_shard"] = fixed + st["optimizer_states_sharded"] + st["activations"]
    st["total_no_recompute"] = fixed + st["optimizer_states"] + st["activations_no_recompute"]
    st["total_full_recompute"] = fixed + st["optimizer_states"] + st["activations_full_recompute"]
    return st


def estimate_memory(mc, pc, recompute, optimizer_shard, batch_size, seq_length, *, gradient_accumulation_steps=1,
                    recompute_slice_activation=False, max_device_memory=None) -> dict:
    """Per-device memory estimate (bytes) on the worst pipeline stage; see the module docstring for the model.

    Keys (bytes unless noted): weights, gradients, grad_accumulation, optimizer_states (as configured),
    optimizer_states_unsharded, optimizer_states_sharded, activations (as configured), activations_no_recompute,
    activations_full_recompute, logits, total (as configured), total_no_optimizer_shard, total_optimizer_shard,
    total_no_recompute, total_full_recompute, max_device_memory (or None); and, not bytes: params_total,
    activated_total, trainable_total, params_per_device, trainable_per_device, expert_trainable_per_device, stage,
    layers_per_stage, recompute_per_stage, micro_batches_in_flight, optimizer_shard, data_parallel,
    model_parallel, pipeline_stage, expert_parallel, num_experts, stages (per-stage dicts with the same byte keys).
    """
    dp, mp, pp = dims(pc)
    ep = expert_parallel(pc)
    counts = layers_per_stage(mc, pc)
    rec = _recompute_counts(recompute, counts)
    pcount = param_counts(mc)
    sh = shapes_of(mc)
    vp = vocab_parallel(mc, pc)
    lora_layers, lora_head, lora_total = lora_adapters(mc, mp, ep)
    wbytes = DTYPE_BYTES[mc.param_init_type]
    act = lambda j, r: activation_bytes_per_layer(  # noqa: E731
        mc, pc, batch_size, seq_length, r, recompute_slice_activation, sh.sparse[j])
    ctx = {"mc": mc, "pp": pp, "dp": dp, "micro": max(1, int(_get(pc, "micro_batch_num", 1))),
           "layer_dev": [layer_params_per_device(p, mp, ep) for p in pcount["layers"]],
           "emb_dev": pcount["embedding"] // mp if vp else pcount["embedding"],
           "lora_layers": lora_layers, "lora_head": lora_head, "wbytes": wbytes,
           "opt_per_param": 8 + (4 if wbytes < 4 else 0), "expert_replicas": max(dp * mp // ep, 1),
           "accumulate": gradient_accumulation_steps > 1 or pp > 1, "shard": bool(optimizer_shard),
           "act_full": [act(j, False) for j in range(mc.num_layers)],
           "act_kept": [act(j, True) for j in range(mc.num_layers)],
           "logits": 2 * 4 * seq_length * batch_size * mc.vocab_size // (mp if vp else 1)}
    stages, start = [], 0
    for i, n_layers in enumerate(counts):
        stages.append(_stage(i, list(range(start, start + n_layers)), rec[i], ctx))
        start += n_layers
    worst = max(stages, key=lambda x: x["total"])
    est = dict(worst)
    for k in ("total_no_optimizer_shard", "total_optimizer_shard", "total_no_recompute", "total_full_recompute"):
        est[k] = max(x[k] for x in stages)     # each variant's own worst stage
    est.update(params_total=pcount["total"] + lora_total, activated_total=pcount["activated"],
               trainable_total=lora_total if lora_layers is not None else pcount["total"],
               layers_per_stage=counts, recompute_per_stage=rec, optimizer_shard=bool(optimizer_shard),
               data_parallel=dp, model_parallel=mp, pipeline_stage=pp, expert_parallel=ep,
               num_experts=sh.num_experts, batch_size=batch_size, seq_length=seq_length, stages=stages,
               max_device_memory=max_device_memory, param_dtype=mc.param_init_type, compute_dtype=mc.compute_dtype,
               lora=lora_layers is not None, flash_attention=bool(mc.use_flash_attention), recompute=recompute)
    return est


def parse_memory(value):
    """'58GB' / '1024MB' / '1TB' / a number of GB -> bytes (GB = 2**30, as MindSpore's max_device_memory)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value * GIB)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)I?B?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ConfigError(f"context.max_device_memory: '{value}' is not a size like '58GB'")
    return int(float(m.group(1)) * {"": GIB, "K": 1 << 10, "M": 1 << 20, "G": GIB, "T": 1 << 40}[m.group(2).upper()])
