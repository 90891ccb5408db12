"""Our Qwen3ForCausalLM against transformers 4.57's Qwen3ForCausalLM (fp32, CPU): logits, loss, KV-cache greedy
generation, both CPU paths (fused kernels, basic ops), both weight layouts (qkv_concat True/False), and the
errors of bad checkpoints."""
import json
import os

import numpy as np
import pytest
import torch
import transformers
from mindspore import Tensor

from mindformers_sft.convert import names_qwen3
from mindformers_sft.errors import CheckpointError, ConfigError
from mindformers_sft.generation import generate
from mindformers_sft.models import state_dict_numpy
from mindformers_sft.models.qwen3 import Qwen3ForCausalLM
from mindformers_sft.pretrained import from_hf_dir
from tests.models.test_llama_vs_hf import _randomize

SHAPES = {
    # head_dim != hidden/heads, GQA 4:2, untied
    "gqa_untied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       tie_word_embeddings=False, rope_theta=1000000.0),
    # head_dim != hidden/heads, GQA 4:1, tied (as Qwen3-0.6B)
    "mqa_tied": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                     tie_word_embeddings=True, rope_theta=10000.0),
}


def randomize(model, seed):
    """Weights larger than HF's init so the comparison is not trivially small; norms around 1."""
    return _randomize(model, seed)


def tiny_qwen3(path, shape, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(vocab_size=96, intermediate_size=80, num_hidden_layers=2,
                                   max_position_embeddings=256, rms_norm_eps=1e-6, attention_bias=False,
                                   bos_token_id=1, eos_token_id=2, **SHAPES[shape])
    hf = randomize(transformers.Qwen3ForCausalLM(cfg), seed)
    hf.save_pretrained(path, safe_serialization=True, max_shard_size="40KB")
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1     # shards are read
    return hf


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    return path, tiny_qwen3(path, request.param)


def _ids(b=2, s=12, seed=0):
    return np.random.default_rng(seed).integers(3, 96, (b, s)).astype(np.int32)


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("kernels", ["fused", "basic"])
def test_logits_and_loss_match_hf(pair, kernels, monkeypatch):
    path, hf = pair
    if kernels == "basic":
        monkeypatch.setenv("MFSFT_CPU_KERNELS", "0")
    ours = from_hf_dir(path)
    assert isinstance(ours, Qwen3ForCausalLM) and ours.cpu_kernel == (kernels == "fused")
    layer = ours.decoder.layers[0]      # the fused path reads MF's interleaved rows in [q; k; v] / [gate; up] order
    assert (layer.self_attention.linear_qkv.out_perm is not None) == (kernels == "fused")
    assert (layer.mlp.linear_fc1.out_perm is not None) == (kernels == "fused")
    ids = _ids()
    np.testing.assert_allclose(ours.logits(Tensor(ids)).asnumpy(), _hf_logits(hf, ids), atol=1e-4, rtol=0)
    full = _ids(s=13, seed=1)
    labels = full.copy()
    labels[:, :5] = -100
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(full, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long)).loss
    assert abs(float(ours(Tensor(full), Tensor(labels)).asnumpy()) - ref.item()) < 1e-5


def test_parameter_names_and_layouts(pair):
    """The checkpoint names are MindFormers 1.8's; linear_qkv / linear_fc1 hold the HF matrices in MF's layouts."""
    path, hf = pair
    ours = from_hf_dir(path)
    state = state_dict_numpy(ours)
    ref = {k: v.numpy() for k, v in hf.state_dict().items()}
    c = ours.config
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in state
    assert ("output_layer.weight" in state) == (not c.tie_word_embeddings)
    qkv = state["decoder.layers.0.self_attention.linear_qkv.weight"]
    rep, d = c.num_heads // c.n_kv_heads, c.head_dim
    # group 0 of the interleaved layout: rep q heads, then k head 0, then v head 0
    np.testing.assert_array_equal(qkv[:rep * d], ref["model.layers.0.self_attn.q_proj.weight"][:rep * d])
    np.testing.assert_array_equal(qkv[rep * d:(rep + 1) * d], ref["model.layers.0.self_attn.k_proj.weight"][:d])
    fc1 = state["decoder.layers.0.mlp.linear_fc1.weight"]
    np.testing.assert_array_equal(fc1[0::2], ref["model.layers.0.mlp.gate_proj.weight"])
    np.testing.assert_array_equal(fc1[1::2], ref["model.layers.0.mlp.up_proj.weight"])
    back = names_qwen3.mf_state_to_hf(state, c)
    assert set(back) == set(ref) - ({"lm_head.weight"} if c.tie_word_embeddings else set())
    for k, v in back.items():
        np.testing.assert_array_equal(v, ref[k], err_msg=k)


@pytest.mark.parametrize("layout", [dict(qkv_concat=False),
                                    dict(use_contiguous_weight_layout_attention=True,
                                         use_interleaved_weight_layout_mlp=False)])
