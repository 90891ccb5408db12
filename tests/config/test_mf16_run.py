"""One command runs MindFormers' finetune_qwen3.yaml (configs/qwen3/finetune_qwen3_tiny.yaml: only paths and sizes
changed) on CPU: a tiny random Qwen3 made by transformers as pretrained_model_dir (architecture, tokenizer, weights),
HFDataLoader + handlers, checkpoints as safetensors, and a resume from them. Ascend on a machine without one is a
clear error."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from mindformers_sft.checkpoint import load_tensors
from tests.paths import ASSETS, ROOT

CONFIG = "configs/qwen3/finetune_qwen3_tiny.yaml"


def run(*args):
    r = subprocess.run([sys.executable, "run_mindformer.py", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    import torch
    import transformers
    out = str(tmp_path_factory.mktemp("tiny_qwen3"))
    torch.manual_seed(0)
    conf = transformers.Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=512, tie_word_embeddings=True, rope_theta=1e6)
    transformers.Qwen3ForCausalLM(conf).save_pretrained(out, safe_serialization=True, max_shard_size="1MB")
    tok = os.path.join(ASSETS, "tokenizers", "qwen3")
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok, f), out)
    return out


def test_tiny_qwen3_finetune_and_resume(qwen3_dir, tmp_path):
    out = str(tmp_path / "out")
    opts = ["--output_dir", out, "--options", f"pretrained_model_dir={qwen3_dir}"]
    rc, so, se = run("--config", CONFIG, *opts, "runner_config.max_steps=2")
    assert rc == 0, se[-3000:]
    assert so.count("no effect on this device (CPU)") == 1 and "context.ascend_config.precision_mode" in so
    assert os.path.isfile(os.path.join(qwen3_dir, "model.safetensors.index.json"))      # sharded weights
    assert f"weights from pretrained_model_dir {qwen3_dir}" in so and "step 2/2" in so
    assert "[data] HFDataLoader assets/data/alpaca_en_demo.json:" in so
    ckdir = os.path.join(out, "checkpoint", "rank_0")
    with open(os.path.join(ckdir, "meta.json")) as f:
        meta = json.load(f)
    assert meta["last_ckpt_file"].endswith(".safetensors")          # CheckpointMonitor checkpoint_format
    first = load_tensors(os.path.join(ckdir, meta["last_ckpt_file"]))
    rc, so, se = run("--config", CONFIG, *opts, "runner_config.max_steps=3", "resume_training=True")
    assert rc == 0, se[-3000:]
    assert "[resume]" in so and "step 2" in so and "step 3/3" in so
    with open(os.path.join(ckdir, "meta.json")) as f:
        meta = json.load(f)
    assert meta["checkpoints"][-1]["step"] == 3 and meta["last_ckpt_file"].endswith(".safetensors")
    last = load_tensors(os.path.join(ckdir, meta["last_ckpt_file"]))
    assert set(first) == set(last) and any((first[k] != last[k]).any() for k in first if not k.startswith("adam"))


def test_ascend_without_device_is_a_clear_error(tmp_path):
    rc, so, se = run("--config", "tests/config/fixtures/mindformers/finetune_qwen3.yaml", "--output_dir",
                     str(tmp_path))
    assert rc == 2
    assert "context.device_target is Ascend, but this machine has no Ascend device" in se
    assert "pass --device_target CPU" in se and "Traceback" not in se
