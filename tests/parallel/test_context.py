"""parallel_config and the YAML `parallel` section -> MindSpore's parallel context (parallel/context.py).

The arguments are checked by MindSpore itself: set_auto_parallel_context accepts them on CPU (it rejects unknown
keys and wrong types there; only compiling under semi-auto parallel needs Ascend)."""
import os

import mindspore as ms
import pytest

from mindformers_sft.config import load_config
from mindformers_sft.errors import ConfigError
from mindformers_sft.parallel.context import dp_rank, parallel_context
from mindformers_sft.parallel.strategies import comm_fusion_groups
from tests.paths import ROOT

LLAMA_FULL = os.path.join(ROOT, "configs", "llama2", "finetune_llama2_7b.yaml")   # dp 8, optimizer_shard
STORIES = os.path.join(ROOT, "configs", "stories260k", "finetune_stories260k.yaml")


def _apply(kwargs):
    try:
        ms.set_auto_parallel_context(**kwargs)
        return {k: ms.get_auto_parallel_context(k) for k in ("parallel_mode", "full_batch", "device_num",
                                                             "enable_parallel_optimizer", "pipeline_stages")}
    finally:
        ms.reset_auto_parallel_context()


def test_llama2_full_finetune_on_8_npus_is_semi_auto_with_optimizer_sharding(tmp_path):
    cfg = load_config(LLAMA_FULL, [f"output_dir={tmp_path}"])
    ctx = parallel_context(cfg, world=8, rank=3, device="Ascend")
    assert ctx.mode == "semi_auto_parallel" and ctx.graph_mode
    kw = ctx.kwargs
    assert kw["enable_parallel_optimizer"] is True
    assert kw["parallel_optimizer_config"] == {"gradient_accumulation_shard": False, "parallel_optimizer_threshold": 64}
    assert kw["full_batch"] is False and any("full_batch" in n for n in ctx.notes)
    assert kw["strategy_ckpt_config"]["save_file"] == os.path.join(str(tmp_path), "strategy",
                                                                   "ckpt_strategy_rank_3.ckpt")
    assert _apply(kw) == {"parallel_mode": "semi_auto_parallel", "full_batch": False, "device_num": 8,
                          "enable_parallel_optimizer": True, "pipeline_stages": 1}


def test_same_config_on_cpu_is_data_parallel_and_says_what_it_drops():
    cfg = load_config(LLAMA_FULL)
    ctx = parallel_context(cfg, world=8, rank=0, device="CPU")
    assert ctx.mode == "data_parallel" and not ctx.graph_mode
    assert any("optimizer sharding" in n for n in ctx.notes)
    assert any("semi_auto_parallel needs Ascend" in n for n in ctx.notes)
    assert _apply(ctx.kwargs)["parallel_mode"] == "data_parallel"


def test_plain_data_parallel_and_model_parallel_and_auto():
    cfg = load_config(STORIES, ["parallel_config.data_parallel=2"])
    assert parallel_context(cfg, 2, 0, "Ascend").mode == "data_parallel"
    cfg = load_config(STORIES, ["parallel_config.data_parallel=2", "parallel_config.model_parallel=4"])
    ctx = parallel_context(cfg, 8, 5, "Ascend")
    assert ctx.mode == "semi_auto_parallel" and ctx.kwargs["enable_parallel_optimizer"] is False
    assert _apply(ctx.kwargs)["parallel_mode"] == "semi_auto_parallel"
    cfg = load_config(STORIES, ["parallel_config.model_parallel=2", "parallel.parallel_mode=2",
                                "parallel.search_mode=sharding_propagation"])
    ctx = parallel_context(cfg, 2, 0, "Ascend")
    assert ctx.mode == "auto_parallel" and ctx.kwargs["search_mode"] == "sharding_propagation"
    assert _apply(ctx.kwargs)["parallel_mode"] == "auto_parallel"


def test_refusals_name_the_setting():
    with pytest.raises(ConfigError, match="model_parallel 2 / pipeline_stage 1 need Ascend"):
        parallel_context(load_config(STORIES, ["parallel_config.model_parallel=2"]), 2, 0, "CPU")
    with pytest.raises(ConfigError, match="pipeline_stage 2: .*PipelineCell"):
        parallel_context(load_config(STORIES, ["parallel_config.pipeline_stage=2"]), 2, 0, "Ascend")
    with pytest.raises(ConfigError, match="parallel.parallel_mode: 5"):
        parallel_context(load_config(STORIES, ["parallel.parallel_mode=5"]), 2, 0, "Ascend")


def test_data_parallel_index_of_each_rank():
    # a stage's ranks form a [dp, mp] grid: the ranks of one model-parallel group read the same slice
    assert [dp_rank(r, 4, 2) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [dp_rank(r, 2, 2) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]      # pp 2: stages see the same data
    assert [dp_rank(r, 8, 1) for r in range(8)] == list(range(8))


def test_gradient_aggregation_groups_as_mindformers():
    # MindFormers' LayerSetting: dis = max((layers + offset) // group, 1); fusion id = (layer + offset) // dis + 1
    assert comm_fusion_groups(32, 4) == [1] * 8 + [2] * 8 + [3] * 8 + [4] * 8
    assert comm_fusion_groups(5, 4) == [1, 2, 3, 4, 5]
    assert comm_fusion_groups(28, 4) == [i // 7 + 1 for i in range(28)]