def test_other_layouts_same_logits(pair, layout):
    path, hf = pair
    ours = from_hf_dir(path, **layout)
    names = set(state_dict_numpy(ours))
    assert ("decoder.layers.0.self_attention.linear_q.weight" in names) == (layout.get("qkv_concat") is False)
    assert ("decoder.layers.0.mlp.gating.weight" in names) == (layout.get("qkv_concat") is False)
    ids = _ids(seed=3)
    np.testing.assert_allclose(ours.logits(Tensor(ids)).asnumpy(), _hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_kv_cache_greedy_equals_transformers_generate(pair):
    path, hf = pair
    ours = from_hf_dir(path)
    prompt = [5, 17, 33, 8, 61]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, pad_token_id=0,
                          eos_token_id=None)[0].tolist()
    assert generate(ours, [prompt], max_new_tokens=12, eos_token_id=[])[0] == ref


def edit_config(path, **changes):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_bad_checkpoints_are_named(tmp_path):
    path = str(tmp_path / "m")
    tiny_qwen3(path, "gqa_untied")
    edit_config(path, model_type="qwen4")
    with pytest.raises(ConfigError, match=r"config\.json: model_type 'qwen4' is not supported"):
        from_hf_dir(path)
    edit_config(path, model_type="qwen3")
    # drop k_norm of layer 1 from its shard (and from the index)
    from safetensors.numpy import load_file, save_file
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    name = "model.layers.1.self_attn.k_norm.weight"
    shard = os.path.join(path, index["weight_map"].pop(name))
    tensors = load_file(shard)
    tensors.pop(name)
    save_file(tensors, shard, metadata={"format": "pt"})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_norm\.weight' "
                                              r"\(expected shape \(32,\), the per-head RMSNorm"):
        from_hf_dir(path)
    # a head_dim the tensors do not have: the file and the tensor are named
    edit_config(path, head_dim=16)
    with pytest.raises(CheckpointError, match=r"safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight': "
                                              r"expected shape \(64, 64\)"):
        from_hf_dir(path)


def test_single_hf_named_safetensors_file_loads_through_the_family_map(pair, tmp_path):
    """--load_checkpoint FILE.safetensors with HF names (not a directory) converts with the Qwen3 map."""
    from safetensors.numpy import load_file, save_file
    from mindformers_sft.checkpoint.loading import read_weights
    from mindformers_sft.models import LlamaConfig, build_model, load_state_dict
    path, hf = pair
    tensors = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, f)))
    single = str(tmp_path / "qwen3.safetensors")
    save_file(tensors, single)
    config = LlamaConfig.from_hf_config(path)
    base, adapters, _ = read_weights(single, config=config)
    model = build_model(config)
    load_state_dict(model, base, strict=True, source=single)
    ids = _ids(seed=9)
    np.testing.assert_allclose(model.logits(Tensor(ids)).asnumpy(), _hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_unsupported_qwen3_options_are_refused():
    from mindformers_sft.models import LlamaConfig
    base = transformers.Qwen3Config(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=32).to_dict()
    assert LlamaConfig.from_hf_config(base).head_dim == 32
    for key in ("attention_bias", "use_sliding_window"):
        with pytest.raises(ConfigError, match=f"config.json: {key} True is not supported for qwen3"):
            LlamaConfig.from_hf_config({**base, key: True})


def test_out_perm_orders_rows_as_the_converter_splits_them():
    """qkv_order / the fc1 permutation put MF's interleaved rows (as convert/names_qwen3 builds them) in
    [q; k; v] / [gate; up] order; a LoRA B of the permuted Linear follows its rows."""
    from mindformers_sft.models.llama import Linear
    from mindformers_sft.models.qwen3 import qkv_order
    from mindformers_sft.pet.lora import LoraLinear
    rs = np.random.RandomState(0)
    nq, nkv, d, h = 4, 2, 3, 5
    q, k, v = rs.randn(nq * d, h), rs.randn(nkv * d, h), rs.randn(nkv * d, h)
    fused = names_qwen3.qkv_concat(q, k, v, nq, nkv, d)
    np.testing.assert_array_equal(fused[qkv_order(nq, nkv, d)], np.concatenate((q, k, v)))
    lin = Linear(h, fused.shape[0])
    lin.weight.set_data(Tensor(fused.astype(np.float32)))
    lin.set_out_perm(qkv_order(nq, nkv, d))
    lora = LoraLinear(lin, 2, 4.0, 0.0, "x")
    lora.lora_b.set_data(Tensor(rs.randn(fused.shape[0], 2).astype(np.float32)))
    x = rs.randn(3, h).astype(np.float32)
    merged = lora.merged_weight()         # stored (interleaved) row order
    got = lora(Tensor(x)).asnumpy()
    np.testing.assert_allclose(got, x @ merged[qkv_order(nq, nkv, d)].T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="permutation"):
        Linear(h, 4).set_out_perm([0, 1, 1, 3])
