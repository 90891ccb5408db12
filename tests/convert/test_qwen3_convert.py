"""convert_weight.py --model qwen3 / qwen3_moe: MindFormers 1.8 names and layouts (written out here by hand from
MindFormers' qwen3/utils.py weight_mapping, concat_qkv_interleaved, concat_linear_fc1_interleaved and
concat_expert_weight), bit-exact round trips that transformers loads to identical logits, and bad input."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file as np_save_file

import mindspore as ms

from mindformers_sft.checkpoint import HF_INDEX_NAME, load_tensors, verify
from mindformers_sft.convert import run, sidecar_config_path
from mindformers_sft.errors import CheckpointError, ConfigError
from tests.convert.test_convert_weight import _hf_tensors as hf_tensors

V, H, NH, NKV, D, FF, IM, E = 160, 32, 4, 2, 16, 48, 24, 8      # head_dim 16 != hidden/heads = 8; GQA
IDS = [[1, 5, 17, 33, 2, 99, 150, 7, 64, 3]]


def _hf_config(kind, tie):
    common = dict(vocab_size=V, hidden_size=H, intermediate_size=FF, num_attention_heads=NH, num_key_value_heads=NKV,
                  head_dim=D, max_position_embeddings=64, tie_word_embeddings=tie, rms_norm_eps=1e-6,
                  rope_theta=10000.0)
    if kind == "qwen3":
        return transformers.Qwen3Config(num_hidden_layers=3, **common)
    # layers 1, 3, 5 sparse by decoder_sparse_step 2; layer 3 dense by mlp_only_layers -> MoE layers 1, 5
    return transformers.Qwen3MoeConfig(num_hidden_layers=6, num_experts=E, num_experts_per_tok=2,
                                       moe_intermediate_size=IM, decoder_sparse_step=2, mlp_only_layers=[3],
                                       norm_topk_prob=True, **common)


MOE_LAYERS = (1, 5)


def make_hf(path, kind="qwen3", tie=False, seed=0, shard="60KB"):
    """A tiny random HF Qwen3 / Qwen3-MoE saved as several safetensors shards + index; (model, logits)."""
    torch.manual_seed(seed)
    cfg = _hf_config(kind, tie)
    model = (transformers.Qwen3ForCausalLM if kind == "qwen3" else transformers.Qwen3MoeForCausalLM)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.1 if "norm" not in name else 0.05) + (1.0 if "norm" in name else 0))
    model.eval()
    model.save_pretrained(path, max_shard_size=shard, safe_serialization=True)
    with torch.no_grad():
        logits = model(torch.tensor(IDS)).logits
    return model, logits


def hf_logits(d):
    m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    m.eval()
    with torch.no_grad():
        return m(torch.tensor(IDS)).logits


# ---------------------------------------------------------------- the MindFormers 1.8 side, written out by hand
def mf_expected(hf, kind, tie, layers):
    """MF name -> array, built from the HF tensors with plain loops (MindFormers' conventions, not our code)."""
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not tie:
        out["output_layer.weight"] = hf["lm_head.weight"]
    rep = NH // NKV
    for i in range(layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        q, k, v = (hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        rows = []
        for g in range(NKV):                       # [q heads of group g, k head g, v head g] for each kv group
            rows += [q[(g * rep + r) * D:(g * rep + r + 1) * D] for r in range(rep)]
            rows += [k[g * D:(g + 1) * D], v[g * D:(g + 1) * D]]
        out[m + "self_attention.linear_qkv.weight"] = np.concatenate(rows, 0)
        out[m + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[m + "self_attention.q_layernorm.weight"] = hf[p + "self_attn.q_norm.weight"]
        out[m + "self_attention.k_layernorm.weight"] = hf[p + "self_attn.k_norm.weight"]
        out[m + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
        if kind == "qwen3_moe" and i in MOE_LAYERS:
            out[m + "mlp.router.weight"] = hf[p + "mlp.gate.weight"]
            w1 = np.zeros((E * H, 2 * IM), np.float32)
            w2 = np.zeros((E * IM, H), np.float32)
            for e in range(E):
                x = p + f"mlp.experts.{e}."
                w1[e * H:(e + 1) * H, :IM] = hf[x + "gate_proj.weight"].T
                w1[e * H:(e + 1) * H, IM:] = hf[x + "up_proj.weight"].T
                w2[e * IM:(e + 1) * IM] = hf[x + "down_proj.weight"].T
            out[m + "mlp.experts.weight1"], out[m + "mlp.experts.weight2"] = w1, w2
        else:
            gate, up = hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]
            fc1 = np.zeros((2 * FF, H), np.float32)
            fc1[0::2], fc1[1::2] = gate, up         # interleaved rows [g0, u0, g1, u1, ...]
            out[m + "mlp.linear_fc1.weight"] = fc1
            out[m + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]
    return out


CASES = [("qwen3", False), ("qwen3", True), ("qwen3_moe", False)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind, tie in CASES:
        d = str(root / f"{kind}_{tie}")
        make_hf(d, kind, tie)
        out[(kind, tie)] = (d, hf_logits(d))
    return out


@pytest.mark.parametrize("kind,tie", CASES)
@pytest.mark.parametrize("ext", ["ckpt", "safetensors"])
def test_mindformers_names_layouts_and_round_trip(models, tmp_path, kind, tie, ext):
    src, ref_logits = models[(kind, tie)]
    assert os.path.isfile(os.path.join(src, HF_INDEX_NAME))
    orig = hf_tensors(src)
    mf = str(tmp_path / f"mf.{ext}")
    flags = ["--input_path", src, "--output_path", mf] + (["--model", kind] if ext == "ckpt" else [])  # or auto
    r = run(flags)
    verify(mf, deep=True)
    got = load_tensors(mf)
    want = mf_expected(orig, kind, tie, 3 if kind == "qwen3" else 6)
    assert sorted(got) == sorted(want) and r.tensors == len(want)
    for k, v in want.items():
        assert got[k].dtype == np.float32 and got[k].shape == v.shape and np.array_equal(got[k], v), k
    if ext == "ckpt":
        assert set(ms.load_checkpoint(mf)) == set(want)             # MindSpore reads the file itself
    back = str(tmp_path / "hf_back")
    r2 = run(["--reversed", "--input_path", mf, "--output_path", back, "--max_shard_size", "50KB"])
    assert r2.tensors == len(orig) - (1 if tie and "lm_head.weight" in orig else 0)
    assert os.path.isfile(os.path.join(back, HF_INDEX_NAME))
    res = hf_tensors(back)
    assert set(res) == set(orig)
    for k, v in orig.items():
        assert res[k].dtype == v.dtype and res[k].tobytes() == v.tobytes(), k
    c0, c1 = (json.load(open(os.path.join(d, "config.json"))) for d in (src, back))
    for key in ("model_type", "architectures", "head_dim", "num_key_value_heads", "tie_word_embeddings",
                "num_experts", "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers"):
        assert c1.get(key) == c0.get(key), key
    # bit-identical weights and config; transformers' MoE block on CPU varies by ~1e-7 between two loads of the
    # same directory (memory alignment picks the kernel path), so MoE logits are compared to 1e-6
    diff = (hf_logits(back) - ref_logits).abs().max().item()
    assert diff == 0 if kind == "qwen3" else diff <= 1e-6


def test_bf16_and_expected_shapes_from_config(models, tmp_path):
    src, _ = models[("qwen3_moe", False)]
    out = str(tmp_path / "m.safetensors")
    run(["--input_path", src, "--output_path", out, "--dtype", "bf16"])
    got = load_tensors(out)
    w1 = got["decoder.layers.5.mlp.experts.weight1"]
    assert w1.shape == (E * H, 2 * IM) and got["decoder.layers.3.mlp.linear_fc1.weight"].shape == (2 * FF, H)
    ref = torch.from_numpy(hf_tensors(src)["model.layers.5.mlp.experts.3.up_proj.weight"]).to(torch.bfloat16)
    assert np.array_equal(w1[3 * H:4 * H, IM:].T.view(np.uint16), ref.view(torch.int16).numpy().view(np.uint16))
    side = json.load(open(sidecar_config_path(out)))
    assert side.get("dtype", side.get("torch_dtype")) == "bfloat16"


# ------------------------------------------------------------------------------------------ errors
def _broken(src, dst, edit, cfg_edit=None):
    os.makedirs(dst)
    cfg = json.load(open(os.path.join(src, "config.json")))
    if cfg_edit:
        cfg_edit(cfg)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    t = hf_tensors(src)
    edit(t)
    np_save_file(t, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return os.path.join(dst, "model.safetensors")


def test_error_unknown_model_type(models, tmp_path):
    src, _ = models[("qwen3", False)]
    _broken(src, str(tmp_path / "a"), lambda t: None, lambda c: c.update(model_type="qwen4"))
    cj = tmp_path / "a" / "config.json"
    with pytest.raises(ConfigError, match=f"{cj}: model_type 'qwen4' is not supported; expected one of .*'qwen3'"):
        run(["--input_path", str(tmp_path / "a"), "--output_path", str(tmp_path / "o.ckpt")])
    with pytest.raises(ConfigError, match=f"{src}/config.json: model_type 'qwen3' does not match --model"):
        run(["--model", "qwen3_moe", "--input_path", src, "--output_path", str(tmp_path / "o.ckpt")])
    assert not os.path.exists(tmp_path / "o.ckpt")


def test_error_missing_q_norm(models, tmp_path):
    src, _ = models[("qwen3", False)]
    _broken(src, str(tmp_path / "a"), lambda t: t.pop("model.layers.1.self_attn.q_norm.weight"))
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'a'}: missing tensor\\(s\\) "
                                              "'model.layers.1.self_attn.q_norm.weight' that .*config.json requires"):
        run(["--input_path", str(tmp_path / "a"), "--output_path", str(tmp_path / "o.ckpt")])
    # and on the MindFormers side
    mf = str(tmp_path / "m.ckpt")
    run(["--input_path", src, "--output_path", mf])
    t = load_tensors(mf)
    t.pop("decoder.layers.2.self_attention.k_layernorm.weight")
    bad = str(tmp_path / "bad.ckpt")
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in t.items()], bad)
    with pytest.raises(CheckpointError, match=f"{bad}: missing tensor\\(s\\) "
                                              "'decoder.layers.2.self_attention.k_layernorm.weight'"):
        run(["--reversed", "--input_path", bad, "--output_path", str(tmp_path / "hf"), "--config", src])
    assert not os.path.exists(tmp_path / "o.ckpt") and not os.path.exists(tmp_path / "hf" / "config.json")


def test_error_moe_experts_disagree_with_config(models, tmp_path):
    src, _ = models[("qwen3_moe", False)]

    def extra(t):
        t["model.layers.1.mlp.experts.8.gate_proj.weight"] = t["model.layers.1.mlp.experts.0.gate_proj.weight"]
    f = _broken(src, str(tmp_path / "a"), extra)
    with pytest.raises(CheckpointError, match=f"{f}: tensor 'model.layers.1.mlp.experts.8.gate_proj.weight' is not "
                                              "a weight of the model .*num_experts=8 \\(experts 0..7\\)"):
        run(["--input_path", str(tmp_path / "a"), "--output_path", str(tmp_path / "o.ckpt")])
    # the config says 16 experts, the checkpoint has 8
    _broken(src, str(tmp_path / "b"), lambda t: None, lambda c: c.update(num_experts=16))
    with pytest.raises(CheckpointError, match="model.safetensors: tensor 'model.layers.1.mlp.gate.weight' has shape "
                                              "\\[8, 32\\] but .*config.json implies \\[16, 32\\] .*num_experts=16"):
        run(["--input_path", str(tmp_path / "b"), "--output_path", str(tmp_path / "o.ckpt")])
    # an expert missing from the checkpoint
    _broken(src, str(tmp_path / "b2"), lambda t: [t.pop(f"model.layers.5.mlp.experts.7.{p}_proj.weight")
                                                  for p in ("gate", "up", "down")])
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'b2'}: missing tensor\\(s\\) "
                                              "'model.layers.5.mlp.experts.7.gate_proj.weight', "
                                              "'model.layers.5.mlp.experts.7.up_proj.weight', "
                                              "'model.layers.5.mlp.experts.7.down_proj.weight' that "
                                              ".*config.json requires .*num_experts=8"):
        run(["--input_path", str(tmp_path / "b2"), "--output_path", str(tmp_path / "o.ckpt")])

    def small(t):
        t["model.layers.5.mlp.experts.2.down_proj.weight"] = t["model.layers.5.mlp.experts.2.down_proj.weight"][:, :20]
    f = _broken(src, str(tmp_path / "c"), small)
    with pytest.raises(CheckpointError, match=f"{f}: tensor 'model.layers.5.mlp.experts.2.down_proj.weight' has "
                                              "shape \\[32, 20\\] but .*config.json implies \\[32, 24\\] "
                                              ".*moe_intermediate_size=24"):
        run(["--input_path", str(tmp_path / "c"), "--output_path", str(tmp_path / "o.ckpt")])
    # experts in a layer the config makes dense (mlp_only_layers)
    _broken(src, str(tmp_path / "d"), lambda t: None, lambda c: c.update(mlp_only_layers=[1, 3]))
    with pytest.raises(CheckpointError, match="tensor 'model.layers.1.mlp.experts.0.down_proj.weight' is not a weight "
                                              "of the model .*MoE layers \\[5\\]"):
        run(["--input_path", str(tmp_path / "d"), "--output_path", str(tmp_path / "o.ckpt")])
    # stacked experts of the wrong size on the MindFormers side
    mf = str(tmp_path / "m.safetensors")
    run(["--input_path", src, "--output_path", mf])
    t = load_tensors(mf)
    t["decoder.layers.1.mlp.experts.weight1"] = t["decoder.layers.1.mlp.experts.weight1"][: 6 * H]
    bad = str(tmp_path / "bad.safetensors")
    np_save_file(t, bad)
    shutil.copy(sidecar_config_path(mf), sidecar_config_path(bad))
    with pytest.raises(CheckpointError, match=f"{bad}: tensor 'decoder.layers.1.mlp.experts.weight1' has shape "
                                              "\\[192, 48\\] but .* implies \\[256, 48\\]"):
        run(["--reversed", "--input_path", bad, "--output_path", str(tmp_path / "hf")])
    assert not os.path.exists(tmp_path / "o.ckpt")


