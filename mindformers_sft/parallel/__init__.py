"""parallel_config -> MindSpore's parallel context; which rank this process is."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass
class RankInfo:
    rank: int = 0
    world_size: int = 1
    dp_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0


def init_parallel(cfg) -> RankInfo:
    """Single process unless use_parallel; under msrun, initialise communication and the parallel context."""
    if not cfg.use_parallel:
        return RankInfo()
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init
    pc = cfg.parallel_config
    if "MS_WORKER_NUM" not in os.environ and "RANK_SIZE" not in os.environ:
        if cfg.run_mode == "plan":   # plan the layout as if launched on dp*mp*pp workers
            world = pc.data_parallel * pc.model_parallel * pc.pipeline_stage
            return RankInfo(rank=0, world_size=world, dp_size=pc.data_parallel)
        raise ConfigError("use_parallel is True but this process was not started by msrun; launch with "
                          "bash scripts/msrun_launcher.sh \"run_mindformer.py ...\" N, or pass --use_parallel False")
    init()
    world, rank = get_group_size(), get_rank()
    mp, pp = pc.model_parallel, pc.pipeline_stage
    if cfg.context.device_target == "CPU" and (mp > 1 or pp > 1):
        raise ConfigError(f"parallel_config: model_parallel {mp} / pipeline_stage {pp} need Ascend "
                          "(semi-auto parallel); on CPU only data parallel runs: set both to 1")
    dp = world // (mp * pp)
    mode = ms.ParallelMode.DATA_PARALLEL if mp == 1 and pp == 1 else ms.ParallelMode.SEMI_AUTO_PARALLEL
    ms.set_auto_parallel_context(parallel_mode=mode, gradients_mean=False, device_num=world)
    if mode == ms.ParallelMode.SEMI_AUTO_PARALLEL:   # Ascend only: where MindSpore writes this rank's layout
        strategy = os.path.join(os.path.abspath(cfg.output_dir), "strategy", f"ckpt_strategy_rank_{rank}.ckpt")
        os.makedirs(os.path.dirname(strategy), exist_ok=True)
        ms.set_auto_parallel_context(strategy_ckpt_config={"save_file": strategy, "only_trainable_params": False})
    return RankInfo(rank=rank, world_size=world, dp_size=dp)
