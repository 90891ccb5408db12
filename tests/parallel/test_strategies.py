"""Shard strategies against the real tensor shapes of Llama-2-7B and Qwen2.5-7B layers; pipeline stage split."""
import math
import os

import pytest

from mindformers_sft.config import load_config
from mindformers_sft.errors import ConfigError
from mindformers_sft.models.config import LlamaConfig
from mindformers_sft.parallel import RankInfo
from mindformers_sft.parallel.plan import preflight
from mindformers_sft.parallel.strategies import (OPS, apply_strategies, layer_out_strategies, layer_strategies,
                                                 layers_per_stage, stage_of_layer)
from tests.paths import ROOT

LLAMA = os.path.join(ROOT, "configs", "llama2", "finetune_llama2_7b.yaml")
QWEN = os.path.join(ROOT, "research", "qwen2_5", "finetune_qwen2_5_7b.yaml")


def _mc(path):
    if "qwen" in path:
        from mindformers_sft.run import register
        register(os.path.join(ROOT, "research", "qwen2_5"))
    cfg = load_config(path)
    d = dict(cfg.model.model_config)
    d.setdefault("model_type", "qwen2" if d.get("qkv_has_bias") else "llama")
    return LlamaConfig.from_dict(d)


def shapes(mc, global_batch, seq):
    """Input shapes of each op as models/llama.py and models/kernels.py call it (global, before sharding)."""
    B, S, H, V, inter = global_batch, seq, mc.hidden_size, mc.vocab_size, mc.intermediate_size
    N, NKV, D = mc.num_heads, mc.n_kv_heads, mc.head_dim
    KV, rep = NKV * D, N // NKV
    x = (B * S, H)                                     # Linear flattens (B, S, in) -> (B*S, in)
    out = {
        "embedding": [(V, H), (B, S)],                 # gather(table, ids, axis 0)
        "attention.wq": [x, (H, H)],                   # weights are (out, in): MatMul(transpose_b=True)
        "attention.wk": [x, (KV, H)],
        "attention.wv": [x, (KV, H)],
        "attention.scores": [(B, NKV, rep * S, D), (B, NKV, S, D)],   # kernels.attention groups q by kv head
        "attention.context": [(B, NKV, rep * S, S), (B, NKV, S, D)],
        "attention.wo": [x, (H, H)],
        "feed_forward.w1": [x, (inter, H)],
        "feed_forward.w3": [x, (inter, H)],
        "feed_forward.w2": [(B * S, inter), (H, inter)],
        "lm_head": [x, (V, H)],
        "loss": [(B * S, V)],
        # LoRA of rank 8 on a column layer (wq: in H, out H) and a row layer (w2: in inter, out H)
        "lora_a.column": [x, (8, H)], "lora_b.column": [(B * S, 8), (H, 8)],
        "lora_a.row": [(B * S, inter), (8, inter)], "lora_b.row": [(B * S, 8), (H, 8)],
    }
    if mc.qkv_has_bias:
        out.update({"attention.wq.bias": [(B * S, H), (H,)], "attention.wk.bias": [(B * S, KV), (KV,)],
                    "attention.wv.bias": [(B * S, KV), (KV,)]})
    return out


def devices_used(op, st):
    """Size of the device matrix the strategy asks for; asserts that shared dimensions are split alike."""
    prim = OPS[op][0]
    if prim == "MatMul(transpose_b=True)":            # x (M, K), w (N, K)
        (m, k), (n, k2) = st
        assert k == k2, f"{op}: contraction dim split {k} vs {k2}"
        return m * k * n
    if prim == "BatchMatMul(transpose_b=True)":       # a (b0, b1, M, K), b (b0, b1, N, K)
        (b0, b1, m, k), (c0, c1, n, k2) = st
        assert (b0, b1, k) == (c0, c1, k2), f"{op}: {st}"
        return b0 * b1 * m * k * n
    if prim == "BatchMatMul":                         # a (b0, b1, M, K), b (b0, b1, K, N)
        (b0, b1, m, k), (c0, c1, k2, n) = st
        assert (b0, b1, k) == (c0, c1, k2), f"{op}: {st}"
        return b0 * b1 * m * k * n
    if prim == "Add":                                 # x (M, N) + bias (N,)
        (m, n), (n2,) = st
        assert n == n2
        return m * n
    return math.prod(f for t in st for f in t)        # Gather, loss: independent inputs


