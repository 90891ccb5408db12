"""Qwen3 / Qwen3-MoE shard strategies against the real tensor shapes of Qwen3-8B and Qwen3-30B-A3B; the strategies
set on a tiny model's primitives; stacked experts cut by expert_parallel with MindSpore's own checkpoint transform.

The expected expert slices are written out here from MindFormers' MoE layout (device matrix (dp*mp/ep, ep): rank r of
a stage holds the experts of block r % ep, whole), not computed by the code under test.
"""
import os

import numpy as np
import pytest

from mindformers_sft.checkpoint import transform
from mindformers_sft.checkpoint import load_tensors, save_ckpt
from mindformers_sft.models.config import LlamaConfig
from mindformers_sft.parallel import layout
from mindformers_sft.parallel.plan import check_layout
from mindformers_sft.parallel.strategies import apply_strategies, layer_out_strategies, qwen3_layer_strategies
from tests.parallel.test_plan_moe import QWEN3_8B, QWEN3_30B_A3B, _mc
from tests.parallel.test_strategies import assert_splits_fit


def shapes(mc, batch, seq):
    """Input shapes of each op (global), as models/qwen3.py, models/moe.py and kernels.moe_experts_ascend call
    them: Linear flattens (B, S, in) -> (B*S, in); weights are (out, in) (MatMul(transpose_b=True))."""
    H, V, D = mc.hidden_size, mc.vocab_size, mc.head_dim
    Q, KV, inter = mc.num_heads * D, mc.n_kv_heads * D, mc.intermediate_size
    NKV, rep, tokens = mc.n_kv_heads, mc.num_heads // mc.n_kv_heads, batch * seq
    x = (tokens, H)
    out = {
        "embedding": [(V, H), (batch, seq)], "output_layer": [x, (V, H)], "loss": [(tokens, V)],
        "self_attention.linear_qkv": [x, (Q + 2 * KV, H)], "self_attention.linear_q": [x, (Q, H)],
        "self_attention.linear_k": [x, (KV, H)], "self_attention.linear_v": [x, (KV, H)],
        "self_attention.linear_proj": [(tokens, Q), (H, Q)],
        "self_attention.q_layernorm": [(batch, seq, mc.num_heads, D), (D,)],          # (B, S, N, D), weight (D,)
        "self_attention.k_layernorm": [(batch, seq, NKV, D), (D,)],
        "attention.scores": [(batch, NKV, rep * seq, D), (batch, NKV, seq, D)],
        "attention.context": [(batch, NKV, rep * seq, seq), (batch, NKV, seq, D)],
        "mlp.linear_fc1": [x, (2 * inter, H)], "mlp.gating": [x, (inter, H)], "mlp.hidden": [x, (inter, H)],
        "mlp.linear_fc2": [(tokens, inter), (H, inter)],
        "lora_a.column": [x, (8, H)], "lora_b.column": [(tokens, 8), (Q + 2 * KV, 8)],
        "lora_a.row": [(tokens, Q), (8, Q)], "lora_b.row": [(tokens, 8), (H, 8)],
    }
    if mc.num_experts:
        E, k, F = mc.num_experts, mc.num_experts_per_tok, mc.moe_intermediate_size
        out.update({"mlp.router": [x, (E, H)],
                    "mlp.experts.gmm1": [(tokens * k, H), (E, H, 2 * F)],
                    "mlp.experts.gmm2": [(tokens * k, F), (E, F, H)],
                    "mlp.experts.lora": [(E, 8, H), (E, 2 * F, 8)]})
    return out


LAYOUTS = [(QWEN3_8B, "qwen3", 8, 1, 1), (QWEN3_8B, "qwen3", 4, 2, 1), (QWEN3_8B, "qwen3", 2, 4, 1),
           (QWEN3_8B, "qwen3", 1, 8, 1),
           (QWEN3_30B_A3B, "qwen3_moe", 8, 1, 8), (QWEN3_30B_A3B, "qwen3_moe", 8, 1, 4),
           (QWEN3_30B_A3B, "qwen3_moe", 4, 2, 8), (QWEN3_30B_A3B, "qwen3_moe", 2, 4, 8),
           (QWEN3_30B_A3B, "qwen3_moe", 4, 4, 16)]


