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

These are the strategies of MindFormers' LLamaAttention / LlamaFeedForward / LlamaEmbedding / LlamaForCausalLM
(with context_parallel 1). Only `apply_strategies` touches MindSpore, and it only runs under (semi-)auto parallel
on Ascend; everything else is pure arithmetic and unit-tested on CPU.
"""
from __future__ import annotations

from ..errors import ConfigError

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


def layer_out_strategies(mc, pc) -> dict:
    """out_strategy of the row-parallel matmuls: reduce-scatter over the sequence with use_seq_parallel."""
    dp, mp, _ = dims(pc)
    if mp > 1 and _get(pc, "use_seq_parallel", False):
        return {"attention.wo": ((dp * mp, 1),), "feed_forward.w2": ((dp * mp, 1),)}
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
    strat, out = layer_strategies(mc, pc), layer_out_strategies(mc, pc)
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

    stages = stage_of_layer(mc, pc)
    from .context import comm_fusion_groups
    fusion = comm_fusion_groups(mc.num_layers, _get(pc, "gradient_aggregation_group", 4))
    for i, layer in enumerate(model.model.layers):
        layer.set_comm_fusion(fusion[i])        # gradient all-reduce fusion (gradient_aggregation_group)
        for name in LINEARS:
            group, attr = name.split(".")
            cell = getattr(getattr(layer, group), attr)
            path = f"model.layers.{i}.{name}"
            shard(base(cell).matmul, f"{path}.matmul", name)
            if name + ".bias" in strat:
                shard(base(cell).bias_add, f"{path}.bias_add", name + ".bias")
            if cell is not base(cell):          # LoRA
                kind = "row" if name in ("attention.wo", "feed_forward.w2") else "column"
                shard(cell.matmul_a, f"{path}.matmul_a", f"lora_a.{kind}")
                shard(cell.matmul_b, f"{path}.matmul_b", f"lora_b.{kind}")
        if pp > 1:
            layer.pipeline_stage = stages[i]
    shard(model.model.tok_embeddings.gather, "model.tok_embeddings.gather", "embedding")
    if not mc.tie_word_embeddings:
        shard(model.lm_head.matmul, "lm_head.matmul", "lm_head")
    else:
        shard(model.head_matmul, "head_matmul", "lm_head")
    if pp > 1:
        model.model.tok_embeddings.pipeline_stage = 0
        model.model.norm_out.pipeline_stage = pp - 1
        if not mc.tie_word_embeddings:
            model.lm_head.pipeline_stage = pp - 1
    if not force:          # module-level primitives shared by every layer (same strategy for all of them)
        shard(kernels._BMM_TB, "kernels._BMM_TB", "attention.scores")
        shard(kernels._BMM, "kernels._BMM", "attention.context")
    missing["attention (Ascend)"] = ("kernels.attention calls ops.flash_attention_score on Ascend; needs a "
                                     "FlashAttentionScore primitive per layer, sharded ((dp, mp, 1, 1), ...)")
    missing["loss"] = "loss_sum_and_count uses functional ops; needs primitives to shard ((dp, mp),) on logits"
    missing["norms/rope/swiglu"] = "functional kernels; default (data-parallel) strategies apply"
    return {"applied": applied, "missing": missing}
