"""MindSpore shard strategies of the Llama-family decoder, as MindFormers sets them; pipeline stage of each layer.

Conventions (MindSpore `Primitive.shard(in_strategy)`): one tuple per input, one split factor per dimension.
The projections are `ops.MatMul(transpose_b=True)` on a flattened input x (B*S, in) and a weight (out, in):

  column-parallel  wq, wk, wv, w1, w3, lm_head   ((dp, 1), (mp, 1))   weight split on `out`; output (dp, mp)
  row-parallel     wo, w2                        ((dp, mp), (1, mp))  weight split on `in`; partial sums are
                                                 all-reduced (or reduce-scattered to (dp*mp, 1) with sequence
                                                 parallel: see `layer_out_strategies`)
  q/k/v bias add                                 ((dp, mp), (mp,))
  attention scores q @ k^T, probs @ v            BatchMatMul ((dp, mp, 1, 1), (dp, mp, 1, 1)): batch over dp,
                                                 (kv) heads over mp
  embedding Gather(table (V, H), ids (B, S))     ((mp, 1), (dp, 1)) vocab-parallel, ((1, 1), (dp, 1)) when
                                                 vocab_emb_dp (or V % mp != 0, where MindFormers falls back)
  lm_head                                        ((dp, 1), (mp, 1)); ((dp, 1), (1, 1)) when vocab_emb_dp, as
                                                 MindFormers' LlamaForCausalLM
  cross entropy on logits (B*S, V)               ((dp, mp),): vocab-parallel softmax/one-hot (mp -> 1 if V % mp)
  LoRA x @ lora_a^T, h @ lora_b^T                column layer ((dp, 1), (1, 1)), ((dp, 1), (mp, 1));
                                                 row layer ((dp, mp), (1, mp)), ((dp, 1), (1, 1))

Qwen3 / Qwen3-MoE (`qwen3_layer_strategies`, MindFormers 1.8 names; mcore attention, MLP and MoE layer):
  linear_qkv (or linear_q/k/v), linear_fc1 (or gating, hidden)   column ((dp, 1), (mp, 1)): the fused rows are laid
                                                 out per kv group / gate-up pair, so a split on `out` keeps whole
                                                 heads and gate/up pairs together
  linear_proj, linear_fc2                        row ((dp, mp), (1, mp))
  q_layernorm / k_layernorm RmsNorm on (B, S, N, D) and weight (D,)   ((dp, 1, mp, 1), (1,)): heads over mp
  MoE (tokens spread over the dp x mp ranks of a stage; experts over ep, MindFormers' (dp x mp / ep, ep) matrix):
    router MatMul(transpose_b) x (T, H), weight (E, H)    ((dp*mp, 1), (1, 1)): weight replicated
    experts grouped matmuls x (T*k, H|F), weight (E, H, 2F) / (E, F, H)   ((dp*mp, 1), (ep, 1, 1)): whole experts
                                                 per rank; tokens reach their experts by all-to-all
    experts LoRA BatchMatMul A (E, r, in), B (E, out, r)   ((ep, 1, 1), (ep, 1, 1))

These are the strategies of MindFormers' LLamaAttention / LlamaFeedForward / LlamaEmbedding / LlamaForCausalLM
and of its mcore SelfAttention / MLP / TopKRouter / GroupedMLP (with context_parallel 1). Only `apply_strategies`
touches MindSpore, and it only runs under (semi-)auto parallel on Ascend; everything else is pure arithmetic and
unit-tested on CPU.
"""
from __future__ import annotations

from ..errors import ConfigError
from .shapes import expert_parallel, shapes_of

COLUMN, ROW = "column", "row"

