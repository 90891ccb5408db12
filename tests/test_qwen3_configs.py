"""configs/qwen3/ and configs/qwen3_moe/: every config loads, validates, carries the published architecture, and plans
(the README's plan table at 8 and 16 devices is what the planner prints); the tiny ones train on CPU."""
import math
import os
import re

import pytest

from mindformers_sft.cli import main
from mindformers_sft.config import load_config
from mindformers_sft.parallel import RankInfo
from mindformers_sft.parallel.memory import param_counts
from mindformers_sft.parallel.plan import preflight
from mindformers_sft.run import model_config
from tests.parallel.test_plan_moe import QWEN3_8B, QWEN3_30B_A3B
from tests.paths import ROOT

GIB = 2 ** 30
BIG = {"configs/qwen3/finetune_qwen3_8b.yaml": (QWEN3_8B, 8.19e9),
       "configs/qwen3/lora_qwen3_8b.yaml": (QWEN3_8B, 8.19e9),
       "configs/qwen3_moe/finetune_qwen3_30b_a3b.yaml": (QWEN3_30B_A3B, 30.5e9),
       "configs/qwen3_moe/lora_qwen3_30b_a3b.yaml": (QWEN3_30B_A3B, 30.5e9)}
TINY = ("configs/qwen3/lora_qwen3_tiny.yaml", "configs/qwen3_moe/finetune_qwen3_moe_tiny.yaml")


def _plan(path, *options):
    cfg = load_config(os.path.join(ROOT, path), list(options))
    cfg.run_mode = "plan"
    mc = model_config(cfg, log=lambda *a: None)
    pc = cfg.parallel_config
    world = pc.data_parallel * pc.model_parallel * pc.pipeline_stage if cfg.use_parallel else 1
    logs = []
    return cfg, mc, preflight(cfg, mc, RankInfo(world_size=world), log=logs.append), "\n".join(logs)


@pytest.mark.parametrize("path", sorted(BIG))
def test_big_configs_have_the_published_architecture_and_fit(path):
    hf, published = BIG[path]
    cfg, mc, est, out = _plan(path)
    got = dict(vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
               num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_heads,
               num_key_value_heads=mc.n_kv_heads, head_dim=mc.head_dim, tie_word_embeddings=mc.tie_word_embeddings)
    if "moe" in path:
        got.update(moe_intermediate_size=mc.moe_intermediate_size, num_experts=mc.num_experts,
                   num_experts_per_tok=mc.num_experts_per_tok, decoder_sparse_step=mc.decoder_sparse_step,
                   mlp_only_layers=mc.mlp_only_layers, norm_topk_prob=mc.norm_topk_prob)
        assert mc.router_aux_loss_coef == 0.001 and cfg.model.arch.type == "Qwen3MoeForCausalLM"
    else:
        assert cfg.model.arch.type == "Qwen3ForCausalLM"
    assert got == hf
    assert (mc.theta, mc.rms_norm_eps, mc.qkv_has_bias) == (1e6, 1e-6, False)
    assert abs(param_counts(mc)["total"] - published) / published < 0.01
    # as written, the plan fits the YAML's context.max_device_memory (58 GB)
    assert est["total"] < est["max_device_memory"] == 58 * GIB, out
    assert "exceeds" not in out


def test_thirty_b_full_fine_tuning_does_not_fit_eight_devices():
    """The YAML's header: 16 devices, because on 8 the experts alone need 16 B x 27.2B / 8 per device."""
    _, _, est, out = _plan("configs/qwen3_moe/finetune_qwen3_30b_a3b.yaml", "parallel_config.data_parallel=4",
                           "parallel_config.expert_parallel=8")
    experts = 48 * 128 * 3 * 2048 * 768
    assert est["expert_weights"] == 4 * experts // 8
    assert est["total"] > 58 * GIB and "exceeds context.max_device_memory 58GB" in out
    assert "expert_parallel (with more devices)" in out


def _readme_rows():
    """(config file name, dp, mp, ep, numbers) of the README's Qwen3 plan table."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    rows = re.findall(r"^ *\| `(\w+\.yaml)` \| (\d+) \| (\d+) x (\d+) x (\d+) \| ([\d.| ]+)\|$", text, re.MULTILINE)
    return [(name, int(n), int(dp), int(mp), int(ep), [float(x) for x in nums.split("|")])
            for name, n, dp, mp, ep, nums in rows]


def test_readme_plan_table_is_what_the_planner_prints():
    rows = _readme_rows()
    assert sorted({(r[0], r[1]) for r in rows}) == sorted((os.path.basename(p), n) for p in BIG for n in (8, 16))
    for name, devices, dp, mp, ep, nums in rows:
        path = next(p for p in BIG if p.endswith(name))
        assert dp * mp == devices
        _, _, est, _ = _plan(path, f"parallel_config.data_parallel={dp}", f"parallel_config.model_parallel={mp}",
                             f"parallel_config.expert_parallel={ep}")
        want = [est[k] / GIB for k in ("weights", "gradients", "optimizer_states", "activations", "logits", "total")]
        assert nums == pytest.approx(want, abs=0.051), (name, devices)


@pytest.mark.parametrize("path", TINY)
def test_tiny_configs_plan_and_train_on_cpu(path, tmp_path, capsys):
    _, mc, est, _ = _plan(path)
    assert est["total"] < GIB
    if "moe" in path:               # the tiny MoE plans at 4 devices with expert_parallel 4 (2 experts each)
        _, _, est4, _ = _plan(path, "use_parallel=True", "parallel_config.data_parallel=4",
                              "parallel_config.expert_parallel=4")
        assert est4["expert_weights"] == est["expert_weights"] // 4
    rc = main(["--config", os.path.join(ROOT, path), "--use_parallel", "False", "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc in (0, None), out[-2000:]
    losses = [float(x) for x in re.findall(r"^step \d+/4 .*? loss ([\d.]+)", out, re.MULTILINE)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), out[-2000:]
    # from random weights the model predicts about uniformly over the 151936-token vocabulary: loss ~ ln(V)
    assert abs(losses[0] - math.log(151936)) < 0.1


def test_lora_30b_context_is_semi_auto_for_expert_parallel_and_data_parallel_on_cpu(tmp_path):
    """expert_parallel > 1 alone (mp 1, no optimizer shard for LoRA here) asks for semi-auto parallel on Ascend;
    on CPU it is dropped with a note. MindSpore accepts the arguments."""
    import mindspore as ms
    from mindformers_sft.parallel.context import parallel_context
    cfg = load_config(os.path.join(ROOT, "configs/qwen3_moe/lora_qwen3_30b_a3b.yaml"),
                      [f"output_dir={tmp_path}", "parallel.enable_parallel_optimizer=False",
                       "parallel_config.optimizer_shard=False"])
    ctx = parallel_context(cfg, world=8, rank=0, device="Ascend")
    assert ctx.mode == "semi_auto_parallel"
    try:
        ms.set_auto_parallel_context(**ctx.kwargs)
        assert ms.get_auto_parallel_context("parallel_mode") == "semi_auto_parallel"
    finally:
        ms.reset_auto_parallel_context()
    cpu = parallel_context(cfg, world=8, rank=0, device="CPU")
    assert cpu.mode == "data_parallel" and any("expert_parallel 8 needs semi-auto" in n for n in cpu.notes)
