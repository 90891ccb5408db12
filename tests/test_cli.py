"""The README's main job through run_mindformer.py: LoRA fine-tuning lowers the held-out loss; eval and
predict run on the saved checkpoint; bad YAML and a diverging run stop with located, clear messages."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from mindformers_sft.checkpoint import load_tensors
from tests.paths import ROOT

CONFIG = "configs/stories260k/lora_stories260k.yaml"
SHORT = ["runner_config.max_steps=24", "callbacks=[{type: MFLossMonitor, per_print_times: 8}, "
         "{type: CheckpointMonitor, prefix: lora, save_checkpoint_steps: 12}, {type: EvalCallBack, step_interval: 12}, "
         "{type: TensorBoardMonitor}]"]


def run(*args, timeout=900):
    r = subprocess.run([sys.executable, "run_mindformer.py", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("job") / "out")
    rc, so, se = run("--config", CONFIG, "--run_mode", "eval", "--output_dir", out + "_base")
    assert rc == 0, se[-3000:]
    with open(os.path.join(out + "_base", "eval_results.json")) as f:
        base = json.load(f)
    rc, so, se = run("--config", CONFIG, "--output_dir", out, "--options", *SHORT)
    assert rc == 0, se[-3000:]
    return out, base, so


def test_finetune_lowers_held_out_loss_and_writes_outputs(trained):
    out, base, log = trained
    with open(os.path.join(out, "eval_results.json")) as f:
        after = json.load(f)
    assert after["loss"] < base["loss"] - 0.05, (base, after)
    assert math.isclose(after["perplexity"], math.exp(after["loss"]), rel_tol=1e-6)
    assert "step 24/24" in log and "tokens/s" in log and "ETA" in log
    for name in ("loss_curve.png", "loss_history.jsonl", "config_resolved.json", "train_rank_0.log"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tensorboard")))
    with open(os.path.join(out, "checkpoint", "rank_0", "meta.json")) as f:
        meta = json.load(f)
    assert [c["step"] for c in meta["checkpoints"]] == [12, 24]
    last = load_tensors(os.path.join(out, "checkpoint", "rank_0", meta["last_ckpt_file"]))
    assert last and all(k.endswith(("lora_a", "lora_b")) or k.startswith(("adam_", "global_step")) for k in last)


def test_eval_on_saved_checkpoint_matches_training_eval(trained, tmp_path):
    out, _, _ = trained
    rc, so, se = run("--config", CONFIG, "--run_mode", "eval", "--load_checkpoint", os.path.join(out, "checkpoint"),
                     "--output_dir", str(tmp_path))
    assert rc == 0, se[-3000:]
    with open(os.path.join(tmp_path, "eval_results.json")) as f:
        again = json.load(f)
    with open(os.path.join(out, "eval_results.json")) as f:
        after = json.load(f)
    assert abs(again["loss"] - after["loss"]) < 1e-5


def test_predict_on_saved_checkpoint(trained, tmp_path):
    out, _, _ = trained
    rc, so, se = run("--config", CONFIG, "--run_mode", "predict", "--load_checkpoint", os.path.join(out, "checkpoint"),
                     "--predict_data", "Tell me a story about a cat.", "--max_new_tokens", "20",
                     "--output_dir", str(tmp_path))
    assert rc == 0, se[-3000:]
    rows = [json.loads(l) for l in so.splitlines() if l.startswith("{")]
    assert len(rows) == 1 and rows[0]["prompt"] == "Tell me a story about a cat."
    assert rows[0]["tokens"][0] == 1 and len(rows[0]["tokens"]) > 5
    assert isinstance(rows[0]["completion"], str) and rows[0]["completion"]


def test_yaml_typo_names_line_and_closest_key(tmp_path):
    text = open(os.path.join(ROOT, CONFIG)).read().replace("  learning_rate: 5.e-3\n  weight_decay",
                                                           "  learning_rat: 5.e-3\n  weight_decay")
    bad = tmp_path / "typo.yaml"
    bad.write_text(text)
    line = text.splitlines().index("  learning_rat: 5.e-3") + 1
    rc, so, se = run("--config", str(bad))
    assert rc == 2
    assert f"typo.yaml:{line}: unknown key 'optimizer.learning_rat'; did you mean 'learning_rate'?" in se


def test_diverging_run_stops_with_last_good_state(tmp_path):
    rc, so, se = run("--config", CONFIG, "--output_dir", str(tmp_path), "--options", "optimizer.learning_rate=1e4",
                     "lr_schedule.learning_rate=1e4", "lr_schedule.warmup_ratio=0", "runner_wrapper.use_clip_grad=False",
                     "runner_config.max_steps=40", "context.mode=1", "do_eval=False",
                     "callbacks=[{type: MFLossMonitor}, {type: CheckpointMonitor, prefix: nan, save_checkpoint_steps: 100}]")
    assert rc == 2, (so[-2000:], se[-2000:])
    assert "not finite" in se and "the update was not applied" in se
    assert "last good state" in so
    with open(os.path.join(tmp_path, "checkpoint", "rank_0", "meta.json")) as f:
        meta = json.load(f)
    saved = load_tensors(os.path.join(tmp_path, "checkpoint", "rank_0", meta["last_ckpt_file"]))
    assert all(np.isfinite(v).all() for k, v in saved.items() if not k.startswith("global_step"))


def test_predict_straight_from_hugging_face_dir():
    rc, so, se = run("--run_mode", "predict", "--load_checkpoint", "assets/models/stories260K",
                     "--predict_data", "Once upon a time", "--max_new_tokens", "30")
    assert rc == 0, se[-3000:]
    row = json.loads([l for l in so.splitlines() if l.startswith("{")][0])
    # transformers' greedy continuation (assets/README.md)
    assert row["completion"].startswith(", there was a little girl named Lily. She loved to play outside in the park.")


def test_predict_sampling_is_seeded():
    args = ("--run_mode", "predict", "--load_checkpoint", "assets/models/stories260K", "--predict_data", "Once upon",
            "--max_new_tokens", "20", "--do_sample", "True", "--temperature", "1.3", "--top_k", "50", "--top_p", "0.95")
    outs = []
    for seed in ("1", "1", "2"):
        rc, so, se = run(*args, "--seed", seed)
        assert rc == 0, se[-3000:]
        outs.append(json.loads([l for l in so.splitlines() if l.startswith("{")][0])["tokens"])
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_wrong_tokenizer_is_refused(tmp_path):
    rc, so, se = run("--config", CONFIG, "--output_dir", str(tmp_path), "--vocab_file",
                     "assets/tokenizers/llama2/tokenizer.model")
    assert rc == 2
    assert "tokenizer.model: the tokenizer has 32000 tokens but model_config.vocab_size is 512" in se