# name -> (MindSpore primitive, pattern, where it lives in models/llama.py (None: not reachable as a primitive))
OPS = {
    "embedding": ("Gather", "vocab", "tok_embeddings.gather"),
    "attention.wq": ("MatMul(transpose_b=True)", COLUMN, "attention.wq.matmul"),
    "attention.wk": ("MatMul(transpose_b=True)", COLUMN, "attention.wk.matmul"),
    "attention.wv": ("MatMul(transpose_b=True)", COLUMN, "attention.wv.matmul"),
    "attention.wq.bias": ("Add", "bias", "attention.wq.bias_add"),
    "attention.wk.bias": ("Add", "bias", "attention.wk.bias_add"),
    "attention.wv.bias": ("Add", "bias", "attention.wv.bias_add"),
    "lora_a.column": ("MatMul(transpose_b=True)", "lora", "<column layer>.matmul_a"),
    "lora_b.column": ("MatMul(transpose_b=True)", "lora", "<column layer>.matmul_b"),
    "lora_a.row": ("MatMul(transpose_b=True)", "lora", "<row layer>.matmul_a"),
    "lora_b.row": ("MatMul(transpose_b=True)", "lora", "<row layer>.matmul_b"),
    "attention.scores": ("BatchMatMul(transpose_b=True)", "heads", "kernels._BMM_TB"),
    "attention.context": ("BatchMatMul", "heads", "kernels._BMM"),
    "attention.wo": ("MatMul(transpose_b=True)", ROW, "attention.wo.matmul"),
    "feed_forward.w1": ("MatMul(transpose_b=True)", COLUMN, "feed_forward.w1.matmul"),
    "feed_forward.w3": ("MatMul(transpose_b=True)", COLUMN, "feed_forward.w3.matmul"),
    "feed_forward.w2": ("MatMul(transpose_b=True)", ROW, "feed_forward.w2.matmul"),
    "lm_head": ("MatMul(transpose_b=True)", COLUMN, "lm_head.matmul"),
    "loss": ("ReduceMax/Sub/Exp/ReduceSum/OneHot on logits", "vocab", None),
}

LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
           "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


def _get(pc, key, default=None):
    if isinstance(pc, dict):
        v = pc.get(key, default)
    else:
        v = getattr(pc, key, default)
    return default if v is None else v


def dims(pc):
    """(data_parallel, model_parallel, pipeline_stage) of a parallel_config (a Config, dict or object)."""
    return int(_get(pc, "data_parallel", 1)), int(_get(pc, "model_parallel", 1)), int(_get(pc, "pipeline_stage", 1))


