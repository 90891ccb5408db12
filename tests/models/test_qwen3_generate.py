"""run_mindformer.py --run_mode predict / chat on Qwen3 and Qwen3-MoE Hugging Face directories (tiny random models
made here, the bundled Qwen3 tokenizer): the KV-cache replies equal transformers' greedy generate."""
import json
import os
import shutil
import subprocess
import sys

import torch
import transformers
from transformers import AutoTokenizer

from tests.models.test_qwen3_vs_hf import randomize
from tests.paths import ASSETS, ROOT

QWEN3_TOKENIZER = os.path.join(ASSETS, "tokenizers", "qwen3")
YAML = """
output_dir: '{out}'
load_checkpoint: '{hf}'
context: {{mode: 1, device_target: CPU}}
model:
  arch: {{type: {arch}}}
"""
COMMON = dict(vocab_size=151936, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6,
              max_position_embeddings=512, bos_token_id=151643, eos_token_id=151645)


def _model_dir(path, moe):
    torch.manual_seed(0)
    if moe:
        cfg = transformers.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                          decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True, **COMMON)
        hf = randomize(transformers.Qwen3MoeForCausalLM(cfg), 3)
    else:
        hf = randomize(transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON)), 3)
    hf.save_pretrained(path, safe_serialization=True)
    for f in os.listdir(QWEN3_TOKENIZER):
        if f != "LICENSE":
            shutil.copy(os.path.join(QWEN3_TOKENIZER, f), os.path.join(path, f))
    return hf


def _run(tmp_path, moe, args, stdin=None):
    hf_dir = str(tmp_path / "hf")
    hf = _model_dir(hf_dir, moe)
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(YAML.format(out=tmp_path / "out", hf=hf_dir,
                                     arch="Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"))
    r = subprocess.run([sys.executable, "run_mindformer.py", "--config", str(yaml_path), "--use_parallel", "False",
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=600, input=stdin)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return hf, AutoTokenizer.from_pretrained(hf_dir), rows


def _greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, pad_token_id=151643,
                          eos_token_id=151645)[0].tolist()
    return out


def test_predict_qwen3_equals_transformers_generate(tmp_path):
    hf, tok, rows = _run(tmp_path, False, ["--run_mode", "predict", "--predict_data", "Hello, Qwen3!",
                                           "--max_new_tokens", "10", "--chat_template", "none"])
    assert len(rows) == 1 and rows[0]["prompt"] == "Hello, Qwen3!"
    ids = tok("Hello, Qwen3!")["input_ids"]
    assert rows[0]["tokens"] == _greedy(hf, ids, 10) and len(rows[0]["tokens"]) == len(ids) + 10
    assert rows[0]["completion"] == tok.decode(rows[0]["tokens"][len(ids):], skip_special_tokens=True).strip()


def test_chat_qwen3_moe_with_the_tokenizers_template(tmp_path):
    hf, tok, rows = _run(tmp_path, True, ["--run_mode", "chat", "--max_new_tokens", "8", "--chat_template", "auto"],
                         stdin="What is MoE?\n/exit\n")
    assert len(rows) == 1 and rows[0]["turn"] == 1
    ids = tok.apply_chat_template([{"role": "user", "content": "What is MoE?"}], add_generation_prompt=True)
    assert rows[0]["prompt_tokens"] == len(ids)
    full = _greedy(hf, ids, 8)
    assert rows[0]["assistant"] == tok.decode(full[len(ids):], skip_special_tokens=True).strip()
    assert len(full) == len(ids) + 8 and rows[0]["assistant"]


TRAIN_YAML = """
output_dir: '{out}'
load_checkpoint: '{hf}'
run_mode: finetune
runner_config: {{epochs: 1, batch_size: 1, max_steps: 3}}
optimizer: {{type: AdamW, learning_rate: 1.e-2}}
lr_schedule: {{type: ConstantWarmUpLR, warmup_steps: 1}}
context: {{mode: 0, device_target: CPU}}
recompute_config: {{recompute: True}}
train_dataset:
  data_loader: {{type: SFTDataLoader, dataset_dir: '{data}', data_format: messages, template: auto, pack: greedy}}
  seq_length: 96
callbacks:
  - type: MFLossMonitor
  - {{type: CheckpointMonitor, prefix: qwen3_moe_lora, save_checkpoint_steps: 3}}
model:
  arch: {{type: Qwen3MoeForCausalLM}}
  model_config:
    output_router_logits: True
    pet_config: {{pet_type: lora, lora_rank: 4, lora_alpha: 8, target_modules: '.*linear_qkv|.*linear_proj|.*experts'}}
"""


def test_qwen3_moe_lora_finetune_then_predict_from_the_adapter_checkpoint(tmp_path):
    """Compiled LoRA training (recompute, packing, aux loss) through run_mindformer.py; predict from the adapter
    checkpoint equals transformers' generate on the merged weights."""
    import numpy as np
    from mindformers_sft.config import load_config
    from mindformers_sft.convert.names_qwen3 import mf_state_to_hf
    from mindformers_sft.pet.lora import merged_state
    from mindformers_sft.run import build_model
    hf_dir = str(tmp_path / "hf")
    hf = _model_dir(hf_dir, True)
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                             {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n")
    out = tmp_path / "out"
    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text(TRAIN_YAML.format(out=out, hf=hf_dir, data=data))
    r = subprocess.run([sys.executable, "run_mindformer.py", "--config", str(yaml_path), "--use_parallel", "False"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 3/3" in r.stdout and "[lora] rank 4 on 5 layers" in r.stdout, r.stdout[-2000:]
    ckpt = str(out / "checkpoint")
    r = subprocess.run([sys.executable, "run_mindformer.py", "--config", str(yaml_path), "--use_parallel", "False",
                        "--run_mode", "predict", "--load_checkpoint", ckpt, "--vocab_file", hf_dir, "--predict_data", "What is 3 plus 3?",
                        "--max_new_tokens", "6"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    row = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")][0]
    c = load_config(str(yaml_path), [f"load_checkpoint={ckpt}"])
    model = build_model(c, log=lambda *a: None)
    merged = mf_state_to_hf(merged_state(model), model.config)
    moved = max(np.abs(merged[k] - v.detach().numpy()).max() for k, v in hf.state_dict().items() if k in merged)
    assert moved > 1e-3                                    # the adapters trained and merge into the weights
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in merged.items()}, strict=False)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 3?"}], add_generation_prompt=True)
    assert row["tokens"] == _greedy(hf, ids, 6)
