"""convert_weight.py: HF <-> MindFormers, bit-exact round trips, dtypes, configs, errors."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file as np_load_file, save_file as np_save_file

import mindspore as ms

from mindformers_sft.checkpoint import BF16, HF_INDEX_NAME, load_tensors, verify
from mindformers_sft.convert import (convert_hf_to_mf, convert_mf_to_hf, expected_hf_shapes, expected_shapes,
                                     hf_to_mf, load_model_config, run, sidecar_config_path)
from mindformers_sft.errors import CheckpointError, ConfigError
from mindformers_sft.models.config import LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STORIES = os.path.join(ROOT, "assets", "models", "stories260K")
SCRIPT = os.path.join(ROOT, "convert_weight.py")
ARCH_KEYS = ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings",
             "tie_word_embeddings", "hidden_act", "rope_scaling")


def _make_hf(path, family="llama", tie=False, seed=0, shard="40KB"):
    """A tiny random HF model saved with several shards + index."""
    torch.manual_seed(seed)
    common = dict(vocab_size=160, hidden_size=32, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, rms_norm_eps=1e-5)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                 "original_max_position_embeddings": 16})
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, use_sliding_window=False)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():     # non-trivial values everywhere (biases, norms too)
            p.copy_(torch.randn(p.shape) * (0.1 if "norm" not in name else 0.05) + (1.0 if "norm" in name else 0))
    model.eval()
    model.save_pretrained(path, max_shard_size=shard, safe_serialization=True)
    return model


def _hf_tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(np_load_file(os.path.join(d, f)))
    return out


def _raw_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _logits(model_dir_or_model, ids):
    m = model_dir_or_model
    if isinstance(m, str):
        m = transformers.AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32)
    m.eval()
    with torch.no_grad():
        return m(torch.tensor(ids)).logits


IDS = [[1, 5, 17, 33, 2, 99, 150, 7]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for fam, tie in (("llama", False), ("qwen2", True), ("llama", True)):
        d = str(root / f"{fam}_{'tied' if tie else 'untied'}")
        model = _make_hf(d, fam, tie)
        out[(fam, tie)] = (d, _logits(model, IDS))
    return out


@pytest.mark.parametrize("fam,tie", [("llama", False), ("qwen2", True), ("llama", True)])
@pytest.mark.parametrize("ext", ["ckpt", "safetensors"])
def test_hf_mf_hf_round_trip_is_bit_exact(models, tmp_path, fam, tie, ext):
    src, ref_logits = models[(fam, tie)]
    assert os.path.isfile(os.path.join(src, HF_INDEX_NAME))          # really multi-shard
    assert len([f for f in os.listdir(src) if f.endswith(".safetensors")]) >= 3
    orig = _hf_tensors(src)
    model_flag = "qwen2_5" if fam == "qwen2" else "llama"

    mf = str(tmp_path / f"mf.{ext}")
    r = run(["--model", model_flag, "--input_path", src, "--output_path", mf])
    assert r.tensors == len(orig) and r.bytes == sum(v.nbytes for v in orig.values())
    verify(mf, deep=True)
    mf_t = load_tensors(mf)
    assert set(mf_t) == {hf_to_mf(k) for k in orig}
    for k, v in orig.items():                                          # renamed, values untouched
        assert _raw_equal(mf_t[hf_to_mf(k)], v), k
    if fam == "qwen2":
        assert "model.layers.0.attention.wq.bias" in mf_t
    assert ("lm_head.weight" in mf_t) == (not tie)
    if ext == "ckpt":                                                  # MindSpore itself reads it
        loaded = ms.load_checkpoint(mf)
        assert set(loaded) == set(mf_t)
        assert _raw_equal(loaded["model.norm_out.weight"].asnumpy(), orig["model.norm.weight"])
    else:
        with safe_open(mf, "np") as f:
            assert f.metadata()["format"] == "ms"
            assert json.loads(f.metadata()["hf_config"])["hidden_size"] == 32

    back = str(tmp_path / "hf_back")
    r2 = run(["--model", model_flag, "--reversed", "--input_path", mf, "--output_path", back,
              "--max_shard_size", "30KB"])
    assert r2.tensors == len(orig)
    assert os.path.isfile(os.path.join(back, HF_INDEX_NAME))
    got = _hf_tensors(back)
    assert set(got) == set(orig)
    for k, v in orig.items():
        assert _raw_equal(got[k], v), k
    c0 = json.load(open(os.path.join(src, "config.json")))
    c1 = json.load(open(os.path.join(back, "config.json")))
    for key in ARCH_KEYS:
        assert c1.get(key) == c0.get(key), key
    assert torch.equal(_logits(back, IDS), ref_logits)


def test_stories260k_tied_lm_head_dropped_both_ways(tmp_path):
    with safe_open(os.path.join(STORIES, "model.safetensors"), "np") as f:
        assert "lm_head.weight" in f.keys()          # this file stores the tied head (equal to the embedding)
        assert np.array_equal(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))
    ck = str(tmp_path / "stories.ckpt")
    r = convert_hf_to_mf(STORIES, ck, model="llama")
    assert r.tensors == 47
    mf = load_tensors(ck)
    assert "lm_head.weight" not in mf and len(mf) == 47
    assert set(mf) == set(expected_shapes(LlamaConfig.from_hf_config(STORIES)))
    back = str(tmp_path / "hf")
    convert_mf_to_hf(ck, back, model="llama")
    got = _hf_tensors(back)
    orig = np_load_file(os.path.join(STORIES, "model.safetensors"))
    assert set(got) == set(orig) - {"lm_head.weight"}
    assert all(_raw_equal(got[k], orig[k]) for k in got)
    ids = [[1, 5, 17, 33, 2, 99, 150, 7, 300, 511]]
    assert torch.equal(_logits(back, ids), _logits(STORIES, ids))


@pytest.mark.parametrize("flag,tdt,np_dt", [("bf16", torch.bfloat16, BF16), ("fp16", torch.float16, np.float16)])
def test_dtype_conversion_equals_torch(models, tmp_path, flag, tdt, np_dt):
    src, _ = models[("qwen2", True)]
    orig = _hf_tensors(src)
    for ext in ("ckpt", "safetensors"):
        out = str(tmp_path / f"m.{ext}")
        r = run(["--model", "qwen2", "--input_path", src, "--output_path", out, "--dtype", flag])
        assert r.dtype == ("bfloat16" if flag == "bf16" else "float16")
        side = json.load(open(sidecar_config_path(out)))
        assert side.get("dtype", side.get("torch_dtype")) == r.dtype
        mf = load_tensors(out)
        for k, v in orig.items():
            a = mf[hf_to_mf(k)]
            assert a.dtype == np_dt, k
            ref = torch.from_numpy(v).to(tdt).view(torch.int16).numpy().view(np.uint16)
            assert np.array_equal(a.view(np.uint16), ref), k
    if flag == "bf16":   # bf16 MindFormers -> HF keeps bf16 and transformers reads it as such
        back = str(tmp_path / "hf")
        run(["--model", "qwen2", "--reversed", "--input_path", str(tmp_path / "m.ckpt"), "--output_path", back])
        assert json.load(open(os.path.join(back, "config.json")))["dtype"] == "bfloat16"
        m = transformers.AutoModelForCausalLM.from_pretrained(back, dtype="auto")
        assert m.dtype == torch.bfloat16
        sd = m.state_dict()
        w = torch.from_numpy(orig["model.layers.1.mlp.down_proj.weight"]).to(torch.bfloat16)
        assert torch.equal(sd["model.layers.1.mlp.down_proj.weight"], w)
        # and back to fp32 on request: bf16 -> fp32 is exact
        back32 = str(tmp_path / "hf32")
        run(["--reversed", "--input_path", str(tmp_path / "m.ckpt"), "--output_path", back32, "--dtype", "fp32"])
        t32 = _hf_tensors(back32)["model.layers.1.mlp.down_proj.weight"]
        assert t32.dtype == np.float32 and torch.equal(torch.from_numpy(t32), w.float())


def test_expected_shapes_match_transformers(models):
    for (fam, tie), (src, _) in models.items():
        cfg = LlamaConfig.from_hf_config(src)
        model = transformers.AutoModelForCausalLM.from_pretrained(src)
        hf_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if tie:
            hf_shapes.pop("lm_head.weight")
        assert dict(expected_hf_shapes(cfg)) == hf_shapes
        exp = expected_shapes(cfg)
        assert exp["model.layers.0.attention.wk.weight"] == (16, 32)             # GQA: 2 kv heads x 8
        assert ("model.layers.0.attention.wq.bias" in exp) == (fam == "qwen2")
        assert ("lm_head.weight" in exp) == (not tie)


def test_reversed_with_mindformers_yaml_config(models, tmp_path):
    src, ref_logits = models[("llama", False)]
    ck = str(tmp_path / "m.ckpt")
    run(["--model", "llama", "--input_path", src, "--output_path", ck])
    os.unlink(sidecar_config_path(ck))
    with pytest.raises(ConfigError, match="m.ckpt: no model config found.*--config"):
        run(["--reversed", "--input_path", ck, "--output_path", str(tmp_path / "x")])
    yml = tmp_path / "llama_tiny.yaml"
    yml.write_text(
        "model:\n  model_config:\n    type: LlamaConfig\n    vocab_size: 160\n    hidden_size: 32\n"
        "    intermediate_size: 72\n    num_layers: 3\n    num_heads: 4\n    n_kv_heads: 2\n"
        "    max_position_embedding: 64\n    rms_norm_eps: 1.0e-5\n    theta: 10000.0\n"
        "    rope_scaling: {rope_type: llama3, factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0,"
        " original_max_position_embeddings: 16}\n    compute_dtype: bfloat16\n  arch:\n    type: LlamaForCausalLM\n")
    back = str(tmp_path / "hf")
    run(["--model", "llama", "--reversed", "--input_path", ck, "--output_path", back, "--config", str(yml)])
    c = json.load(open(os.path.join(back, "config.json")))
    assert c["num_hidden_layers"] == 3 and c["num_key_value_heads"] == 2 and c["intermediate_size"] == 72
    assert torch.equal(_logits(back, IDS), ref_logits)


def test_old_mindformers_flag_aliases_and_directory_input(models, tmp_path):
    src, _ = models[("llama", True)]
    ck = str(tmp_path / "out" / "llama.ckpt")
    run(["--torch_ckpt_dir", src, "--mindspore_ckpt_path", ck])           # llama's convert_weight.py flags
    assert os.path.isfile(ck) and os.path.isfile(str(tmp_path / "out" / "llama.config.json"))
    back = str(tmp_path / "hf")
    run(["--reversed", "--mindspore_ckpt_path", str(tmp_path / "out"), "--torch_ckpt_path", back])
    assert set(_hf_tensors(back)) == set(_hf_tensors(src))
    with pytest.raises(ConfigError, match="qkv_concat"):
        run(["--input_path", src, "--output_path", ck, "--qkv_concat", "True"])


def test_reversed_skips_optimizer_state_of_training_checkpoints(models, tmp_path):
    src, _ = models[("qwen2", True)]
    ck = str(tmp_path / "m.ckpt")
    run(["--input_path", src, "--output_path", ck])
    tensors = load_tensors(ck)
    train = dict(tensors)
    for k in list(tensors)[:3]:
        train["adam_m." + k] = np.zeros_like(tensors[k])
    train["global_step"] = np.array([7], np.int32)
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in train.items()], str(tmp_path / "t.ckpt"))
    shutil.copy(sidecar_config_path(ck), sidecar_config_path(str(tmp_path / "t.ckpt")))
    back = str(tmp_path / "hf")
    r = run(["--reversed", "--input_path", str(tmp_path / "t.ckpt"), "--output_path", back])
    assert r.tensors == len(tensors)
    assert set(_hf_tensors(back)) == set(_hf_tensors(src))


# ------------------------------------------------------------------------------------------ errors
def _broken_copy(src, dst, edit):
    """Copy an HF dir as ONE model.safetensors with `edit(dict)` applied."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    t = _hf_tensors(src)
    edit(t)
    np_save_file(t, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return os.path.join(dst, "model.safetensors")


def test_error_missing_input_and_empty_dir(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=f"{missing}: no such file or directory"):
        run(["--model", "llama", "--input_path", missing, "--output_path", str(tmp_path / "o.ckpt")])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(STORIES, "config.json")).read())
    (empty / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match=f"{empty}: no \\*.safetensors or \\*.ckpt.*pytorch_model.bin"):
        run(["--model", "llama", "--input_path", str(empty), "--output_path", str(tmp_path / "o.ckpt")])
    with pytest.raises(CheckpointError, match=f"{missing}: no such file or directory"):
        run(["--reversed", "--input_path", missing, "--output_path", str(tmp_path / "hf")])
    assert not os.path.exists(tmp_path / "o.ckpt")


