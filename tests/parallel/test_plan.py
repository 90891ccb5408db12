"""Pre-flight planner: memory estimate vs. a hand count, refused layouts, and `--run_mode plan` end to end."""
import os
import subprocess
import sys

import pytest

from mindformers_sft.config import load_config
from mindformers_sft.errors import ConfigError
from mindformers_sft.models.config import LlamaConfig
from mindformers_sft.parallel import RankInfo
from mindformers_sft.parallel.plan import estimate_memory, format_table, param_counts, parse_memory, preflight
from tests.paths import ROOT

LLAMA = os.path.join(ROOT, "configs", "llama2", "finetune_llama2_7b.yaml")
LLAMA_LORA = os.path.join(ROOT, "configs", "llama2", "lora_llama2_7b.yaml")
QWEN = os.path.join(ROOT, "research", "qwen2_5", "finetune_qwen2_5_7b.yaml")
GIB = 2 ** 30


def _qwen_registered():
    from mindformers_sft.run import register
    register(os.path.join(ROOT, "research", "qwen2_5"))


def _load(path, *options):
    if "qwen" in path:
        _qwen_registered()
    cfg = load_config(path, list(options))
    cfg.run_mode = "plan"
    mc = dict(cfg.model.model_config)
    mc.setdefault("model_type", "qwen2" if mc.get("qkv_has_bias") else "llama")
    return cfg, LlamaConfig.from_dict(mc)


def _plan(path, *options, world=8):
    cfg, mc = _load(path, *options)
    logs = []
    est = preflight(cfg, mc, RankInfo(rank=0, world_size=world, dp_size=cfg.parallel_config.data_parallel),
                    log=logs.append)
    return est, "\n".join(logs)


def _close(got, want, tol=0.10):
    assert abs(got - want) <= tol * want, f"{got} vs hand count {want} ({(got - want) / want:+.1%})"


# ------------------------------------------------------------------------------------ hand counts of the models
def llama2_7b_params():
    V, h, L, inter = 32000, 4096, 32, 11008
    emb = V * h                                   # tok_embeddings
    attn = 4 * h * h                              # wq, wk, wv, wo (MHA: 32 kv heads)
    mlp = 3 * h * inter                           # w1 (gate), w3 (up), w2 (down)
    norms = 2 * h                                 # attention_norm, ffn_norm
    layer = attn + mlp + norms
    lm_head = V * h                               # untied
    return emb, layer, lm_head, emb + L * layer + h + lm_head


def qwen2_5_7b_params():
    V, h, L, inter, kv = 152064, 3584, 28, 18944, 4 * 128
    emb = V * h
    attn = h * h + h + 2 * (h * kv + kv) + h * h  # wq (+bias), wk/wv GQA 4 kv heads (+bias), wo
    mlp = 3 * h * inter
    layer = attn + mlp + 2 * h
    lm_head = V * h                               # Qwen2.5-7B: untied
    return emb, layer, lm_head, emb + L * layer + h + lm_head


def test_hand_counts_are_the_published_sizes():
    assert abs(llama2_7b_params()[3] - 6.74e9) / 6.74e9 < 0.005
    assert abs(qwen2_5_7b_params()[3] - 7.62e9) / 7.62e9 < 0.005


def test_llama2_7b_estimate_matches_hand_count():
    """dp 8, fp32 params, bf16 compute, optimizer shard, full recompute, flash attention, b 1, s 4096."""
    est, out = _plan(LLAMA)
    emb, layer, head, total = llama2_7b_params()
    s, b, h, V = 4096, 1, 4096, 32000
    assert est["params_total"] == total
    want = {
        "weights": 4 * total,                          # float32 params
        "gradients": 4 * total,                        # fp32 grads of every (trainable) param
        "optimizer_states": 8 * total / 8,             # AdamW m+v fp32, sharded over dp 8
        "optimizer_states_unsharded": 8 * total,
        # full recompute: the 2sbh layer input of 32 layers + one layer recomputed at a time (34 sbh, no
        # 5as/h term with flash attention), 2-byte (bf16) activations
        "activations": 32 * 2 * s * b * h + 34 * s * b * h,
        "activations_no_recompute": 32 * 34 * s * b * h,
        "logits": 2 * 4 * s * b * V,                   # fp32 logits + softmax
    }
    for k, v in want.items():
        _close(est[k], v)
    _close(est["total"], want["weights"] + want["gradients"] + want["optimizer_states"] + want["activations"]
           + want["logits"])
    assert est["total_no_optimizer_shard"] - est["total"] == pytest.approx(7 * total, rel=0.01)
    assert "per-device memory estimate" in out and "TOTAL (configured)" in out


