"""Our Qwen3MoeForCausalLM against transformers 4.57's Qwen3MoeForCausalLM (fp32, CPU): logits, aux loss and the
total loss, packing masks in the aux loss, KV-cache greedy generation, and checkpoints whose experts disagree with
config.json."""
import numpy as np
import pytest
import torch
import transformers
from mindspore import Tensor

from mindformers_sft.errors import CheckpointError
from mindformers_sft.generation import generate
from mindformers_sft.models import state_dict_numpy
from mindformers_sft.models.moe import load_balancing_loss
from mindformers_sft.models.qwen3_moe import Qwen3MoeForCausalLM
from mindformers_sft.pretrained import from_hf_dir

from tests.models.test_qwen3_vs_hf import edit_config, randomize

SHAPES = {
    # top-2 of 8, sparse every 2nd layer (1 and 3), untied, head_dim != hidden/heads
    "step2": dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=False,
                  tie_word_embeddings=False),
    # sparse layers 0 and 2 with a dense mlp_only layer 1 between them; normalized top-k, tied
    "mlp_only": dict(num_hidden_layers=3, decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True,
                     tie_word_embeddings=True),
}


def tiny_qwen3_moe(path, shape, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
                                      moe_intermediate_size=32, router_aux_loss_coef=0.05, output_router_logits=True,
                                      max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
                                      bos_token_id=1, eos_token_id=2, **SHAPES[shape])
    hf = randomize(transformers.Qwen3MoeForCausalLM(cfg), seed)
    hf.save_pretrained(path, safe_serialization=True, max_shard_size="100KB")
    return hf


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    return path, tiny_qwen3_moe(path, request.param)


def _batch(b=2, s=12, seed=0):
    ids = np.random.default_rng(seed).integers(3, 96, (b, s + 1)).astype(np.int32)
    labels = ids.copy()
    labels[:, :4] = -100
    return ids, labels


def hf_loss(hf, ids, labels, attention_mask=None):
    """transformers' loss on the S model tokens ids[:, :-1] predicting labels[:, 1:] (our (B, S+1) convention):
    the router logits (and so the aux loss) cover exactly the tokens our model reads."""
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids[:, :-1], dtype=torch.long),
                 labels=torch.tensor(labels[:, 1:], dtype=torch.long),
                 shift_labels=torch.tensor(labels[:, 1:], dtype=torch.long),
                 attention_mask=None if attention_mask is None else torch.tensor(attention_mask))
    return out


@pytest.mark.parametrize("kernels", ["fused", "basic"])
def test_logits_aux_and_total_loss_match_hf(pair, kernels, monkeypatch):
    path, hf = pair
    if kernels == "basic":
        monkeypatch.setenv("MFSFT_CPU_KERNELS", "0")
    ours = from_hf_dir(path)
    assert isinstance(ours, Qwen3MoeForCausalLM) and ours.with_aux
    sparse = [i for i in range(ours.config.num_layers) if ours.config.is_moe_layer(i)]
    assert sparse == ([1, 3] if ours.config.decoder_sparse_step == 2 else [0, 2])
    ids, labels = _batch()
    out = hf_loss(hf, ids, labels)
    np.testing.assert_allclose(ours.logits(Tensor(ids[:, :-1])).asnumpy(), out.logits.numpy(), atol=1e-4, rtol=0)
    aux = float(load_balancing_loss(ours.router_logits(Tensor(ids[:, :-1])), 8, 2).asnumpy())
    assert abs(aux - out.aux_loss.item()) < 1e-5
    total = float(ours(Tensor(ids), Tensor(labels)).asnumpy())
    assert abs(total - out.loss.item()) < 1e-5
    ce_only = float(from_hf_dir(path, output_router_logits=False)(Tensor(ids), Tensor(labels)).asnumpy())
    assert abs((total - ce_only) - 0.05 * out.aux_loss.item()) < 1e-6 and total - ce_only > 1e-3