@pytest.mark.parametrize("hf,mtype,dp,mp,ep", LAYOUTS)
def test_strategies_fit_the_real_shapes(hf, mtype, dp, mp, ep):
    mc = _mc(hf, mtype)
    pc = {"data_parallel": dp, "model_parallel": mp, "pipeline_stage": 1, "expert_parallel": ep,
          "use_seq_parallel": True, "vocab_emb_dp": False}
    check_layout(mc, pc, dp * mp, log=lambda *a: None)          # the planner accepts the layout
    st = qwen3_layer_strategies(mc, pc)
    sh = shapes(mc, batch=dp, seq=4096)
    assert_splits_fit(st, sh)
    for op, strategy in st.items():
        # a matmul's splits of M, K and N together use at most the devices of one stage
        if op in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2",
                  "mlp.router", "output_layer"):
            (m, k), (n, k2) = strategy
            assert k == k2 and m * k * n <= dp * mp, (op, strategy)
    col, row = ((dp, 1), (mp, 1)), ((dp, mp), (1, mp))
    assert st["self_attention.linear_qkv"] == st["mlp.linear_fc1"] == col
    assert st["self_attention.linear_proj"] == st["mlp.linear_fc2"] == row
    assert st["self_attention.q_layernorm"] == ((dp, 1, mp, 1), (1,))          # heads over mp, weight whole
    assert st["embedding"] == ((mp, 1), (dp, 1)) and st["output_layer"] == ((dp, 1), (mp, 1))
    if mtype == "qwen3_moe":
        # MindFormers: tokens over the dp x mp ranks of a stage, router replicated, experts whole per rank on ep
        assert st["mlp.router"] == ((dp * mp, 1), (1, 1))
        assert st["mlp.experts.gmm1"] == st["mlp.experts.gmm2"] == ((dp * mp, 1), (ep, 1, 1))
        assert mc.num_experts // ep * ep == mc.num_experts
    else:
        assert "mlp.router" not in st
    if mp > 1:          # sequence parallel: the row-parallel outputs are reduce-scattered over the sequence
        assert layer_out_strategies(mc, pc) == {"self_attention.linear_proj": ((dp * mp, 1),),
                                                "mlp.linear_fc2": ((dp * mp, 1),)}


def test_apply_strategies_reaches_the_qwen3_ops():
    """On CPU only the primitives' in_strategy attributes can be set (force=True); no parallel compile."""
    from mindformers_sft.models import build_model
    from mindformers_sft.pet.lora import apply_lora
    mc = LlamaConfig(model_type="qwen3", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, n_kv_heads=2,
                     head_dim=16, intermediate_size=48)
    model = build_model(mc)
    apply_lora(model, {"pet_type": "lora", "lora_rank": 2, "target_modules": ".*linear_qkv|.*linear_fc2"})
    pc = {"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 2,
          "vocab_emb_dp": False, "use_seq_parallel": True}
    res = apply_strategies(model, pc, force=True)
    layer = model.decoder.layers[1]
    attn, mlp = layer.self_attention, layer.mlp
    assert attn.linear_qkv.base.matmul.in_strategy == ((2, 1), (2, 1))
    assert attn.linear_qkv.matmul_a.in_strategy == ((2, 1), (1, 1))
    assert attn.linear_qkv.matmul_b.in_strategy == ((2, 1), (2, 1))
    assert attn.linear_proj.matmul.in_strategy == ((2, 2), (1, 2))
    assert attn.linear_proj.matmul.out_strategy == ((4, 1),)                  # sequence parallel
    assert mlp.linear_fc1.matmul.in_strategy == ((2, 1), (2, 1))
    assert mlp.linear_fc2.base.matmul.in_strategy == ((2, 2), (1, 2))
    assert model.embedding.word_embeddings.gather.in_strategy == ((2, 1), (2, 1))
    assert model.output_layer.matmul.in_strategy == ((2, 1), (2, 1))
    assert [lyr.pipeline_stage for lyr in model.decoder.layers] == [0, 1]
    assert model.output_layer.pipeline_stage == 1 and model.embedding.pipeline_stage == 0
    # per layer: qkv, proj, fc1, fc2 + 2 LoRA layers x 2; plus embedding and output_layer
    assert len(res["applied"]) == 2 * (4 + 4) + 2
    assert "q/k norms" in res["missing"]
    # the weight shapes the strategies were checked against are the model's
    sh = shapes(mc, 2, 4)
    assert tuple(attn.linear_qkv.base.weight.shape) == sh["self_attention.linear_qkv"][1]
    assert tuple(mlp.linear_fc1.weight.shape) == sh["mlp.linear_fc1"][1]
    assert tuple(attn.q_layernorm.weight.shape) == sh["self_attention.q_layernorm"][1]