def assert_splits_fit(st, sh):
    """Every op has a strategy, one split per dimension of each input, each split dividing its dimension."""
    assert set(st) == set(sh)
    for op, strategy in st.items():
        assert len(strategy) == len(sh[op]), op
        for split, dims in zip(strategy, sh[op]):
            assert len(split) == len(dims), (op, split, dims)
            for f, d in zip(split, dims):
                assert f >= 1 and d % f == 0, f"{op}: split {split} does not divide shape {dims}"


LAYOUTS = [(path, mp, vocab_emb_dp) for path in (LLAMA, QWEN) for mp in (2, 4, 8) for vocab_emb_dp in (True, False)]


@pytest.mark.parametrize("path,mp,vocab_emb_dp", LAYOUTS)
def test_strategies_fit_the_real_shapes(path, mp, vocab_emb_dp):
    mc = _mc(path)
    dp = 8 // mp
    pc = {"data_parallel": dp, "model_parallel": mp, "pipeline_stage": 1, "vocab_emb_dp": vocab_emb_dp}
    cfg = load_config(path, [f"parallel_config.model_parallel={mp}", f"parallel_config.data_parallel={dp}",
                             "parallel_config.pipeline_stage=1", f"parallel_config.vocab_emb_dp={vocab_emb_dp}",
                             "recompute_config.recompute=True"])
    cfg.run_mode = "plan"
    if mc.n_kv_heads % mp:      # Qwen2.5-7B, mp 8: 4 kv heads cannot be split 8 ways -> the planner refuses it
        with pytest.raises(ConfigError, match="n_kv_heads 4"):
            preflight(cfg, mc, RankInfo(world_size=8), log=lambda *a: None)
        return
    preflight(cfg, mc, RankInfo(world_size=8), log=lambda *a: None)
    st = layer_strategies(mc, pc)
    sh = shapes(mc, global_batch=cfg.runner_config.batch_size * dp, seq=mc.seq_length)
    assert_splits_fit(st, sh)
    for op, strategy in st.items():
        assert devices_used(op, strategy) <= dp * mp, (op, strategy)
    col, row = ((dp, 1), (mp, 1)), ((dp, mp), (1, mp))
    for op in ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"):
        assert st[op] == col, op                               # weight (out, in) split on out
        assert devices_used(op, st[op]) == dp * mp
    for op in ("attention.wo", "feed_forward.w2"):
        assert st[op] == row, op                               # weight split on in, partial sums reduced
        assert devices_used(op, st[op]) == dp * mp
    assert st["attention.scores"] == st["attention.context"] == ((dp, mp, 1, 1), (dp, mp, 1, 1))
    if vocab_emb_dp:
        assert st["embedding"] == ((1, 1), (dp, 1)) and st["lm_head"] == ((dp, 1), (1, 1))
    else:
        assert st["embedding"] == ((mp, 1), (dp, 1)) and st["lm_head"] == ((dp, 1), (mp, 1))
    assert st["loss"] == ((dp, mp),)                           # vocab-parallel cross entropy
    if mc.qkv_has_bias:
        assert st["attention.wk.bias"] == ((dp, mp), (mp,))
    # LoRA: column layer -> lora_b split like the weight's rows; row layer -> lora_a split like its columns
    assert st["lora_a.column"] == ((dp, 1), (1, 1)) and st["lora_b.column"] == col
    assert st["lora_a.row"] == row and st["lora_b.row"] == ((dp, 1), (1, 1))


def test_sequence_parallel_reduce_scatters_row_parallel_outputs():
    mc = _mc(LLAMA)
    pc = {"data_parallel": 2, "model_parallel": 4, "use_seq_parallel": True}
    assert layer_out_strategies(mc, pc) == {"attention.wo": ((8, 1),), "feed_forward.w2": ((8, 1),)}
    assert layer_out_strategies(mc, dict(pc, use_seq_parallel=False)) == {}
    assert layer_out_strategies(mc, dict(pc, model_parallel=1)) == {}


