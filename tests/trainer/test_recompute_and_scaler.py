"""recompute_config leaves loss and gradients unchanged (graph mode); the dynamic loss scale follows
MindFormers' DynamicLossScaleUpdateCell rules; training checkpoints in safetensors verify like CKPT."""
import os

import mindspore as ms
import numpy as np
from mindspore import Tensor

from mindformers_sft.checkpoint.training_state import CheckpointManager
from mindformers_sft.pretrained import from_hf_dir
from mindformers_sft.run import recompute_layers
from mindformers_sft.trainer.step import LossScaler
from tests.paths import STORIES


def _loss_and_grads(recompute):
    m = from_hf_dir(STORIES)
    for layer in list(m.model.layers)[:recompute_layers(recompute, 5)]:
        layer.recompute()

    def loss(i, l):
        return m.loss_sum_and_count(i, l)[0]
    ids = Tensor(np.random.default_rng(0).integers(3, 512, (2, 33)).astype(np.int32))
    value, grads = ms.jit(ms.value_and_grad(loss, None, m.trainable_params()))(ids, ids)
    return float(value.asnumpy()), [g.asnumpy() for g in grads]


def test_recompute_keeps_loss_and_grads():
    assert recompute_layers([2, 1], 5) == 3 and recompute_layers(True, 5) == 5 and recompute_layers(False, 5) == 0
    l0, g0 = _loss_and_grads(False)
    l1, g1 = _loss_and_grads([2, 1])
    assert l0 == l1
    assert max(float(np.abs(a - b).max()) for a, b in zip(g0, g1)) < 1e-6


def test_dynamic_loss_scale():
    s = LossScaler.from_config({"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 1024, "scale_factor": 2,
                                "scale_window": 2}, "float16")
    assert s.update(False) is False and s.value == 512       # overflow: skip the step, halve
    assert s.update(True) and s.value == 512
    assert s.update(True) and s.value == 1024                 # window of good steps: double
    assert LossScaler.from_config(None, "float32") is None
    assert LossScaler.from_config(None, "float16").dynamic
    fixed = LossScaler.from_config(128, "float16")
    assert not fixed.dynamic and fixed.update(False) is False and fixed.value == 128


def test_safetensors_training_checkpoints_verify(tmp_path):
    mgr = CheckpointManager(str(tmp_path), rank=0, prefix="p", keep_max=2, fmt="safetensors")
    for step in (1, 2, 3):
        mgr.save({"w": np.full((4, 4), step, np.float32)}, step, 0, step * 8)
    files = sorted(os.listdir(mgr.dir))
    assert files == ["meta.json", "p_rank_0-0_2.safetensors", "p_rank_0-0_3.safetensors"]   # keep_checkpoint_max
    newest = os.path.join(mgr.dir, "p_rank_0-0_3.safetensors")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) - 8)
    warnings = []
    entry, arrays = mgr.latest(warn=warnings.append)
    assert entry["step"] == 2 and float(arrays["w"][0, 0]) == 2.0
    assert "p_rank_0-0_3.safetensors" in warnings[0] and "truncated" in warnings[0]