def test_error_unknown_model_and_family_mismatch(models, tmp_path):
    src, _ = models[("llama", False)]
    with pytest.raises(ConfigError, match="--model: 'gpt2' is not supported; expected one of llama, qwen2, qwen2_5"):
        run(["--model", "gpt2", "--input_path", src, "--output_path", str(tmp_path / "o.ckpt")])
    with pytest.raises(ConfigError, match=f"{src}/config.json: model_type 'llama' does not match --model"):
        run(["--model", "qwen2", "--input_path", src, "--output_path", str(tmp_path / "o.ckpt")])
    with pytest.raises(ConfigError, match="must end with .ckpt .* or .safetensors"):
        run(["--input_path", src, "--output_path", str(tmp_path / "o.bin")])


def test_error_renamed_tensor_names_file_and_tensor(models, tmp_path):
    src, _ = models[("llama", False)]
    bad = "model.layers.0.self_attn.q_proj.weightx"

    def edit(t):
        t[bad] = t.pop("model.layers.0.self_attn.q_proj.weight")
    f = _broken_copy(src, str(tmp_path / "bad"), edit)
    out = str(tmp_path / "o.ckpt")
    with pytest.raises(CheckpointError, match=f"{f}: tensor '{bad}' is not a Llama/Qwen2 weight name"):
        run(["--model", "llama", "--input_path", str(tmp_path / "bad"), "--output_path", out])
    assert not os.path.exists(out) and os.listdir(tmp_path) == ["bad"]   # nothing written, no temp left


