"""Qwen2.5 end to end through run_mindformer.py --register_path research/qwen2_5: a tiny random Qwen2 model
(made here with transformers) with the real Qwen2 tokenizer, chat-messages data rendered by the tokenizer's own
chat_template, LoRA fine-tuning, then the exported merged weights load in transformers with our logits."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tests.paths import QWEN2_TOKENIZER, ROOT

YAML = """
output_dir: '{out}'
load_checkpoint: '{hf}'
run_mode: finetune
runner_config: {{epochs: 1, batch_size: 2, max_steps: 4}}
optimizer: {{type: AdamW, learning_rate: 1.e-3}}
lr_schedule: {{type: ConstantWarmUpLR, warmup_steps: 1}}
context: {{mode: 1}}
train_dataset:
  data_loader: {{type: SFTDataLoader, dataset_dir: '{data}', data_format: messages, template: auto}}
  seq_length: 64
callbacks:
  - type: MFLossMonitor
  - {{type: CheckpointMonitor, prefix: qwen_lora, save_checkpoint_steps: 4}}
model:
  arch: {{type: Qwen2ForCausalLM}}
  model_config:
    pet_config: {{pet_type: lora, lora_rank: 4, lora_alpha: 8, target_modules: '.*wq|.*wk|.*wv|.*wo'}}
"""


def test_qwen2_5_lora_finetune_and_export(tmp_path):
    hf = tmp_path / "qwen_tiny"
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6,
                      rope_theta=1e6, max_position_embeddings=256)
    Qwen2ForCausalLM(cfg).save_pretrained(hf, safe_serialization=True)
    for f in os.listdir(QWEN2_TOKENIZER):
        if f not in ("config.json", "LICENSE"):
            shutil.copy(os.path.join(QWEN2_TOKENIZER, f), hf / f)
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "system", "content": "You are helpful."},
                                             {"role": "user", "content": f"What is {i} plus {i}?"},
                                             {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n")
    out = tmp_path / "out"
    yaml_path = tmp_path / "qwen.yaml"
    yaml_path.write_text(YAML.format(out=out, hf=hf, data=data))
    args = [sys.executable, "run_mindformer.py", "--config", str(yaml_path)]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert "unknown architecture 'Qwen2ForCausalLM'" in r.stderr and "--register_path research/qwen2_5" in r.stderr
    r = subprocess.run(args[:2] + ["--register_path", "research/qwen2_5"] + args[2:], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 4/4" in r.stdout
    merged = tmp_path / "merged"
    r = subprocess.run([sys.executable, "convert_weight.py", "--model", "qwen2_5", "--reversed", "--input_path",
                        str(out / "checkpoint"), "--output_path", str(merged)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(merged / "config.json") as f:
        assert json.load(f)["architectures"] == ["Qwen2ForCausalLM"]
    # our LoRA model from the checkpoint vs transformers on the merged export
    import mindspore as ms
    from mindformers_sft.config import load_config
    from mindformers_sft.run import build_model, register
    register("research/qwen2_5")
    c = load_config(str(yaml_path), [f"load_checkpoint={out / 'checkpoint'}"])
    c.context.device_target = "CPU"
    model = build_model(c, log=lambda *a: None)
    ids = np.array([[151644, 872, 198, 108386, 151645, 198, 151644, 77091, 198]], np.int32)
    ours = model.logits(ms.Tensor(ids)).asnumpy()
    with torch.no_grad():
        ref = Qwen2ForCausalLM.from_pretrained(merged, dtype=torch.float32)(torch.tensor(ids).long()).logits.numpy()
    assert np.abs(ours - ref).max() < 1e-4