@pytest.mark.parametrize("kind,tie", CASES)
def test_our_model_from_the_mindformers_checkpoint_gives_transformers_logits(models, tmp_path, kind, tie):
    from mindspore import Tensor

    from mindformers_sft.models import build_model, load_state_dict
    from mindformers_sft.models.config import LlamaConfig
    src, ref = models[(kind, tie)]
    ck = str(tmp_path / "m.ckpt")
    run(["--input_path", src, "--output_path", ck])
    model = build_model(LlamaConfig.from_hf_config(sidecar_config_path(ck)))
    load_state_dict(model, load_tensors(ck), strict=True, source=ck)    # every parameter, nothing left over
    ours = model.logits(Tensor(np.array(IDS, np.int32))).asnumpy()
    assert np.abs(ours - ref.numpy()).max() < 1e-4


def test_qkv_concat_false_and_mindformers_arch_flags(models, tmp_path):
    """--qkv_concat false writes linear_q/k/v and mlp.gating/hidden (the model's qkv_concat False layout), which
    --reversed recognises by name; MindFormers' reverse flags (--num_layers, --kv_channels, ...) must agree."""
    src, ref = models[("qwen3", False)]
    orig = hf_tensors(src)
    mf = str(tmp_path / "split.ckpt")
    run(["--model", "qwen3", "--qkv_concat", "false", "--input_path", src, "--output_path", mf])
    got = load_tensors(mf)
    assert np.array_equal(got["decoder.layers.0.self_attention.linear_k.weight"],
                          orig["model.layers.0.self_attn.k_proj.weight"])
    assert np.array_equal(got["decoder.layers.2.mlp.hidden.weight"], orig["model.layers.2.mlp.up_proj.weight"])
    assert not any("linear_qkv" in k or "linear_fc1" in k for k in got)
    back = str(tmp_path / "hf")
    run(["--model", "qwen3", "--reversed", "--input_path", mf, "--output_path", back, "--num_layers", "3",
         "--num_attention_heads", "4", "--num_query_groups", "2", "--kv_channels", "16", "--max_worker", "16"])
    assert all(hf_tensors(back)[k].tobytes() == v.tobytes() for k, v in orig.items())
    with pytest.raises(ConfigError, match="--kv_channels 128 disagrees with .*split.config.json \\(head_dim = 16\\)"):
        run(["--reversed", "--input_path", mf, "--output_path", str(tmp_path / "x"), "--kv_channels", "128"])