def comm_fusion_groups(num_layers: int, groups: int, offset: int = 0) -> list:
    """Gradient all-reduce fusion group of each decoder layer for parallel_config.gradient_aggregation_group
    (MindFormers' LayerSetting: layers are cut into about `groups` consecutive runs, ids from 1)."""
    groups = max(int(groups or 1), 1)
    width = max((num_layers + offset) // groups, 1)
    return [(i + offset) // width + 1 for i in range(num_layers)]


def vocab_parallel(mc, pc) -> bool:
    """True when the embedding table and the lm_head are split over the vocabulary by model_parallel."""
    _, mp, _ = dims(pc)
    return mp > 1 and not _get(pc, "vocab_emb_dp", True) and mc.vocab_size % mp == 0


def layer_strategies(mc, pc) -> dict:
    """name -> in_strategy for every matmul and the embedding of a decoder layer, the lm_head and the loss.

    Names are those of `OPS`; `attention.w{q,k,v}.bias` only when model_config.qkv_has_bias.
    """
    dp, mp, _ = dims(pc)
    col, row = ((dp, 1), (mp, 1)), ((dp, mp), (1, mp))
    heads = ((dp, mp, 1, 1), (dp, mp, 1, 1))
    vp = vocab_parallel(mc, pc)
    s = {
        "embedding": ((mp, 1), (dp, 1)) if vp else ((1, 1), (dp, 1)),
        "attention.wq": col, "attention.wk": col, "attention.wv": col,
        "attention.scores": heads,
        "attention.context": heads,
        "attention.wo": row,
        "feed_forward.w1": col, "feed_forward.w3": col,
        "feed_forward.w2": row,
        "lm_head": ((dp, 1), (mp, 1)) if vp else ((dp, 1), (1, 1)),
        "loss": ((dp, mp if mc.vocab_size % mp == 0 else 1),),
        # LoRA (MindFormers / mindpet): on a column layer lora_a is replicated and lora_b split like the weight;
        # on a row layer lora_a is split on `in` (partial sums all-reduced) and lora_b replicated
        "lora_a.column": ((dp, 1), (1, 1)), "lora_b.column": ((dp, 1), (mp, 1)),
        "lora_a.row": ((dp, mp), (1, mp)), "lora_b.row": ((dp, 1), (1, 1)),
    }
    if mc.qkv_has_bias:
        for n in ("attention.wq.bias", "attention.wk.bias", "attention.wv.bias"):
            s[n] = ((dp, mp), (mp,))
    return s


QWEN3_COLUMN = ("self_attention.linear_qkv", "self_attention.linear_q", "self_attention.linear_k",
                "self_attention.linear_v", "mlp.linear_fc1", "mlp.gating", "mlp.hidden")
QWEN3_ROW = ("self_attention.linear_proj", "mlp.linear_fc2")


def qwen3_layer_strategies(mc, pc) -> dict:
    """name -> in_strategy for a Qwen3 / Qwen3-MoE model: the projections (names of QWEN3_COLUMN / QWEN3_ROW and
    `<name>.bias` when qkv_has_bias), the q/k norms, the attention batch matmuls, embedding, output_layer, loss and
    LoRA as `layer_strategies`; with experts also mlp.router, mlp.experts.gmm1 / gmm2 and mlp.experts.lora."""
    dp, mp, _ = dims(pc)
    base = layer_strategies(mc, pc)
    col, row = ((dp, 1), (mp, 1)), ((dp, mp), (1, mp))
    s = {k: base[k] for k in ("embedding", "attention.scores", "attention.context", "loss", "lora_a.column",
                              "lora_b.column", "lora_a.row", "lora_b.row")}
    s["output_layer"] = base["lm_head"]
    s.update({n: col for n in QWEN3_COLUMN})
    s.update({n: row for n in QWEN3_ROW})
    s["self_attention.q_layernorm"] = s["self_attention.k_layernorm"] = ((dp, 1, mp, 1), (1,))
    if mc.qkv_has_bias:
        for n in ("linear_qkv", "linear_q", "linear_k", "linear_v"):
            s[f"self_attention.{n}.bias"] = ((dp, mp), (mp,))
    if shapes_of(mc).num_experts:
        ep, tokens = expert_parallel(pc), dp * mp
        s["mlp.router"] = ((tokens, 1), (1, 1))
        s["mlp.experts.gmm1"] = s["mlp.experts.gmm2"] = ((tokens, 1), (ep, 1, 1))
        s["mlp.experts.lora"] = ((ep, 1, 1), (ep, 1, 1))
    return s


def layer_out_strategies(mc, pc) -> dict:
    """out_strategy of the row-parallel matmuls: reduce-scatter over the sequence with use_seq_parallel."""
    dp, mp, _ = dims(pc)
    if mp > 1 and _get(pc, "use_seq_parallel", False):
        rows = QWEN3_ROW if shapes_of(mc).family == "qwen3" else ("attention.wo", "feed_forward.w2")
        return {name: ((dp * mp, 1),) for name in rows}
    return {}


def _offset(mc):
    extra = getattr(mc, "extra", None) or {}
    return extra.get("offset")


def layers_per_stage(mc, pc) -> list:
    """Decoder layers held by each pipeline stage.

    MindFormers' LayerSetting: every stage gets num_layers // pipeline_stage layers plus model_config.offset[stage]
    (an int is broadcast to every stage), and the offsets must add up to num_layers % pipeline_stage. Without an
    `offset` in the YAML the remainder goes to the last stages, one layer each (the embedding sits on stage 0, so
    this evens out the work); that is MindFormers' split with offset [0, ..., 0, 1, ..., 1].
    """
    _, _, pp = dims(pc)
    n = mc.num_layers
    if pp < 1:
        raise ConfigError(f"parallel_config.pipeline_stage must be >= 1, got {pp}")
    if n < pp:
        raise ConfigError(f"parallel_config.pipeline_stage {pp} exceeds model_config.num_layers {n}: every stage "
                          f"needs at least one layer; set pipeline_stage to at most {n}")
    avg, rem = divmod(n, pp)
    offset = _offset(mc)
    if offset is None:
        return [avg + (1 if i >= pp - rem else 0) for i in range(pp)]
    if isinstance(offset, (list, tuple)) and len(offset) == 1 and isinstance(offset[0], (list, tuple)):
        offset = offset[0]       # [[...]]: pp_interleave_num 1
    if isinstance(offset, bool) or not (isinstance(offset, int) or (
            isinstance(offset, (list, tuple)) and all(isinstance(o, int) and not isinstance(o, bool)
                                                      for o in offset))):
        raise ConfigError(f"model_config.offset: expected an int or a list of {pp} ints, got {offset!r}")
    offs = [offset] * pp if isinstance(offset, int) else list(offset)
    suggestion = [0] * (pp - rem) + [1] * rem
    if len(offs) != pp:
        raise ConfigError(f"model_config.offset {list(offs)} has {len(offs)} entries but pipeline_stage is {pp}: "
                          f"give one per stage, e.g. {suggestion}")
    if sum(offs) != rem:
        raise ConfigError(f"model_config.offset {offs} adds up to {sum(offs)}, but num_layers {n} % pipeline_stage "
                          f"{pp} = {rem}: the offsets must add up to {rem}, e.g. offset: {suggestion}")
    counts = [avg + o for o in offs]
    if min(counts) < 1:
        raise ConfigError(f"model_config.offset {offs} leaves stage {counts.index(min(counts))} with "
                          f"{min(counts)} layers (split {counts}); every stage needs at least one layer")
    return counts


def stage_of_layer(mc, pc) -> list:
    """Pipeline stage of each decoder layer (list of num_layers ints); see `layers_per_stage`."""
    out = []
    for stage, count in enumerate(layers_per_stage(mc, pc)):
        out += [stage] * count
    return out


# ---------------------------------------------------------------------------------------------------------------
# Ascend only: NOT exercised on CPU (MindSpore's semi_auto/auto parallel refuse the CPU backend).
# ---------------------------------------------------------------------------------------------------------------
def apply_strategies(model, pc, force: bool = False) -> dict:
    """Call `.shard()` on the model's primitives and set each cell's pipeline_stage (semi-auto parallel, Ascend).

    Does nothing unless MindSpore's parallel_mode is semi_auto_parallel / auto_parallel (or `force`, which only
    sets the primitives' in_strategy attributes, harmless in PyNative on CPU; used by the unit test).
    Returns {"applied": {path: strategy}, "missing": {name: why}}: the ops of models/llama.py that are not
    primitives held as attributes cannot be sharded from here (they get MindSpore's default data-parallel
    strategy, or sharding propagation under auto_parallel).
    """
    import mindspore as ms
    mode = ms.get_auto_parallel_context("parallel_mode")
    if not force and mode not in ("semi_auto_parallel", "auto_parallel"):
        return {"applied": {}, "missing": {}}
    from ..models import kernels
    mc = model.config
    qwen3 = shapes_of(mc).family == "qwen3"
    strat = qwen3_layer_strategies(mc, pc) if qwen3 else layer_strategies(mc, pc)
    out = layer_out_strategies(mc, pc)
    _, _, pp = dims(pc)
    applied, missing = {}, {}

    def base(cell):        # a LoraLinear keeps the frozen Linear as `.base`
        return getattr(cell, "base", cell)

    def shard(prim, path, name):
        if name in out:
            prim.shard(strat[name], out[name])
        else:
            prim.shard(strat[name])
        applied[path] = strat[name]

    def find(cell, dotted):
        for attr in dotted.split("."):
            cell = getattr(cell, attr, None)
        return cell

    stages = stage_of_layer(mc, pc)
    fusion = comm_fusion_groups(mc.num_layers, _get(pc, "gradient_aggregation_group", 4))
    layers, prefix = (model.decoder.layers, "decoder.layers") if qwen3 else (model.model.layers, "model.layers")
    linears, rows = (QWEN3_COLUMN + QWEN3_ROW, QWEN3_ROW) if qwen3 else (LINEARS, ("attention.wo", "feed_forward.w2"))
    for i, layer in enumerate(layers):
        layer.set_comm_fusion(fusion[i])        # gradient all-reduce fusion (gradient_aggregation_group)
        for name in linears:
            cell = find(layer, name)            # absent: the other qkv_concat form, or a sparse layer's MLP
            if cell is None:
                continue
            path = f"{prefix}.{i}.{name}"
            shard(base(cell).matmul, f"{path}.matmul", name)
            if name + ".bias" in strat:
                shard(base(cell).bias_add, f"{path}.bias_add", name + ".bias")
            if cell is not base(cell):          # LoRA
                kind = "row" if name in rows else "column"
                shard(cell.matmul_a, f"{path}.matmul_a", f"lora_a.{kind}")
                shard(cell.matmul_b, f"{path}.matmul_b", f"lora_b.{kind}")
        if qwen3:
            _shard_qwen3_extras(layer, f"{prefix}.{i}", shard, find, missing)
        if pp > 1:
            layer.pipeline_stage = stages[i]
    if qwen3:
        shard(model.embedding.word_embeddings.gather, "embedding.word_embeddings.gather", "embedding")
        head = (model.output_layer.matmul, "output_layer.matmul") if not mc.tie_word_embeddings else \
            (model.head_matmul, "head_matmul")
        shard(*head, "output_layer")
        ends = (model.embedding, model.decoder.final_layernorm, getattr(model, "output_layer", None))
    else:
        shard(model.model.tok_embeddings.gather, "model.tok_embeddings.gather", "embedding")
        head = (model.lm_head.matmul, "lm_head.matmul") if not mc.tie_word_embeddings else \
            (model.head_matmul, "head_matmul")
        shard(*head, "lm_head")
        ends = (model.model.tok_embeddings, model.model.norm_out, getattr(model, "lm_head", None))
    if pp > 1:
        ends[0].pipeline_stage = 0
        ends[1].pipeline_stage = pp - 1
        if ends[2] is not None:
            ends[2].pipeline_stage = pp - 1
    if not force:          # module-level primitives shared by every layer (same strategy for all of them)
        shard(kernels._BMM_TB, "kernels._BMM_TB", "attention.scores")
        shard(kernels._BMM, "kernels._BMM", "attention.context")
    missing["attention (Ascend)"] = ("kernels.attention calls ops.flash_attention_score on Ascend; needs a "
                                     "FlashAttentionScore primitive per layer, sharded ((dp, mp, 1, 1), ...)")
    missing["loss"] = "loss_sum_and_count uses functional ops; needs primitives to shard ((dp, mp),) on logits"
    missing["norms/rope/swiglu"] = "functional kernels; default (data-parallel) strategies apply"
    return {"applied": applied, "missing": missing}


def _shard_qwen3_extras(layer, path, shard, find, missing):
    """q/k norms and the MoE block of one Qwen3 / Qwen3-MoE layer (primitives where the model holds them)."""
    for name in ("self_attention.q_layernorm", "self_attention.k_layernorm"):
        prim = getattr(find(layer, name), "norm_op", None)
        if prim is not None:
            shard(prim, f"{path}.{name}.norm_op", name)
        else:
            missing["q/k norms"] = ("kernels.rms_norm calls functional ops.rms_norm; needs a RmsNorm primitive per "
                                    "norm, sharded ((dp, 1, mp, 1), (1,)) (heads over mp)")
    router = find(layer, "mlp.router")
    if router is None:
        return
    shard(router.matmul, f"{path}.mlp.router.matmul", "mlp.router")
    experts = find(layer, "mlp.experts")
    if getattr(experts, "lora_rank", 0):
        shard(experts.bmm_lora, f"{path}.mlp.experts.bmm_lora", "mlp.experts.lora")
    if getattr(experts, "gmm", None) is not None:
        shard(experts.gmm, f"{path}.mlp.experts.gmm", "mlp.experts.gmm1")
    else:
        missing["experts"] = ("kernels.moe_experts_ascend builds its GroupedMatmul per call and has no all-to-all "
                              "token dispatch (MindFormers' MoEAlltoAllTokenDispatcher): experts are not split by "
                              "expert_parallel at run time; needs a GroupedMatmul held by GroupedExperts, sharded "
                              "((dp*mp, 1), (ep, 1, 1)), and the dispatch")
