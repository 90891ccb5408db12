"""`--run_mode eval --tasks`: lm-eval tasks through run_mindformer.py flags, offline; bad inputs: an unknown task
(close names listed), a local data file that is missing (named), a hub dataset not available offline (named)."""
import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from mindformers_sft import cli
from mindformers_sft.errors import ConfigError, DataError
from mindformers_sft.evaluation import harness
from tests.paths import ROOT

CONFIG = os.path.join(ROOT, "configs", "stories260k", "lora_stories260k.yaml")


def test_eval_with_tasks_writes_lm_eval_results(tmp_path, capsys):
    rc = cli.main(["--config", CONFIG, "--run_mode", "eval", "--output_dir", str(tmp_path), "--tasks",
                   "alpaca_mc,alpaca_ppl", "--limit", "3", "--eval_batch_size", "4"])
    assert rc == 0
    res = json.load(open(tmp_path / "lm_eval_results.json", encoding="utf-8"))
    assert set(res["results"]) == {"alpaca_mc", "alpaca_ppl"}
    assert 0.0 <= res["results"]["alpaca_mc"]["acc,none"] <= 1.0
    assert res["results"]["alpaca_ppl"]["bits_per_byte,none"] > 0
    assert "alpaca_mc" in capsys.readouterr().out            # lm-eval's table printed


def test_unknown_task_lists_close_names():
    with pytest.raises(ConfigError) as e:
        harness.task_manager(["alpaca_mcq", "hellaswagg"])
    msg = str(e.value)
    assert "'alpaca_mcq'" in msg and "alpaca_mc" in msg and "hellaswag" in msg


def _yaml(tmp_path, task, dataset_lines):
    (tmp_path / f"{task}.yaml").write_text(f"task: {task}\n" + dataset_lines + (
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\n"), encoding="utf-8")


def test_missing_local_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "mc.jsonl"
    _yaml(tmp_path, "my_local_mc", f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {missing}\n")
    tm = harness.task_manager(["my_local_mc"], [str(tmp_path)])
    with pytest.raises(DataError) as e:
        harness.check_datasets(tm, ["my_local_mc"])
    assert "my_local_mc" in str(e.value) and "mc.jsonl" in str(e.value)


def test_hub_dataset_offline_names_what_it_needs(tmp_path):
    _yaml(tmp_path, "my_hub_mc", "dataset_path: no-such-org/no-such-dataset\n")
    tm = harness.task_manager(["my_hub_mc"], [str(tmp_path)])
    with pytest.raises(DataError) as e:
        harness.check_datasets(tm, ["my_hub_mc"])
    msg = str(e.value)
    assert "my_hub_mc" in msg and "no-such-org/no-such-dataset" in msg and "--include_path" in msg


def test_lm_eval_command_line_with_our_model(tmp_path):
    """`python -m mindformers_sft.evaluation.lm_eval_cli` is lm-eval's CLI with `mindformers_sft` registered (and
    lm-eval's own models still there)."""
    import subprocess
    import sys
    from lm_eval.api.registry import get_model
    import mindformers_sft.evaluation.lm_eval_model  # noqa: F401
    assert get_model("hf").__name__ == "HFLM" and get_model("mindformers_sft").__name__ == "MindFormersLM"
    r = subprocess.run([sys.executable, "-m", "mindformers_sft.evaluation.lm_eval_cli", "--model", "mindformers_sft",
                        "--model_args", f"config={CONFIG},load_checkpoint=assets/models/stories260K",
                        "--tasks", "alpaca_mc", "--include_path", "assets/eval", "--limit", "2", "--batch_size", "2",
                        "--output_path", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "alpaca_mc" in r.stdout and "acc" in r.stdout
    found = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.startswith("results")]
    assert found and "alpaca_mc" in json.load(open(found[0]))["results"]