def test_aux_loss_ignores_padding_as_transformers_attention_mask(pair):
    """segment_ids 0 (padding) leave the aux loss as transformers' attention_mask 0 does."""
    path, hf = pair
    ours = from_hf_dir(path)
    ids, labels = _batch(seed=4)
    seg = np.ones((2, 12), np.int32)
    seg[1, 8:] = 0
    labels[1, 9:] = -100
    out = hf_loss(hf, ids, labels, attention_mask=seg.astype(np.int64))
    ref_aux = out.aux_loss.item()
    s, n = ours.loss_sum_and_count(Tensor(ids), Tensor(labels), None, Tensor(seg))
    ce_s, n2 = from_hf_dir(path, output_router_logits=False).loss_sum_and_count(Tensor(ids), Tensor(labels), None,
                                                                               Tensor(seg))
    aux = (float(s.asnumpy()) - float(ce_s.asnumpy())) / float(n.asnumpy()) / 0.05
    assert abs(aux - ref_aux) < 1e-5
    # padding that attends nothing real: the unpadded tokens' logits equal transformers' with the mask
    np.testing.assert_allclose(ours.logits(Tensor(ids[:1, :-1])).asnumpy(), out.logits.numpy()[:1], atol=1e-4)


def test_names_and_kv_cache_generate(pair):
    path, hf = pair
    ours = from_hf_dir(path)
    names = set(state_dict_numpy(ours))
    c = ours.config
    for i in range(c.num_layers):
        sparse = c.is_moe_layer(i)
        assert (f"decoder.layers.{i}.mlp.router.weight" in names) == sparse
        assert (f"decoder.layers.{i}.mlp.experts.weight1" in names) == sparse
        assert (f"decoder.layers.{i}.mlp.linear_fc1.weight" in names) == (not sparse)
    w1 = state_dict_numpy(ours)[f"decoder.layers.{[i for i in range(c.num_layers) if c.is_moe_layer(i)][0]}"
                                ".mlp.experts.weight1"]
    assert w1.shape == (8 * 64, 2 * 32)
    prompt = [5, 17, 33, 8, 61, 9]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, pad_token_id=0,
                          eos_token_id=None, output_router_logits=False)[0].tolist()
    assert generate(ours, [prompt], max_new_tokens=10, eos_token_id=[])[0] == ref


def test_experts_disagreeing_with_config_are_named(tmp_path):
    path = str(tmp_path / "m")
    tiny_qwen3_moe(path, "step2")
    edit_config(path, num_experts=6)
    with pytest.raises(CheckpointError, match=r"safetensors: tensor 'model\.layers\.1\.mlp\.gate\.weight': expected "
                                              r"shape \(6, 64\) from config\.json, found \(8, 64\)"):
        from_hf_dir(path)
    edit_config(path, num_experts=8, moe_intermediate_size=16)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight': "
                                              r"expected shape \(16, 64\)"):
        from_hf_dir(path)
    edit_config(path, moe_intermediate_size=32, decoder_sparse_step=1)   # layers 0 and 2 have no experts
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.0\.mlp\.gate\.weight'"):
        from_hf_dir(path)
    edit_config(path, decoder_sparse_step=4)                              # layer 1 should be dense
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.(gate_proj|down_proj|up_proj)\.weight"):
        from_hf_dir(path)


def test_to_hf_config_round_trips_through_transformers(pair):
    from mindformers_sft.models import LlamaConfig
    path, hf = pair
    ours = LlamaConfig.from_hf_config(path)
    d = ours.to_hf_config()
    assert d["architectures"] == ["Qwen3MoeForCausalLM"] and d["model_type"] == "qwen3_moe"
    back = transformers.Qwen3MoeConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers",
              "norm_topk_prob", "router_aux_loss_coef", "output_router_logits", "tie_word_embeddings", "rope_theta",
              "intermediate_size", "rms_norm_eps"):
        assert getattr(back, k) == getattr(hf.config, k), k
    assert LlamaConfig.from_hf_config(d) == ours
