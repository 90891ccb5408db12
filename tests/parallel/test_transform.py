"""Checkpoints between parallel layouts: the slices our predicted layouts describe, cut and re-assembled by
MindSpore's own checkpoint transform (transform_checkpoints / transform_checkpoint_by_rank), on CPU.

The expected slices are written out here from MindFormers' conventions (column-parallel weights split on the
output rows, row-parallel on the input columns, vocab-parallel embedding on the rows, rank r of a [dp, mp] stage
at (r // mp, r % mp), stage s = ranks s*dp*mp...), not computed by the code under test.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mindformers_sft.checkpoint import transform
from mindformers_sft.checkpoint import load_tensors, save_ckpt
from mindformers_sft.checkpoint.loading import read_hf_dir
from mindformers_sft.errors import CheckpointError, ConfigError
from mindformers_sft.models.config import LlamaConfig
from mindformers_sft.parallel import layout
from mindformers_sft.tools import merge_ckpt, transform_ckpt
from tests.paths import ROOT, STORIES

CONFIG = os.path.join(ROOT, "configs", "stories260k", "finetune_stories260k.yaml")
COLUMN = ("wq", "wk", "wv", "w1", "w3")
ROW = ("wo", "w2")


def expected_slice(name, full, m, mp, vocab_parallel):
    """The part of `full` that model-parallel index m of mp holds (MindFormers' Llama conventions)."""
    base = name.split(".", 1)[1] if name.startswith(("adam_m.", "adam_v.")) else name
    parts = base.split(".")
    if base.startswith("model.layers."):
        proj, kind = parts[-2], parts[-1]
        if proj in COLUMN and kind in ("weight", "bias", "lora_b"):
            return np.split(full, mp, axis=0)[m]
        if proj in ROW and kind in ("weight", "lora_a"):
            return np.split(full, mp, axis=1)[m]
        return full
    if vocab_parallel and base in ("model.tok_embeddings.embedding_weight", "lm_head.weight"):
        return np.split(full, mp, axis=0)[m]
    return full


def expected_names(names, stage, layer_stage, pp, tied):
    out = set()
    for n in names:
        base = n.split(".", 1)[1] if n.startswith(("adam_m.", "adam_v.")) else n
        if base.startswith("model.layers."):
            keep = layer_stage[int(base.split(".")[2])] == stage
        elif base.startswith("model.tok_embeddings."):
            keep = stage == 0 or (tied and stage == pp - 1)
        elif base.startswith(("model.norm_out.", "lm_head.")):
            keep = stage == pp - 1
        else:
            keep = True                      # global_step
        if keep:
            out.add(n)
    return out


def check_slices(full, dst_dir, dp, mp, pp, layer_stage, tied, vocab_parallel):
    per_stage = dp * mp
    files = transform.rank_files(dst_dir)
    assert sorted(files) == list(range(dp * mp * pp))
    for rank, f in files.items():
        got = load_tensors(f)
        stage, m = rank // per_stage, rank % mp
        assert set(got) == expected_names(full, stage, layer_stage, pp, tied), rank
        for name, arr in got.items():
            np.testing.assert_array_equal(arr, expected_slice(name, full[name], m, mp, vocab_parallel),
                                          err_msg=f"rank {rank} {name}")


@pytest.fixture(scope="module")
def stories_sliced(tmp_path_factory):
    """stories260K cut for dp 2 x mp 2 x pp 2 (vocab-parallel embedding) by transform_ckpt --config."""
    d = tmp_path_factory.mktemp("sliced")
    dst = str(d / "dist")
    rc = transform_ckpt.main(["--src_checkpoint", STORIES, "--dst_checkpoint_dir", dst, "--config", CONFIG,
                              "--options", "parallel_config.data_parallel=2", "parallel_config.model_parallel=2",
                              "parallel_config.pipeline_stage=2", "parallel_config.vocab_emb_dp=False"])
    assert rc == 0
    return dst, read_hf_dir(STORIES)


def test_transform_ckpt_cuts_the_slices_of_the_parallel_config(stories_sliced):
    dst, full = stories_sliced
    # stories260K: 5 layers over 2 stages -> [2, 3] (the remainder goes to the last stage, as MindFormers)
    check_slices(full, dst, dp=2, mp=2, pp=2, layer_stage=[0, 0, 1, 1, 1], tied=True, vocab_parallel=True)
    meta = json.load(open(os.path.join(dst, "rank_5", "meta.json")))["checkpoints"][0]
    assert meta["parallel"] == {"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 2, "sliced": True}
    assert meta["hf_config"]["num_hidden_layers"] == 5
    assert transform.is_sliced(dst)


def test_merge_ckpt_reassembles_the_slices_bit_exactly(stories_sliced, tmp_path):
    dst, full = stories_sliced
    out = str(tmp_path / "merged.safetensors")
    assert merge_ckpt.main(["--src_dir", dst, "--strategy_dir", os.path.join(dst, "strategy"),
                            "--output_path", out]) == 0
    got = load_tensors(out)
    assert set(got) == set(full)
    for k in full:
        np.testing.assert_array_equal(got[k], full[k], err_msg=k)


def test_reslice_distributed_into_another_layout(stories_sliced, tmp_path):
    """mp 2 x pp 2 slices -> mp 4 x pp 1 (vocab replicated), through MindSpore's slice-to-slice transform."""
    dst, full = stories_sliced
    out = str(tmp_path / "mp4")
    rc = transform_ckpt.main(["--src_checkpoint", dst, "--dst_checkpoint_dir", out, "--config", CONFIG,
                              "--options", "parallel_config.model_parallel=4", "parallel_config.vocab_emb_dp=True"])
    assert rc == 0
    check_slices(full, out, dp=1, mp=4, pp=1, layer_stage=[0] * 5, tied=True, vocab_parallel=False)


def _tiny_qwen(tmp_path):
    import transformers
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                   use_sliding_window=False)
    hf = tmp_path / "qwen"
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(hf, safe_serialization=True)
    return str(hf)


def test_bias_lora_and_optimizer_state_follow_their_weights(tmp_path):
    """Qwen2 (qkv bias, untied lm_head) with LoRA adapters and Adam moments: mp 2 x pp 3."""
    hf = _tiny_qwen(tmp_path)
    mc = LlamaConfig.from_hf_config(hf)
    full = {k: v.astype(np.float32) for k, v in read_hf_dir(hf).items()}
    rng = np.random.default_rng(0)
    for i in range(3):
        for proj, (o, n) in {"attention.wq": (32, 32), "attention.wo": (32, 32), "feed_forward.w2": (32, 48)}.items():
            full[f"model.layers.{i}.{proj}.lora_a"] = rng.standard_normal((4, n)).astype(np.float32)
            full[f"model.layers.{i}.{proj}.lora_b"] = rng.standard_normal((o, 4)).astype(np.float32)
            for p in ("adam_m", "adam_v"):
                full[f"{p}.model.layers.{i}.{proj}.lora_b"] = rng.standard_normal((o, 4)).astype(np.float32)
    full["global_step"] = np.array(12, np.int32)
    src = str(tmp_path / "complete.ckpt")
    save_ckpt(full, src)
    pc = {"data_parallel": 1, "model_parallel": 2, "pipeline_stage": 3, "vocab_emb_dp": False}
    strategy = layout.write_strategy({k: v.shape for k, v in full.items()}, mc, pc, str(tmp_path / "strategy"))
    dst = str(tmp_path / "dist")
    transform.to_layout(src, strategy, dst)
    check_slices(full, dst, dp=1, mp=2, pp=3, layer_stage=[0, 1, 2], tied=False, vocab_parallel=True)
    back = str(tmp_path / "back.ckpt")
    transform.to_complete(dst, strategy, back)
    got = load_tensors(back)
    assert set(got) == set(full)
    for k in full:
        np.testing.assert_array_equal(got[k], full[k], err_msg=k)


def run(*args):
    r = subprocess.run([sys.executable, "run_mindformer.py", "--config", CONFIG, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    return r.returncode, r.stdout, r.stderr


def test_auto_trans_ckpt_loads_slices_like_the_complete_checkpoint(stories_sliced, tmp_path):
    dst, _ = stories_sliced
    losses = {}
    for name, src in (("complete", STORIES), ("sliced", dst)):
        out = str(tmp_path / name)
        rc, so, se = run("--run_mode", "eval", "--load_checkpoint", src, "--auto_trans_ckpt", "True",
                         "--output_dir", out)
        assert rc == 0, se[-3000:]
        with open(os.path.join(out, "eval_results.json")) as f:
            losses[name] = json.load(f)["loss"]
    assert "[auto_trans_ckpt] assembling 8 rank slices" in so
    assert os.path.isfile(os.path.join(tmp_path, "sliced", "transformed_checkpoint", "rank_0", "complete.ckpt"))
    assert losses["sliced"] == losses["complete"]

    rc, so, se = run("--run_mode", "eval", "--load_checkpoint", dst, "--output_dir", str(tmp_path / "refused"))
    assert rc != 0 and "model/pipeline-parallel slices" in se and "auto_trans_ckpt: True" in se


def test_errors_name_the_missing_piece(stories_sliced, tmp_path):
    dst, _ = stories_sliced
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(dst, broken)
    shutil.rmtree(broken / "strategy")
    with pytest.raises(CheckpointError, match="src_strategy_path_or_dir"):
        transform.find_strategy("", str(broken), str(tmp_path / "w"))
    with pytest.raises(CheckpointError, match="neither a strategy file"):
        transform.find_strategy(str(tmp_path / "nothing_here"), str(broken), str(tmp_path / "w"))
    shutil.rmtree(broken / "rank_3")
    with pytest.raises(CheckpointError, match="rank_3 are missing"):
        transform.rank_files(str(broken))
    mc = LlamaConfig.from_hf_config(STORIES)
    with pytest.raises(ConfigError, match=r"feed_forward.w1.weight .* not divisible by 8"):
        layout.layouts({"model.layers.0.feed_forward.w1.weight": (172, 64)}, mc,
                       {"data_parallel": 1, "model_parallel": 8, "pipeline_stage": 1})


def test_convert_reversed_refuses_slices_and_takes_the_merged_file(stories_sliced, tmp_path):
    dst, full = stories_sliced
    r = subprocess.run([sys.executable, "convert_weight.py", "--reversed", "--input_path", dst, "--output_path",
                        str(tmp_path / "hf")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "model/pipeline-parallel slices" in r.stderr and "merge_ckpt" in r.stderr
    merged = str(tmp_path / "merged.ckpt")
    assert merge_ckpt.main(["--src_dir", dst, "--strategy_dir", os.path.join(dst, "strategy"),
                            "--output_path", merged]) == 0
    r = subprocess.run([sys.executable, "convert_weight.py", "--reversed", "--input_path", merged, "--output_path",
                        str(tmp_path / "hf"), "--config", os.path.join(STORIES, "config.json")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import safetensors.numpy
    got = safetensors.numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    ref = safetensors.numpy.load_file(os.path.join(STORIES, "model.safetensors"))
    assert set(got) == set(ref) - {"lm_head.weight"}     # tied to the embedding: not written (as transformers)
    for k in got:
        np.testing.assert_array_equal(got[k], ref[k].astype(got[k].dtype), err_msg=k)


def test_tool_errors_are_one_line_and_name_the_input(stories_sliced, tmp_path, capsys):
    dst, _ = stories_sliced
    out = str(tmp_path / "x")
    assert transform_ckpt.main(["--src_checkpoint", str(tmp_path / "missing"), "--dst_checkpoint_dir", out,
                                "--config", CONFIG]) == 1
    err = capsys.readouterr().err
    assert "transform_ckpt: error:" in err and "missing" in err and "does not exist" in err
    assert transform_ckpt.main(["--src_checkpoint", STORIES, "--dst_checkpoint_dir", out, "--config", CONFIG,
                                "--dst_strategy", os.path.join(dst, "strategy")]) == 1
    assert "either --dst_strategy or --config" in capsys.readouterr().err
    assert not os.path.exists(out) and not os.path.exists(out + ".work")
    assert merge_ckpt.main(["--src_dir", dst, "--strategy_dir", str(tmp_path / "nope"), "--output_path",
                            str(tmp_path / "m.ckpt")]) == 1
    assert "nope: strategy file or directory not found" in capsys.readouterr().err