def test_apply_strategies_reaches_the_moe_block_and_plan_counts_its_lora():
    from mindformers_sft.models import build_model
    from mindformers_sft.parallel.memory import estimate_memory, param_counts
    from mindformers_sft.pet.lora import apply_lora
    pet = {"pet_type": "lora", "lora_rank": 2, "target_modules": ".*linear_qkv|.*linear_proj|.*mlp.experts"}
    mc = LlamaConfig(model_type="qwen3_moe", vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, n_kv_heads=2,
                     head_dim=16, intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=24, mlp_only_layers=[1], pet_config=pet)
    model = build_model(mc)
    pc = {"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 1, "expert_parallel": 4,
          "use_seq_parallel": True}
    assert param_counts(mc)["total"] == sum(p.size for p in model.get_parameters())
    apply_lora(model, pet)
    est = estimate_memory(mc, pc, False, False, 1, 8)
    assert est["trainable_total"] == sum(p.size for p in model.trainable_params())
    assert est["params_total"] == sum(p.size for p in model.get_parameters())
    res = apply_strategies(model, pc, force=True)
    sparse, dense = model.decoder.layers[0].mlp, model.decoder.layers[1].mlp
    assert sparse.router.matmul.in_strategy == ((4, 1), (1, 1))                 # tokens over dp x mp
    assert sparse.experts.bmm_lora.in_strategy == ((4, 1, 1), (4, 1, 1))         # expert adapters on ep
    assert dense.linear_fc1.matmul.in_strategy == ((2, 1), (2, 1))               # mlp_only_layers: dense MLP
    assert "decoder.layers.1.mlp.router.matmul" not in res["applied"]
    assert "experts" in res["missing"]                                           # no all-to-all dispatch yet
    sh = shapes(mc, 1, 8)
    assert tuple(sparse.router.weight.shape) == sh["mlp.router"][1]
    assert tuple(sparse.experts.lora_a1.shape) == sh["mlp.experts.lora"][0][:1] + (2, 32)


# ------------------------------------------------------------------------------------------ checkpoint layouts
def _moe_state(E=4, H=8, F=6, layers=2):
    rng = np.random.default_rng(0)
    full = {}
    for i in range(layers):
        p = f"decoder.layers.{i}."
        full[p + "mlp.experts.weight1"] = rng.standard_normal((E * H, 2 * F)).astype(np.float32)
        full[p + "mlp.experts.weight2"] = rng.standard_normal((E * F, H)).astype(np.float32)
        full["adam_m." + p + "mlp.experts.weight1"] = rng.standard_normal((E * H, 2 * F)).astype(np.float32)
        full[p + "mlp.router.weight"] = rng.standard_normal((E, H)).astype(np.float32)
        full[p + "self_attention.linear_qkv.weight"] = rng.standard_normal((3 * H, H)).astype(np.float32)
        full[p + "self_attention.linear_proj.weight"] = rng.standard_normal((H, H)).astype(np.float32)
        full[p + "self_attention.q_layernorm.weight"] = rng.standard_normal((4,)).astype(np.float32)
    full["embedding.word_embeddings.weight"] = rng.standard_normal((16, H)).astype(np.float32)
    full["output_layer.weight"] = rng.standard_normal((16, H)).astype(np.float32)
    full["decoder.final_layernorm.weight"] = rng.standard_normal((H,)).astype(np.float32)
    return full