def test_reversed_skips_mindformers_training_state(models, tmp_path):
    """A MindFormers 1.8 Qwen3-MoE training checkpoint also holds optimizer moments and router/expert load
    counters: --reversed skips them, and refuses a router expert_bias (Qwen3-MoE has none) by name."""
    src, _ = models[("qwen3_moe", False)]
    mf = str(tmp_path / "m.safetensors")
    run(["--input_path", src, "--output_path", mf])
    t = load_tensors(mf)
    t["adam_m.decoder.layers.1.mlp.experts.weight1"] = np.zeros_like(t["decoder.layers.1.mlp.experts.weight1"])
    t["decoder.layers.1.mlp.router.fi_accu"] = np.ones(E, np.float32)
    t["decoder.layers.5.mlp.router.expert_load"] = np.ones(E, np.float32)
    t["decoder.layers.0.self_attention.core_attention.max_logits_val"] = np.ones(NH, np.float32)
    train = str(tmp_path / "train.safetensors")
    np_save_file(t, train)
    shutil.copy(sidecar_config_path(mf), sidecar_config_path(train))
    back = str(tmp_path / "hf")
    run(["--reversed", "--input_path", train, "--output_path", back])
    assert set(hf_tensors(back)) == set(hf_tensors(src))
    t["decoder.layers.1.mlp.router.expert_bias"] = np.zeros(E, np.float32)
    np_save_file(t, train)
    with pytest.raises(CheckpointError, match=f"{train}: tensor 'decoder.layers.1.mlp.router.expert_bias' is not a "
                                              "MindFormers Qwen3 parameter name"):
        run(["--reversed", "--input_path", train, "--output_path", str(tmp_path / "hf2")])
