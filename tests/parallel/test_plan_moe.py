"""Planner with Qwen3 / Qwen3-MoE: parameter counts against the published sizes and transformers' models, memory
against a hand count, and expert_parallel's divisibility rules (MindFormers' MoELayer / GroupedMLP)."""
import pytest
import torch

from mindformers_sft.errors import ConfigError
from mindformers_sft.models.config import LlamaConfig
from mindformers_sft.parallel.memory import activation_bytes_per_layer, estimate_memory, param_counts
from mindformers_sft.parallel.plan import check_layout, format_table

# config.json of Qwen/Qwen3-8B and Qwen/Qwen3-30B-A3B on the Hugging Face hub, written here by hand
QWEN3_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                     norm_topk_prob=True, tie_word_embeddings=False)


def _mc(hf, model_type, **kw):
    return LlamaConfig(model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                       num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                       n_kv_heads=hf["num_key_value_heads"], head_dim=hf["head_dim"],
                       intermediate_size=hf["intermediate_size"], tie_word_embeddings=hf["tie_word_embeddings"],
                       **{k: hf[k] for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                             "decoder_sparse_step", "mlp_only_layers") if k in hf}, **kw)


def _hf_count(hf, cls_name, layers):
    """Parameters of transformers' model with `layers` decoder layers (meta device: no memory)."""
    import transformers
    cfg_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    with torch.device("meta"):
        model = getattr(transformers, cls_name)(cfg_cls(**dict(hf, num_hidden_layers=layers)))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("hf,mtype,cls,published,non_embedding", [
    (QWEN3_8B, "qwen3", "Qwen3ForCausalLM", 8.19e9, 6.95e9),          # model card: 8.2B, 6.95B non-embedding
    (QWEN3_30B_A3B, "qwen3_moe", "Qwen3MoeForCausalLM", 30.5e9, 29.9e9),   # 30.5B total, 29.9B non-embedding
])
def test_param_counts_match_published_sizes_and_transformers(hf, mtype, cls, published, non_embedding):
    counts = param_counts(_mc(hf, mtype))
    assert abs(counts["total"] - published) / published < 0.01
    emb = hf["vocab_size"] * hf["hidden_size"]
    assert abs(counts["total"] - 2 * emb - non_embedding) / non_embedding < 0.01
    # exact against transformers: one and two layers give the embedding/head and the per-layer count
    one, two = _hf_count(hf, cls, 1), _hf_count(hf, cls, 2)
    assert counts["total"] == one + (hf["num_hidden_layers"] - 1) * (two - one)
    if mtype == "qwen3_moe":
        assert abs(counts["activated"] - 3.3e9) / 3.3e9 < 0.03            # "3.3B activated"
        assert counts["experts"] == 48 * 128 * 3 * 2048 * 768


def test_moe_memory_matches_hand_count():
    """dp 2 x mp 2, ep 4, sequence parallel, optimizer shard, fp32 params, bf16 compute, no recompute,
    no flash attention, batch 1 x seq 16; head_dim 32 x 4 heads = 128 != hidden 64 (Qwen3-style)."""
    mc = LlamaConfig(model_type="qwen3_moe", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2,
                     head_dim=32, intermediate_size=96, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                     compute_dtype="bfloat16", param_init_type="float32", use_flash_attention=False)
    pc = {"data_parallel": 2, "model_parallel": 2, "expert_parallel": 4, "use_seq_parallel": True}
    est = estimate_memory(mc, pc, False, True, 1, 16)
    h, q, kv, E, k, I, V, s = 64, 128, 64, 8, 2, 32, 256, 16
    attention = (h * (q + 2 * kv) + q * h) // 2               # fused qkv + proj, split by mp 2
    norms = 2 * h + 2 * 32                                    # input/post norms + q/k norms (head_dim)
    router = E * h                                            # replicated
    experts = E * 3 * h * I // 4                              # weight1 (E*h, 2I) + weight2 (E*I, h), split by ep 4
    per_device = 2 * (attention + norms + router + experts) + V * h + V * h + h   # embedding, lm_head, final norm
    assert est["params_per_device"] == per_device
    assert est["weights"] == 4 * per_device and est["gradients"] == 4 * per_device
    assert est["expert_weights"] == 4 * 2 * experts
    # AdamW m+v 8 B: the rest sharded over dp 2, the experts over dp x mp / ep = 1 replica (not sharded)
    assert est["optimizer_states"] == 8 * (per_device - 2 * experts) // 2 + 8 * 2 * experts
    # activations, sequence parallel over t = 2: attention part 15 sbh / t + 5 a s^2 b / t (bf16 = the 2 B base);
    # MoE part on n = s / t tokens: input 2nh, routed copies and outputs 4nkh, SwiGLU 6nkI (2 B), fp32 router
    # logits + probabilities 8nE, top-k weights + indices 8nk
    n = s // 2
    layer = s * h * 15 / 2 + 5 * 4 * s * s / 2 + 2 * n * h + 4 * n * k * h + 6 * n * k * I + 8 * n * E + 8 * n * k
    assert est["activations"] == 2 * int(layer)
    assert est["logits"] == 2 * 4 * s * V
    assert est["total"] == (est["weights"] + est["gradients"] + est["optimizer_states"] + est["activations"]
                            + est["logits"])
    table = format_table(est)
    assert "of which expert weights" in table and "8 experts / ep 4 = 2 per device" in table
    # the dense part of the same layer: the Korthikanti constants (10 + 24/t, 34/t with sequence parallel)
    dense = activation_bytes_per_layer(mc, pc, 1, s, False, sparse=False)
    assert dense == int(s * h * 34 / 2 + 5 * 4 * s * s / 2)


