"""A Qwen3 fine-tune started from a Hugging Face directory with a non-default fused-tensor layout
(use_contiguous_weight_layout_attention True, use_interleaved_weight_layout_mlp False): its training checkpoint
records the layout and the tokenizer in meta.json, so predict with no YAML model_config and no --vocab_file, and
convert_weight.py --reversed, read it right. Learning rate 0: the reversed weights must be the original ones
bit for bit (a layout read as the default one would scramble q/k/v and gate/up rows), and predict must equal
transformers' greedy generate on the original model."""
import json
import os
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

from tests.models.test_qwen3_generate import _greedy, _model_dir
from tests.paths import ASSETS, ROOT

TRAIN_YAML = """
seed: 1
output_dir: '{out}'
load_checkpoint: '{hf}'
runner_config: {{epochs: 1, batch_size: 2, max_steps: 1}}
optimizer: {{type: AdamW, learning_rate: 0.0, weight_decay: 0.0}}
lr_schedule: {{type: ConstantWarmUpLR, learning_rate: 0.0, warmup_steps: 0, total_steps: -1}}
train_dataset:
  data_loader: {{type: SFTDataLoader, dataset_dir: '{data}', data_format: alpaca, template: chatml,
                split: 'train[:4]', shuffle: False}}
  seq_length: 64
  batch_size: 2
callbacks:
  - type: CheckpointMonitor
    save_checkpoint_steps: 1
    checkpoint_format: safetensors
context: {{mode: 1, device_target: CPU}}
model:
  arch: {{type: Qwen3ForCausalLM}}
  model_config: {{use_contiguous_weight_layout_attention: True, use_interleaved_weight_layout_mlp: False}}
"""
PREDICT_YAML = """
output_dir: '{out}'
context: {{mode: 1, device_target: CPU}}
model:
  arch: {{type: Qwen3ForCausalLM}}
"""


def _run(args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_layout_and_tokenizer_recorded_in_meta(tmp_path):
    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "out")
    hf = _model_dir(hf_dir, moe=False)
    (tmp_path / "train.yaml").write_text(TRAIN_YAML.format(
        out=out, hf=hf_dir, data=os.path.join(ASSETS, "data", "alpaca_en_demo.json")))
    _run(["run_mindformer.py", "--config", str(tmp_path / "train.yaml"), "--run_mode", "finetune",
          "--use_parallel", "False"])
    ckpt_dir = os.path.join(out, "checkpoint")
    meta = json.load(open(os.path.join(ckpt_dir, "rank_0", "meta.json")))
    entry = meta["checkpoints"][-1] if "checkpoints" in meta else meta
    text = json.dumps(entry)
    assert '"use_contiguous_weight_layout_attention": true' in text and '"tokenizer": ' in text

    # --reversed: the original HF tensors, bit for bit
    rev = str(tmp_path / "reversed")
    _run(["convert_weight.py", "--model", "qwen3", "--reversed", "--input_path", ckpt_dir, "--output_path", rev])
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    back = {}
    for f in os.listdir(rev):
        if f.endswith(".safetensors"):
            back.update(load_file(os.path.join(rev, f)))
    assert set(back) == set(original)
    for k, v in original.items():
        assert np.array_equal(back[k], v), k

    # predict from the training checkpoint: architecture, layout and tokenizer all come from its record
    (tmp_path / "predict.yaml").write_text(PREDICT_YAML.format(out=str(tmp_path / "pred")))
    stdout = _run(["run_mindformer.py", "--config", str(tmp_path / "predict.yaml"), "--run_mode", "predict",
                   "--load_checkpoint", ckpt_dir, "--use_parallel", "False", "--predict_data", "Hello, Qwen3!",
                   "--max_new_tokens", "8", "--chat_template", "none"])
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(hf_dir)("Hello, Qwen3!")["input_ids"]
    assert rows[0]["tokens"] == _greedy(hf, ids, 8)
