"""parallel_config + the YAML `parallel` section -> the arguments of mindspore.set_auto_parallel_context.

A pure function (`parallel_context`), unit-tested on CPU; `init_parallel` applies it.

  mode      DATA_PARALLEL when model_parallel = pipeline_stage = expert_parallel = 1 and no optimizer sharding (the
            only mode the CPU has); SEMI_AUTO_PARALLEL otherwise, or AUTO_PARALLEL with `parallel.parallel_mode: 2`
            (MindFormers' numbering: 0 data, 1 semi-auto, 2 auto). Semi/auto parallel runs in GRAPH_MODE.
  optimizer sharding   parallel_config.optimizer_shard, else parallel.enable_parallel_optimizer; with
            parallel.parallel_optimizer_config passed on. Semi/auto parallel only: on CPU it is dropped with a note.
  pipeline  pipeline_stage > 1 is refused for now on a device (the micro-batch PipelineCell is not wired);
            `--run_mode plan`, the strategies and the checkpoint layouts cover it.
  data      full_batch False: our loader gives each data-parallel rank its own slice of the global batch
            (ranks of one model-parallel group get the same slice; see `dp_rank`).
  strategy  strategy_ckpt_config.save_file = OUTPUT/strategy/ckpt_strategy_rank_N.ckpt (MindFormers' place).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import ConfigError
from .shapes import expert_parallel
from .strategies import dims

MODES = {0: "data_parallel", 1: "semi_auto_parallel", 2: "auto_parallel"}


def _get(obj, key, default=None):
    if obj is None:
        return default
    v = obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)
    return default if v is None else v


def dp_rank(rank: int, dp: int, mp: int) -> int:
    """Data-parallel index of `rank`: a stage's ranks form a [dp, mp] grid (rank_in_stage = d * mp + m), and
    every pipeline stage sees the same data."""
    return (rank % (dp * mp)) // mp


def optimizer_shard(cfg) -> bool:
    """parallel_config.optimizer_shard, else parallel.enable_parallel_optimizer (MindFormers' precedence)."""
    shard = _get(cfg.parallel_config, "optimizer_shard", None)
    if shard is None:
        shard = _get(cfg.get("parallel"), "enable_parallel_optimizer", False)
    return bool(shard)


@dataclass
class ParallelContext:
    mode: str                                   # data_parallel | semi_auto_parallel | auto_parallel
    kwargs: dict                                # for mindspore.set_auto_parallel_context
    notes: list = field(default_factory=list)   # what was dropped, and why

    @property
    def graph_mode(self) -> bool:
        return self.mode != "data_parallel"


def parallel_context(cfg, world: int, rank: int, device: str) -> ParallelContext:
    pc, par = cfg.parallel_config, cfg.get("parallel") or {}
    dp, mp, pp = dims(pc)
    shard = optimizer_shard(cfg) and dp > 1
    requested = _get(par, "parallel_mode", None)
    if requested is not None and requested not in MODES and requested not in MODES.values():
        raise ConfigError(f"parallel.parallel_mode: {requested!r} is not one of 0 (data_parallel), "
                          "1 (semi_auto_parallel), 2 (auto_parallel)")
    requested = MODES.get(requested, requested)
    notes = []
    if device == "CPU":
        if mp > 1 or pp > 1:
            raise ConfigError(f"parallel_config: model_parallel {mp} / pipeline_stage {pp} need Ascend "
                              "(semi-auto parallel); on CPU only data parallel runs: set both to 1")
        if shard:
            notes.append("optimizer sharding needs semi-auto parallel (Ascend): not used on CPU")
        if expert_parallel(pc) > 1:
            notes.append(f"expert_parallel {expert_parallel(pc)} needs semi-auto parallel (Ascend): every rank holds "
                         "all experts on CPU")
        if requested in ("semi_auto_parallel", "auto_parallel"):
            notes.append(f"parallel.parallel_mode {requested} needs Ascend: data parallel on CPU")
        mode = "data_parallel"
    elif pp > 1 and cfg.run_mode != "plan":
        raise ConfigError(f"parallel_config.pipeline_stage {pp}: training across pipeline stages needs MindSpore's "
                          "micro-batch pipeline wrapper (PipelineCell), which this suite does not wire yet; use "
                          "pipeline_stage 1 with model_parallel / data_parallel (and optimizer_shard, recompute). "
                          "Pipeline-stage checkpoints still load and convert (auto_trans_ckpt, transform_ckpt).")
    elif mp > 1 or shard or expert_parallel(pc) > 1 or requested in ("semi_auto_parallel", "auto_parallel"):
        mode = "auto_parallel" if requested == "auto_parallel" else "semi_auto_parallel"
    else:
        mode = "data_parallel"
    kwargs = {"parallel_mode": mode, "gradients_mean": False, "device_num": world}
    if mode != "data_parallel":
        kwargs["full_batch"] = False
        if _get(par, "full_batch", False):
            notes.append("parallel.full_batch True is not used: each data-parallel rank reads its own slice")
        kwargs["pipeline_stages"] = pp
        if pp > 1 and _get(par, "pipeline_config", None):
            kwargs["pipeline_config"] = dict(par["pipeline_config"])
        kwargs["enable_parallel_optimizer"] = shard
        if shard and _get(par, "parallel_optimizer_config", None):
            kwargs["parallel_optimizer_config"] = dict(par["parallel_optimizer_config"])
        if _get(par, "enable_alltoall", None) is not None:
            kwargs["enable_alltoall"] = bool(par["enable_alltoall"])
        if mode == "auto_parallel" and _get(par, "search_mode", None):
            kwargs["search_mode"] = par["search_mode"]
        kwargs["strategy_ckpt_config"] = {
            "save_file": os.path.join(os.path.abspath(cfg.output_dir), "strategy", f"ckpt_strategy_rank_{rank}.ckpt"),
            "only_trainable_params": False}
    return ParallelContext(mode, kwargs, notes)