def test_qwen2_5_7b_estimate_matches_hand_count():
    """dp 4 x pp 2 (14 + 14 layers), 16 micro-batches, recompute [7, 7], s 8192, optimizer shard from
    parallel.enable_parallel_optimizer; the worst stage is the last one (lm_head + fp32 logits)."""
    est, out = _plan(QWEN)
    emb, layer, head, total = qwen2_5_7b_params()
    s, b, h, V = 8192, 1, 3584, 152064
    assert est["params_total"] == total
    assert est["layers_per_stage"] == [14, 14]
    sbh = s * b * h
    stage1_params = 14 * layer + h + head
    stage1 = {
        "weights": 4 * stage1_params,
        "gradients": 4 * stage1_params,
        "grad_accumulation": 4 * stage1_params,                       # pipeline: accu_grads
        "optimizer_states": 8 * stage1_params / 4,                    # sharded over dp 4
        "activations": 1 * (7 * 2 * sbh + 7 * 34 * sbh) + 34 * sbh,   # 1 micro-batch in flight on the last stage
        "logits": 8 * s * b * V,
    }
    stage0_params = 14 * layer + emb
    stage0_total = (4 + 4 + 4 + 2) * stage0_params + 2 * (7 * 2 * sbh + 7 * 34 * sbh) + 34 * sbh  # 2 in flight
    stage1_total = sum(stage1.values())
    assert stage1_total > stage0_total
    assert est["stage"] == 1
    for k, v in stage1.items():
        _close(est[k], v)
    _close(est["total"], stage1_total)
    _close(est["stages"][0]["total"], stage0_total)
    assert "use_seq_parallel has no effect with model_parallel 1" in out        # warning, not an error
    assert "layers per pipeline stage [14, 14]" in out


def test_lora_counts_only_adapters_as_trainable():
    est, _ = _plan(LLAMA_LORA)
    base = llama2_7b_params()[3]
    adapters = 32 * 4 * 16 * (4096 + 4096)      # rank 16 on wq, wk, wv, wo: A (16, in) + B (out, 16)
    assert est["trainable_total"] == adapters
    _close(est["gradients"], 4 * adapters)
    _close(est["optimizer_states_unsharded"], 8 * adapters)
    _close(est["weights"], 4 * (base + adapters))


def test_param_count_and_lora_count_match_a_real_model():
    from mindformers_sft.models.llama import LlamaForCausalLM
    from mindformers_sft.pet.lora import apply_lora
    for tie in (False, True):
        mc = LlamaConfig(vocab_size=96, hidden_size=32, num_layers=3, num_heads=4, n_kv_heads=2,
                         intermediate_size=48, qkv_has_bias=True, tie_word_embeddings=tie, model_type="qwen2")
        model = LlamaForCausalLM(mc)
        assert param_counts(mc)["total"] == sum(p.size for p in model.get_parameters())
    mc.pet_config = {"pet_type": "lora", "lora_rank": 4, "target_modules": ".*wq|.*wk|.*w2"}
    apply_lora(model, mc.pet_config)
    pc = {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1}
    est = estimate_memory(mc, pc, False, False, 1, 16)
    assert est["trainable_total"] == sum(p.size for p in model.trainable_params())
    assert est["params_total"] == sum(p.size for p in model.get_parameters())


def test_model_parallel_and_sequence_parallel_shrink_activations():
    mc = LlamaConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008,
                     compute_dtype="bfloat16", param_init_type="bfloat16", use_flash_attention=False)
    s, b, h, a = 4096, 1, 4096, 32
    base = dict(data_parallel=1, pipeline_stage=1, vocab_emb_dp=False)
    e1 = estimate_memory(mc, dict(base, model_parallel=1), False, False, b, s)
    e4 = estimate_memory(mc, dict(base, model_parallel=4), False, False, b, s)
    e4sp = estimate_memory(mc, dict(base, model_parallel=4, use_seq_parallel=True), False, False, b, s)
    assert e1["activations"] == pytest.approx(32 * s * b * h * (34 + 5 * a * s / h), rel=1e-6)
    assert e4["activations"] == pytest.approx(32 * s * b * h * (10 + 24 / 4 + 5 * a * s / (h * 4)), rel=1e-6)
    assert e4sp["activations"] == pytest.approx(32 * s * b * h * (34 / 4 + 5 * a * s / (h * 4)), rel=1e-6)
    # bf16 params: weights 2 B, + fp32 master copy in the optimizer (12 B per param); mp 4 splits matrices
    assert e4["weights"] < e1["weights"] / 3.9
    assert e1["optimizer_states"] == 12 * e1["params_per_device"]