def test_error_wrong_shape_names_file_tensor_and_shapes(models, tmp_path):
    src, _ = models[("llama", False)]

    def edit(t):
        t["model.layers.2.mlp.up_proj.weight"] = t["model.layers.2.mlp.up_proj.weight"][:70]
    f = _broken_copy(src, str(tmp_path / "bad"), edit)
    with pytest.raises(CheckpointError, match=f"{f}: tensor 'model.layers.2.mlp.up_proj.weight' has shape "
                                              "\\[70, 32\\] but .*config.json implies \\[72, 32\\]"):
        run(["--model", "llama", "--input_path", str(tmp_path / "bad"), "--output_path", str(tmp_path / "o.ckpt")])


def test_error_missing_and_extra_layer_tensors(models, tmp_path):
    src, _ = models[("qwen2", True)]
    _broken_copy(src, str(tmp_path / "a"), lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match="missing tensor\\(s\\) 'model.layers.1.self_attn.k_proj.bias'"):
        run(["--input_path", str(tmp_path / "a"), "--output_path", str(tmp_path / "o.safetensors")])

    def extra(t):
        t["model.layers.3.input_layernorm.weight"] = t["model.layers.0.input_layernorm.weight"]
    f = _broken_copy(src, str(tmp_path / "b"), extra)
    with pytest.raises(CheckpointError, match=f"{f}: tensor 'model.layers.3.input_layernorm.weight' is not a "
                                              "weight of the model .*num_layers=3"):
        run(["--input_path", str(tmp_path / "b"), "--output_path", str(tmp_path / "o.safetensors")])


