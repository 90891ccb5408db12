"""Semi-auto parallel (Ascend) runs the trainer with MindSpore in GRAPH_MODE (run.setup_context). The same
training code in GRAPH_MODE on CPU ends with the weights of the default PyNative + jit run."""
import json
import os
import subprocess
import sys

import numpy as np

from mindformers_sft.checkpoint import load_tensors
from tests.paths import ROOT

CONFIG = "configs/stories260k/finetune_stories260k.yaml"
OPTIONS = ["runner_config.max_steps=3", "runner_config.batch_size=4", "do_eval=False",
           "eval_dataset.data_loader.dataset_dir=''", "train_dataset.data_loader.split=train[:48]",
           "callbacks=[{type: MFLossMonitor}, {type: CheckpointMonitor, prefix: gm, save_checkpoint_steps: 3}]"]
# the switch setup_context makes under semi-auto parallel, applied to a single CPU process
GRAPH = """
import sys, mindspore as ms
import mindformers_sft.run as run
setup = run.setup_context
def graph_mode(cfg):
    rank = setup(cfg)
    ms.set_context(mode=ms.GRAPH_MODE)
    return rank
run.setup_context = graph_mode
from mindformers_sft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _weights(out):
    d = os.path.join(out, "checkpoint", "rank_0")
    with open(os.path.join(d, "meta.json")) as f:
        return load_tensors(os.path.join(d, json.load(f)["last_ckpt_file"]))


def test_graph_mode_trains_like_pynative_jit(tmp_path):
    outs = {}
    for name, prog in (("pynative", ["run_mindformer.py"]), ("graph", ["-c", GRAPH])):
        outs[name] = str(tmp_path / name)
        r = subprocess.run([sys.executable, *prog, "--config", CONFIG, "--output_dir", outs[name],
                            "--options", *OPTIONS], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = _weights(outs["pynative"]), _weights(outs["graph"])
    assert set(a) == set(b)
    assert int(a["global_step"]) == int(b["global_step"]) == 3
    worst = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    assert worst <= 1e-5, worst
    # and training moved the weights (the comparison is not between two untouched copies)
    start = load_tensors(os.path.join(ROOT, "assets", "models", "stories260K", "model.safetensors"))
    assert not np.allclose(start["model.norm.weight"], a["model.norm_out.weight"])
