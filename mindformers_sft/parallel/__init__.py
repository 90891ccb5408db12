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
    dp_rank: int = 0            # which slice of each global batch this rank reads (context.dp_rank)
    semi_auto: bool = False     # semi/auto parallel (Ascend): MindSpore inserts the gradient reductions itself

    @property
    def is_main(self):
        return self.rank == 0


def init_parallel(cfg) -> RankInfo:
    """Single process unless use_parallel; under msrun, initialise communication and the parallel context."""
    if not cfg.use_parallel:
        return RankInfo()
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init
    from .context import dp_rank, parallel_context
    pc = cfg.parallel_config
    if "MS_WORKER_NUM" not in os.environ and "RANK_SIZE" not in os.environ:
        if cfg.run_mode == "plan":   # plan the layout as if launched on dp*mp*pp workers
            world = pc.data_parallel * pc.model_parallel * pc.pipeline_stage
            return RankInfo(rank=0, world_size=world, dp_size=pc.data_parallel)
        raise ConfigError("use_parallel is True but this process was not started by msrun; launch with "
                          "bash scripts/msrun_launcher.sh \"run_mindformer.py ...\" N, or pass --use_parallel False")
    device = cfg.context.device_target
    mp, pp = pc.model_parallel, pc.pipeline_stage
    if device == "CPU" and (mp > 1 or pp > 1):      # before init(): refuse in seconds
        parallel_context(cfg, mp * pp, 0, device)
    init()
    world, rank = get_group_size(), get_rank()
    ctx = parallel_context(cfg, world, rank, device)
    for note in ctx.notes:
        if rank == 0:
            print(f"[parallel] {note}")
    ms.set_auto_parallel_context(**ctx.kwargs)
    if ctx.graph_mode:
        # Ascend only (not run here): semi/auto parallel shards whole compiled graphs, documented for
        # GRAPH_MODE; the trainer runs the same in GRAPH_MODE on CPU (tests/trainer/test_graph_mode.py)
        os.makedirs(os.path.dirname(ctx.kwargs["strategy_ckpt_config"]["save_file"]), exist_ok=True)
        ms.set_context(mode=ms.GRAPH_MODE)
    dp = world // (mp * pp)
    return RankInfo(rank=rank, world_size=world, dp_size=dp, dp_rank=dp_rank(rank, dp, mp),
                    semi_auto=ctx.graph_mode)