def test_error_reversed_bad_mindformers_tensor(models, tmp_path):
    src, _ = models[("llama", False)]
    ck = str(tmp_path / "m.ckpt")
    run(["--input_path", src, "--output_path", ck])
    t = load_tensors(ck)
    t["model.layers.0.attention.wq.weight"] = t["model.layers.0.attention.wq.weight"].T.copy()
    t["model.layers.0.attention.wqx.weight"] = t.pop("model.layers.0.attention.wo.weight")
    bad = str(tmp_path / "bad.ckpt")
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in t.items()], bad)
    with pytest.raises(CheckpointError, match=f"{bad}: tensor 'model.layers.0.attention.wqx.weight' is not a "
                                              "MindFormers Llama parameter name"):
        run(["--reversed", "--input_path", bad, "--output_path", str(tmp_path / "hf"), "--config", src])


def test_cli_prints_one_line_summary_and_errors_to_stderr(tmp_path):
    out = str(tmp_path / "s.safetensors")
    p = subprocess.run([sys.executable, SCRIPT, "--model", "llama", "--input_path", STORIES, "--output_path", out,
                        "--dtype", "bf16"], capture_output=True, text=True, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("convert_weight: 47 tensors, bfloat16 ") and lines[0].count(out) == 1
    nbytes = sum(v.nbytes for v in load_tensors(out).values())
    assert f" {nbytes} bytes " in lines[0]
    p = subprocess.run([sys.executable, SCRIPT, "--model", "llama", "--input_path", str(tmp_path / "missing"),
                        "--output_path", out], capture_output=True, text=True, cwd=str(tmp_path))
    assert p.returncode == 1 and p.stdout == ""
    assert f"convert_weight: error: {tmp_path / 'missing'}: no such file or directory" in p.stderr


def test_load_model_config_errors_name_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama", "hidden_size": 64,}')
    with pytest.raises(ConfigError, match=f"{bad}:1: not valid JSON"):
        load_model_config(str(bad))
    bad.write_text('{"model_type": "gpt2", "hidden_size": 64}')
    with pytest.raises(ConfigError, match=f"{bad}: model_type 'gpt2' is not supported"):
        load_model_config(str(bad))
    yml = tmp_path / "m.yaml"
    yml.write_text("model:\n  model_config:\n    hidden_sise: 4\n")
    with pytest.raises(ConfigError, match="m.yaml: model.model_config: unknown key 'hidden_sise'; did you mean "
                                          "'hidden_size'"):
        load_model_config(str(yml))