@pytest.mark.parametrize("dp,mp,ep", [(4, 1, 4), (2, 2, 2), (2, 2, 4)])
def test_stacked_experts_are_cut_by_expert_parallel(tmp_path, dp, mp, ep):
    E = 4
    mc = LlamaConfig(model_type="qwen3_moe", vocab_size=16, hidden_size=8, num_layers=2, num_heads=2, n_kv_heads=1,
                     head_dim=4, intermediate_size=12, num_experts=E, num_experts_per_tok=2, moe_intermediate_size=6)
    pc = {"data_parallel": dp, "model_parallel": mp, "pipeline_stage": 1, "expert_parallel": ep}
    full = _moe_state(E=E)
    src = str(tmp_path / "complete.ckpt")
    save_ckpt(full, src)
    strategy = layout.write_strategy({k: v.shape for k, v in full.items()}, mc, pc, str(tmp_path / "strategy"))
    dst = str(tmp_path / "dist")
    transform.to_layout(src, strategy, dst)
    files = transform.rank_files(dst)
    assert sorted(files) == list(range(dp * mp))
    for rank, f in files.items():
        got = load_tensors(f)
        assert set(got) == set(full)
        e, m = rank % ep, rank % mp                     # MoE matrix (dp*mp/ep, ep); dense matrix (dp, mp)
        for name, arr in got.items():
            base = name.split(".", 1)[1] if name.startswith("adam_m.") else name
            if ".mlp.experts." in base:                 # whole experts: block e of E/ep experts, axis 0
                want = np.split(full[name], ep, axis=0)[e]
            elif base.endswith("linear_qkv.weight"):
                want = np.split(full[name], mp, axis=0)[m]
            elif base.endswith("linear_proj.weight"):
                want = np.split(full[name], mp, axis=1)[m]
            else:                                       # router, norms, embedding (vocab_emb_dp default): whole
                want = full[name]
            np.testing.assert_array_equal(arr, want, err_msg=f"rank {rank} {name}")
    back = str(tmp_path / "back.ckpt")
    transform.to_complete(dst, strategy, back)
    got = load_tensors(back)
    for k in full:
        np.testing.assert_array_equal(got[k], full[k], err_msg=k)


def test_expert_layout_needs_ep_dividing_the_stage():
    from mindformers_sft.errors import ConfigError
    mc = LlamaConfig(model_type="qwen3_moe", vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, n_kv_heads=1,
                     head_dim=4, intermediate_size=12, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=6)
    with pytest.raises(ConfigError, match=r"mlp\.experts\.weight1 \[48, 12\] is split by expert_parallel 4, but 48"
                                          r"|expert_parallel 4 must divide data_parallel 2 x model_parallel 1"):
        layout.layouts({"decoder.layers.0.mlp.experts.weight1": (48, 12)}, mc,
                       {"data_parallel": 2, "model_parallel": 1, "expert_parallel": 4})
    with pytest.raises(ConfigError, match=r"split by expert_parallel 4, but 6 is not divisible by 4"):
        layout.layouts({"decoder.layers.0.mlp.experts.lora_a1": (6, 2, 8)}, mc,
                       {"data_parallel": 4, "model_parallel": 1, "expert_parallel": 4})
    assert os.path.basename(layout.__file__) == "layout.py"