def test_expert_parallel_shrinks_expert_memory_only():
    mc = _mc(QWEN3_30B_A3B, "qwen3_moe", compute_dtype="bfloat16", use_flash_attention=True)
    e1 = estimate_memory(mc, {"data_parallel": 8, "expert_parallel": 1}, True, True, 1, 4096)
    e8 = estimate_memory(mc, {"data_parallel": 8, "expert_parallel": 8}, True, True, 1, 4096)
    experts = 48 * 128 * 3 * 2048 * 768
    assert e1["weights"] - e8["weights"] == 4 * (experts - experts // 8)
    assert e1["expert_weights"] == 4 * experts and e8["expert_weights"] == 4 * experts // 8
    # optimizer shard: experts' states over dp*mp/ep replicas: 8 at ep 1, 1 at ep 8 -> the same bytes per device
    assert e1["optimizer_states"] == pytest.approx(e8["optimizer_states"], rel=1e-6)
    assert e1["activations"] == e8["activations"]


def test_sparse_layers_follow_decoder_sparse_step_and_mlp_only_layers():
    hf = dict(QWEN3_30B_A3B, num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])
    counts = param_counts(_mc(hf, "qwen3_moe"))
    assert [p["experts"] > 0 for p in counts["layers"]] == [False, True, False, False]
    assert counts["total"] == _hf_count(hf, "Qwen3MoeForCausalLM", 4)


def _pc(dp, mp=1, ep=1, **kw):
    return dict({"data_parallel": dp, "model_parallel": mp, "pipeline_stage": 1, "expert_parallel": ep,
                 "use_seq_parallel": mp > 1}, **kw)


def test_refuses_expert_parallel_not_dividing_num_experts():
    mc = _mc(QWEN3_30B_A3B, "qwen3_moe")
    with pytest.raises(ConfigError, match=r"expert_parallel 3 does not divide model_config\.num_experts 128: set "
                                          r"expert_parallel to one of \[1, 2, 4, 8\]"):
        check_layout(mc, _pc(8, ep=3), 8)
    few = _mc(dict(QWEN3_30B_A3B, num_experts=6, num_experts_per_tok=2), "qwen3_moe")
    with pytest.raises(ConfigError, match=r"expert_parallel 4 does not divide model_config\.num_experts 6.*"
                                          r"one of \[1, 2\]"):
        check_layout(few, _pc(8, ep=4), 8)


def test_refuses_expert_parallel_not_dividing_dp_times_mp():
    mc = _mc(QWEN3_30B_A3B, "qwen3_moe")
    with pytest.raises(ConfigError, match=r"expert_parallel 16 must divide data_parallel 8 x model_parallel 1 = 8.*"
                                          r"one of \[1, 2, 4, 8\]"):
        check_layout(mc, _pc(8, ep=16), 8)
    with pytest.raises(ConfigError, match=r"expert_parallel 8 must divide data_parallel 2 x model_parallel 2 = 4"):
        check_layout(mc, _pc(2, mp=2, ep=8, pipeline_stage=2, micro_batch_num=2), 8)
    check_layout(mc, _pc(4, mp=4, ep=16), 16)                 # ep may span dp x mp (MindFormers' MoE layout)
    with pytest.raises(ConfigError, match=r"expert_parallel must be >= 1, got 0"):
        check_layout(mc, _pc(8, ep=0), 8)


def test_warnings_for_ignored_or_slow_expert_settings():
    logs = []
    dense = _mc(QWEN3_8B, "qwen3")
    check_layout(dense, _pc(8, ep=2), 8, log=logs.append)
    assert any("expert_parallel 2 is ignored (the model has no MoE layers)" in x for x in logs)
    logs.clear()
    check_layout(_mc(QWEN3_30B_A3B, "qwen3_moe"), _pc(4, mp=2, ep=8, use_seq_parallel=False), 8, log=logs.append)
    assert any("use_seq_parallel True" in x for x in logs)


def test_model_parallel_rules_use_head_counts_not_hidden_size():
    """Qwen3-30B-A3B: 4 kv heads -> mp 8 refused; the dense intermediate_size of an all-MoE model is not checked."""
    mc = _mc(QWEN3_30B_A3B, "qwen3_moe")
    with pytest.raises(ConfigError, match=r"n_kv_heads 4.*one of \[1, 2, 4\]") as e:
        check_layout(mc, _pc(1, mp=8, ep=8), 8)
    assert "intermediate_size" not in str(e.value)
    check_layout(_mc(dict(QWEN3_30B_A3B, intermediate_size=6143), "qwen3_moe"), _pc(2, mp=4, ep=8), 8)