def test_stage_split():
    mc = _mc(QWEN)                                             # 28 layers
    assert layers_per_stage(mc, {"pipeline_stage": 2}) == [14, 14]
    assert layers_per_stage(mc, {"pipeline_stage": 3}) == [9, 9, 10]        # remainder on the last stages
    assert layers_per_stage(mc, {"pipeline_stage": 8}) == [3, 3, 3, 3, 4, 4, 4, 4]
    stages = stage_of_layer(mc, {"pipeline_stage": 3})
    assert len(stages) == 28 and stages == sorted(stages) and stages.count(2) == 10 and stages[0] == 0
    mc.extra["offset"] = [1, 0, 0]                             # MindFormers' offset: avg + offset per stage
    assert layers_per_stage(mc, {"pipeline_stage": 3}) == [10, 9, 9]
    mc.extra["offset"] = [1, 1, 0]
    with pytest.raises(ConfigError, match=r"offset \[1, 1, 0\] adds up to 2.*must add up to 1"):
        layers_per_stage(mc, {"pipeline_stage": 3})
    mc.extra["offset"] = 0
    with pytest.raises(ConfigError, match="must add up to 1"):
        layers_per_stage(mc, {"pipeline_stage": 3})
    assert layers_per_stage(mc, {"pipeline_stage": 4}) == [7, 7, 7, 7]
    with pytest.raises(ConfigError, match="pipeline_stage 29 exceeds model_config.num_layers 28"):
        layers_per_stage(mc, {"pipeline_stage": 29})


def test_apply_strategies_reaches_the_model_ops():
    """On CPU only the primitives' in_strategy attributes can be set (force=True); no parallel compile."""
    from mindformers_sft.models.llama import LlamaForCausalLM
    from mindformers_sft.pet.lora import apply_lora
    mc = LlamaConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, n_kv_heads=2, intermediate_size=48,
                     qkv_has_bias=True, model_type="qwen2")
    model = LlamaForCausalLM(mc)
    apply_lora(model, {"pet_type": "lora", "lora_rank": 2, "target_modules": ".*wq|.*w2"})
    pc = {"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 2,
          "vocab_emb_dp": False}
    # not under semi-auto parallel: nothing is touched
    assert apply_strategies(model, pc) == {"applied": {}, "missing": {}}
    res = apply_strategies(model, pc, force=True)
    st = layer_strategies(mc, pc)
    layer = model.model.layers[3]
    assert layer.attention.wq.base.matmul.in_strategy == st["attention.wq"]
    assert layer.attention.wo.matmul.in_strategy == st["attention.wo"] == ((2, 2), (1, 2))
    assert layer.feed_forward.w2.base.matmul.in_strategy == st["feed_forward.w2"]
    assert model.lm_head.matmul.in_strategy == ((2, 1), (2, 1))
    assert layer.attention.wq.base.bias_add.in_strategy == ((2, 2), (2,))
    assert layer.attention.wq.matmul_a.in_strategy == ((2, 1), (1, 1))
    assert layer.attention.wq.matmul_b.in_strategy == ((2, 1), (2, 1))
    assert layer.feed_forward.w2.base.matmul.in_strategy == ((2, 2), (1, 2))
    assert layer.feed_forward.w2.matmul_a.in_strategy == ((2, 2), (1, 2))
    assert layer.feed_forward.w2.matmul_b.in_strategy == ((2, 1), (1, 1))
    assert model.model.tok_embeddings.gather.in_strategy == ((2, 1), (2, 1))
    # per layer: 7 matmuls, 3 bias adds, 2 LoRA layers x 2 matmuls; plus the embedding and the lm_head
    assert len(res["applied"]) == 4 * (7 + 3 + 4) + 2
    assert [l.pipeline_stage for l in model.model.layers] == [0, 0, 1, 1]
    # gradient_aggregation_group (default 4) over 4 layers: one all-reduce fusion group per layer
    assert [l.attention.wq.lora_a.comm_fusion for l in model.model.layers] == [1, 2, 3, 4]   # trainable ones
    assert model.lm_head.pipeline_stage == 1 and model.model.tok_embeddings.pipeline_stage == 0
    assert "embedding" not in res["missing"] and not any("LoRA" in k for k in res["missing"])
    # the weight shapes the strategies were checked against are the model's
    sh = shapes(mc, 2, 8)
    for name in ("attention.wk", "feed_forward.w2"):
        group, attr = name.split(".")
        cell = getattr(getattr(layer, group), attr)
        assert tuple(getattr(cell, "base", cell).weight.shape) == sh[name][1]
    assert tuple(model.model.tok_embeddings.embedding_weight.shape) == sh["embedding"][0]
