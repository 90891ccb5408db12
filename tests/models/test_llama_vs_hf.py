"""Our LlamaForCausalLM against transformers (fp32, CPU): logits, KV cache, loss, packing, graph mode, loading."""
import os

import numpy as np
import pytest
import torch
import transformers

import mindspore as ms
from mindspore import Tensor

from mindformers_sft.errors import CheckpointError, ConfigError
from mindformers_sft.models import LlamaConfig, LlamaForCausalLM, build_model, load_state_dict, state_dict_numpy
from mindformers_sft.pretrained import from_hf_dir

STORIES = os.path.join(os.path.dirname(__file__), "..", "..", "assets", "models", "stories260K")
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def _randomize(hf_model, seed):
    """Weights larger than HF's init (std 0.02) so that the comparison is not trivially small; biases non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)
    return hf_model.eval()


def _tiny_llama3(path):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                   rope_scaling=dict(LLAMA3_ROPE), max_position_embeddings=1024,
                                   tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    hf = _randomize(transformers.LlamaForCausalLM(cfg), 1)
    hf.save_pretrained(path, safe_serialization=True, max_shard_size="60KB")
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1  # from_hf_dir reads shards
    return hf


def _tiny_qwen2(path):
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0,
                                   max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                   use_sliding_window=False)
    hf = _randomize(transformers.Qwen2ForCausalLM(cfg), 2)
    assert float(hf.model.layers[0].self_attn.q_proj.bias.detach().abs().min()) > 0
    hf.save_pretrained(path, safe_serialization=True)
    return hf


@pytest.fixture(scope="module", params=["stories260K", "llama3_tiny", "qwen2_tiny"])
def pair(request, tmp_path_factory):
    """(name, transformers model, our model loaded by from_hf_dir from the same directory)."""
    name = request.param
    if name == "stories260K":
        path = STORIES
        hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    else:
        path = str(tmp_path_factory.mktemp(name))
        hf = _tiny_llama3(path) if name == "llama3_tiny" else _tiny_qwen2(path)
    return name, hf, from_hf_dir(path), path


def _ids(vocab, shape, seed=0):
    return np.random.RandomState(seed).randint(3, vocab, shape).astype(np.int32)


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def test_logits_match_hf(pair):
    name, hf, ours, _ = pair
    ids = _ids(ours.config.vocab_size, (2, 48))
    ref = _hf_logits(hf, ids)
    got = ours.logits(Tensor(ids)).asnumpy()
    assert got.shape == ref.shape and got.dtype == np.float32
    diff = np.abs(got - ref).max()
    print(f"{name}: logits max|diff| = {diff:.3g} (max|logit| {np.abs(ref).max():.3g})")
    assert diff < 1e-4


def test_llama3_rope_scaling_matters(pair):
    """Without the llama3 inv_freq adjustment the tiny Llama-3 logits would not match: the check has teeth."""
    name, hf, ours, path = pair
    if name != "llama3_tiny":
        assert ours.config.rope_scaling is None
        return
    assert ours.config.rope_scaling["rope_type"] == "llama3"
    ids = _ids(ours.config.vocab_size, (1, 48))
    unscaled = from_hf_dir(path, rope_scaling=None).logits(Tensor(ids)).asnumpy()
    assert np.abs(unscaled - _hf_logits(hf, ids)).max() > 1e-3


def test_kv_cache_matches_full_forward(pair):
    name, _, ours, _ = pair
    ids = _ids(ours.config.vocab_size, (2, 40), seed=1)
    full = ours.logits(Tensor(ids)).asnumpy()
    last, cache = ours.prefill(ids[:, :25])
    diffs = [np.abs(last.asnumpy() - full[:, 24]).max()]
    for t in range(25, 40):
        step, cache = ours.decode_step(ids[:, t], cache)
        diffs.append(np.abs(step.asnumpy() - full[:, t]).max())
    assert cache.length == 40
    print(f"{name}: cache vs full max|diff| = {max(diffs):.3g}")
    assert max(diffs) < 1e-4


def test_loss_matches_hf(pair):
    name, hf, ours, _ = pair
    ids = _ids(ours.config.vocab_size, (2, 33), seed=2)
    labels = ids.copy()
    labels[0, :10] = -100   # prompt
    labels[1, 20:] = -100   # padding
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long)).loss.item()
    got = float(ours(Tensor(ids), Tensor(labels)).asnumpy())
    s, c = ours.loss_sum_and_count(Tensor(ids), Tensor(labels))
    print(f"{name}: loss {got:.6f} vs HF {ref:.6f}")
    assert abs(got - ref) < 1e-5
    assert float(c.asnumpy()) == (labels[:, 1:] != -100).sum()
    assert abs(float(s.asnumpy()) / float(c.asnumpy()) - got) < 1e-6
    # labels=None supervises every next token, as HF with labels=input_ids
    with torch.no_grad():
        ref_all = hf(torch.tensor(ids, dtype=torch.long), labels=torch.tensor(ids, dtype=torch.long)).loss.item()
    assert abs(float(ours(Tensor(ids)).asnumpy()) - ref_all) < 1e-5


def test_packing_is_block_diagonal(pair):
    """Two samples packed in one row (plus padding) give the same per-token logits and loss as run alone."""
    name, _, ours, _ = pair
    v = ours.config.vocab_size
    a, b = _ids(v, (1, 13), seed=3)[0], _ids(v, (1, 19), seed=4)[0]
    s = 40
    tokens = np.zeros((1, s), np.int32)
    tokens[0, :13], tokens[0, 13:32] = a, b
    seg = np.zeros((1, s), np.int32)
    seg[0, :13], seg[0, 13:32] = 1, 2
    pos = np.zeros((1, s), np.int32)
    pos[0, :13], pos[0, 13:32], pos[0, 32:] = np.arange(13), np.arange(19), np.arange(8)
    packed = ours.logits(Tensor(tokens), Tensor(pos), Tensor(seg)).asnumpy()
    alone_a = ours.logits(Tensor(a[None])).asnumpy()
    alone_b = ours.logits(Tensor(b[None])).asnumpy()
    diff = max(np.abs(packed[:, :13] - alone_a).max(), np.abs(packed[:, 13:32] - alone_b).max())
    scale = max(1.0, np.abs(alone_a).max(), np.abs(alone_b).max())
    print(f"{name}: packed vs alone max|diff| = {diff:.3g} (max|logit| {scale:.3g})")
    # fp32 round-off only (other matmul/softmax lengths): 1e-5 relative to the logit scale
    assert diff < 1e-5 * scale
    # without segment ids sample b would see sample a: the mask is what makes them independent
    leaky = ours.logits(Tensor(tokens), Tensor(pos)).asnumpy()
    assert np.abs(leaky[:, 13:32] - alone_b).max() > 1e-3
    # training construct: input_ids/labels are S+1 long, position/segment ids describe the S model tokens
    input_ids = np.concatenate([tokens, np.zeros((1, 1), np.int32)], 1)
    labels = np.full((1, s + 1), -100, np.int32)
    labels[0, 1:13], labels[0, 14:32] = a[1:], b[1:]
    ls, lc = ours.loss_sum_and_count(Tensor(input_ids), Tensor(labels), Tensor(pos), Tensor(seg))
    sa, ca = ours.loss_sum_and_count(Tensor(a[None]))
    sb, cb = ours.loss_sum_and_count(Tensor(b[None]))
    assert float(lc.asnumpy()) == float(ca.asnumpy()) + float(cb.asnumpy()) == 30
    assert abs(float(ls.asnumpy()) - float(sa.asnumpy()) - float(sb.asnumpy())) < 1e-4


def test_graph_mode_loss_equals_pynative():
    """GRAPH_MODE compile of the training construct on stories260K (~10-30 s): same loss as PyNative."""
    model = from_hf_dir(STORIES)
    ids = _ids(512, (2, 33), seed=5)
    labels = ids.copy()
    labels[:, :7] = -100
    eager = float(model(Tensor(ids), Tensor(labels)).asnumpy())
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph = float(model(Tensor(ids), Tensor(labels)).asnumpy())
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert abs(graph - eager) < 1e-5, (graph, eager)


def test_param_names_and_shapes_are_mindformers():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, n_kv_heads=2, intermediate_size=48,
                      qkv_has_bias=True, tie_word_embeddings=False)
    shapes = {k: v.shape for k, v in state_dict_numpy(build_model(cfg)).items()}
    assert shapes["model.tok_embeddings.embedding_weight"] == (64, 32)
    assert shapes["model.layers.1.attention.wq.weight"] == (32, 32)
    assert shapes["model.layers.1.attention.wk.weight"] == (16, 32)
    assert shapes["model.layers.1.attention.wv.bias"] == (16,)
    assert "model.layers.1.attention.wo.bias" not in shapes
    assert shapes["model.layers.0.feed_forward.w1.weight"] == (48, 32)
    assert shapes["model.layers.0.feed_forward.w2.weight"] == (32, 48)
    assert shapes["model.norm_out.weight"] == (32,) and shapes["lm_head.weight"] == (64, 32)
    assert len(shapes) == 1 + 2 * 12 + 2
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                        intermediate_size=48, tie_word_embeddings=True))
    assert "lm_head.weight" not in state_dict_numpy(tied)


def test_load_state_dict_errors_name_tensor_and_shapes():
    model = build_model(LlamaConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=48,
                                    tie_word_embeddings=True))
    sd = state_dict_numpy(model)
    sd2 = {k: v + 1 for k, v in sd.items()}
    sd2["lm_head.weight"] = sd2["model.tok_embeddings.embedding_weight"]  # tied: accepted and dropped
    assert load_state_dict(model, sd2, source="x.safetensors") == []
    assert np.array_equal(state_dict_numpy(model)["model.norm_out.weight"], sd["model.norm_out.weight"] + 1)
    bad = dict(sd, **{"model.layers.0.attention.wq.weight": np.zeros((32, 31), np.float32)})
    with pytest.raises(CheckpointError, match=r"x\.safetensors.*attention\.wq\.weight.*\(32, 32\).*\(32, 31\)"):
        load_state_dict(model, bad, source="x.safetensors")
    with pytest.raises(CheckpointError, match=r"x\.safetensors.*missing.*model\.norm_out\.weight"):
        load_state_dict(model, {k: v for k, v in sd.items() if k != "model.norm_out.weight"}, source="x.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.7\.ffn_norm\.weight"):
        load_state_dict(model, dict(sd, **{"model.layers.7.ffn_norm.weight": sd["model.norm_out.weight"]}))


def test_unsupported_rope_type_is_config_error():
    with pytest.raises(ConfigError, match="yarn"):
        build_model(LlamaConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=48,
                                rope_scaling={"rope_type": "yarn", "factor": 4.0}))
