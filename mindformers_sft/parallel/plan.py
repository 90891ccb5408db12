"""Pre-flight checks of a parallel plan, before anything is compiled or loaded."""
from __future__ import annotations

from ..errors import ConfigError


def preflight(cfg, mc, rank, log=print):
    pc = cfg.parallel_config
    dp, mp, pp = pc.data_parallel, pc.model_parallel, pc.pipeline_stage
    world = rank.world_size
    if cfg.use_parallel:
        if dp * mp * pp != world:
            raise ConfigError(f"parallel_config: data_parallel {dp} x model_parallel {mp} x pipeline_stage {pp} = "
                              f"{dp * mp * pp}, but {world} workers were launched; set data_parallel to "
                              f"{world // (mp * pp) if world % (mp * pp) == 0 else '?'} or change the worker count")
    for name, value in (("num_heads", mc.num_heads), ("n_kv_heads", mc.n_kv_heads), ("vocab_size", mc.vocab_size),
                        ("intermediate_size", mc.intermediate_size)):
        if mp > 1 and value % mp:
            raise ConfigError(f"parallel_config.model_parallel {mp} does not divide model_config.{name} {value}")
    if pp > 1 and mc.num_layers < pp:
        raise ConfigError(f"parallel_config.pipeline_stage {pp} exceeds model_config.num_layers {mc.num_layers}")
    if pp > 1 and pc.micro_batch_num < pp:
        raise ConfigError(f"parallel_config.micro_batch_num {pc.micro_batch_num} must be >= pipeline_stage {pp}")