def test_refuses_worker_count_mismatch():
    with pytest.raises(ConfigError, match=r"set data_parallel to 4 for 8 workers with model_parallel 2"):
        _plan(LLAMA, "parallel_config.model_parallel=2")
    with pytest.raises(ConfigError, match=r"launched"):
        _plan(LLAMA, world=6)


def test_refuses_model_parallel_not_dividing_heads():
    with pytest.raises(ConfigError, match=r"model_parallel 3 does not divide model_config\.num_heads 32") as e:
        _plan(LLAMA, "parallel_config.model_parallel=3", "parallel_config.data_parallel=1", world=3)
    assert "set model_parallel to one of [1]" in str(e.value)


def test_refuses_model_parallel_8_for_qwen_kv_heads():
    with pytest.raises(ConfigError, match=r"n_kv_heads 4") as e:
        _plan(QWEN, "parallel_config.model_parallel=8", "parallel_config.data_parallel=1",
              "parallel_config.pipeline_stage=1")
    assert "set model_parallel to one of [1, 2, 4]" in str(e.value)


def test_refuses_vocab_not_divisible_unless_vocab_emb_dp():
    opts = ("parallel_config.model_parallel=8", "parallel_config.data_parallel=1",
            "model.model_config.vocab_size=32001")
    _plan(LLAMA, *opts)                                            # vocab_emb_dp True: embedding kept whole
    with pytest.raises(ConfigError, match=r"vocab_size 32001.*vocab_emb_dp True"):
        _plan(LLAMA, *opts, "parallel_config.vocab_emb_dp=False")


def test_refuses_more_stages_than_layers():
    with pytest.raises(ConfigError, match=r"pipeline_stage 29 exceeds model_config\.num_layers 28.*at most 28"):
        _plan(QWEN, "parallel_config.pipeline_stage=29", "parallel_config.data_parallel=1",
              "parallel_config.micro_batch_num=32", world=29)


def test_refuses_fewer_micro_batches_than_stages():
    with pytest.raises(ConfigError, match=r"micro_batch_num 1 must be >= pipeline_stage 2.*at least 2"):
        _plan(QWEN, "parallel_config.micro_batch_num=1")


def test_recompute_list_must_fit_the_stages():
    with pytest.raises(ConfigError, match=r"recompute\[1\] = 15 exceeds the 14 layers of pipeline stage 1"):
        _plan(QWEN, "recompute_config.recompute=[7,15]")
    with pytest.raises(ConfigError, match=r"has 3 entries but pipeline_stage is 2"):
        _plan(QWEN, "recompute_config.recompute=[7,7,7]")
    est, _ = _plan(QWEN, "recompute_config.recompute=[14,0]")
    assert est["recompute_per_stage"] == [14, 0]


def test_warns_when_over_device_memory():
    est, out = _plan(LLAMA, "context.max_device_memory=30GB")
    assert est["total"] > 30 * GIB and "exceeds context.max_device_memory 30GB" in out
    est, out = _plan(LLAMA, "context.max_device_memory=200GB")
    assert "exceeds" not in out
    assert parse_memory("58GB") == 58 * GIB and parse_memory("512MB") == 512 * 2 ** 20


def test_single_process_plans_one_device():
    est, out = _plan(QWEN, "use_parallel=False", world=1)
    assert (est["data_parallel"], est["model_parallel"], est["pipeline_stage"]) == (1, 1, 1)
    assert est["layers_per_stage"] == [28] and est["recompute_per_stage"] == [14]
    assert "use_parallel False" in format_table(est) or "use_parallel False" in out


def _cli(*args):
    return subprocess.run([sys.executable, "run_mindformer.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cli_plan_prints_the_table():
    r = _cli("--config", "configs/llama2/finetune_llama2_7b.yaml", "--run_mode", "plan")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "per-device memory estimate" in r.stdout
    assert "TOTAL (configured)" in r.stdout and "optimizer states, sharded / dp 8" in r.stdout


def test_cli_plan_refuses_model_parallel_3():
    r = _cli("--config", "configs/llama2/finetune_llama2_7b.yaml", "--run_mode", "plan",
             "--options", "parallel_config.model_parallel=3")
    assert r.returncode != 0
    assert "model_parallel 3 does not divide model_config.num_heads 32" in r.stderr
