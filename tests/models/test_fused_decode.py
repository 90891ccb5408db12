"""The fused CPU decode step (models/fused_decode.py + cpu_decode_kernels.cc) against transformers: the logits of
the fused prefill and of every decode step of a left-padded batch equal transformers' full forward at the same
positions (Llama, Llama-3 rope, Qwen2 with qkv bias, Qwen3 in all three weight layouts, tied and untied), also past
the first cache capacity (256 columns) and with LoRA adapters (reference: transformers with the merged weights);
the families it does not serve (MoE, bf16 weights) fall back to the compiled decode graph."""
import os

import numpy as np
import pytest
import torch
import transformers

from mindformers_sft.models import fused_decode
from mindformers_sft.models.kv_cache import HostKVCache
from mindformers_sft.pet.lora import apply_lora, lora_layers, merged_state
from mindformers_sft.convert.names import mf_to_hf
from mindspore import Tensor
from mindformers_sft.pretrained import from_hf_dir
from tests.models.test_llama_vs_hf import STORIES, _tiny_llama3, _tiny_qwen2
from tests.models.test_qwen3_vs_hf import tiny_qwen3

QWEN3_LAYOUTS = {"interleaved": {}, "separate": dict(qkv_concat=False),
                 "contiguous": dict(use_contiguous_weight_layout_attention=True,
                                    use_interleaved_weight_layout_mlp=False)}


def _hf_step_logits(hf, rows, n_new):
    """transformers' logits at each of the last n_new+1 positions of left-padded rows (full forward, no cache)."""
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
    return out[:, width - n_new - 1:]


def _ours_step_logits(model, rows, n_new, fused_prefill=True):
    """Prefill the rows without their last n_new tokens (left-padded, two extra padding columns), then feed those
    tokens one step at a time. fused_prefill: the prefill is the fused step too (last_only), else layer by layer."""
    prompts = [r[:len(r) - n_new] for r in rows]
    width = max(map(len, prompts)) + 2
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, True
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    logits, cache = model.forward_with_cache(ids, None, key_mask=mask, position_ids=pos, last_only=fused_prefill)
    assert isinstance(cache, HostKVCache) == fused_prefill
    mask = mask[:, width - cache.length:]       # the fused prefill drops the columns only padding uses
    out = [logits.asnumpy()[:, -1]]
    next_pos = pos[:, -1] + 1
    for j in range(n_new):
        mask = np.concatenate([mask, np.ones((len(rows), 1), bool)], 1)
        tok = np.array([[r[len(r) - n_new + j]] for r in rows], np.int32)
        logits, cache = model.forward_with_cache(tok, cache, key_mask=mask, position_ids=next_pos.reshape(-1, 1))
        assert isinstance(cache, HostKVCache)          # the fused step ran (not the graph fallback)
        out.append(logits.asnumpy()[:, -1])
        next_pos = next_pos + 1
    return np.stack(out, 1)


def _rows(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def _check(model, hf, vocab, lengths=(12, 17, 8), n_new=6, atol=1e-4, fused_prefill=True):
    rows = _rows(vocab, lengths)
    np.testing.assert_allclose(_ours_step_logits(model, rows, n_new, fused_prefill),
                               _hf_step_logits(hf, rows, n_new), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def stories():
    return (from_hf_dir(STORIES),
            transformers.LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval())


@pytest.mark.parametrize("fused_prefill", [True, False])
def test_llama_stories260k_steps_equal_transformers(stories, fused_prefill):
    _check(*stories, vocab=512, fused_prefill=fused_prefill)


def test_cache_growing_past_its_capacity(stories):
    # 250-token prompts + 12 steps cross the first capacity (256 columns): the host cache is regrown once
    _check(*stories, vocab=512, lengths=(262, 255), n_new=12)


_DROPPING = """
import numpy as np, mindspore as ms
ms.set_device("CPU"); ms.set_context(mode=ms.PYNATIVE_MODE)
from mindformers_sft.pretrained import from_hf_dir
model = from_hf_dir({path!r})
for s in (16, 140):
    for b in (1, 8):
        ids, mask = np.full((b, s), 5, np.int32), np.ones((b, s), bool)
        pos = np.tile(np.arange(s, dtype=np.int32), (b, 1))
        for _ in range(10):
            model.forward_with_cache(ids, None, key_mask=mask, position_ids=pos, last_only=True)
print("done")
"""


def test_results_dropped_at_once_leave_memory_intact():
    # the step writes the host cache through a raw pointer: a caller that drops the returned cache at once must not
    # free memory the kernel still writes (while the kernel ran as an asynchronous MindSpore op, this script died of
    # heap corruption: "corrupted double-linked list")
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _DROPPING.format(path=STORIES)], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "done" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("family", ["llama3_tiny", "qwen2_tiny"])
def test_llama3_rope_and_qwen2_bias(family, tmp_path):
    hf = (_tiny_llama3 if family == "llama3_tiny" else _tiny_qwen2)(str(tmp_path))
    _check(from_hf_dir(str(tmp_path)), hf, vocab=128)


@pytest.mark.parametrize("layout", sorted(QWEN3_LAYOUTS))
@pytest.mark.parametrize("shape", ["gqa_untied", "mqa_tied"])
def test_qwen3_layouts(shape, layout, tmp_path):
    hf = tiny_qwen3(str(tmp_path), shape)
    _check(from_hf_dir(str(tmp_path), **QWEN3_LAYOUTS[layout]), hf, vocab=96)


def test_lora_adapters_equal_transformers_with_merged_weights():
    ours = from_hf_dir(STORIES)
    hf = transformers.LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    apply_lora(ours, {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8,
                      "target_modules": ".*wq|.*wk|.*wv|.*wo|.*w1|.*w2|.*w3"})
    rng = np.random.default_rng(1)
    for _, cell in lora_layers(ours):         # non-zero B so the adapters change the logits
        cell.lora_b.set_data(Tensor(rng.normal(0, 0.2, cell.lora_b.shape).astype(np.float32)))
    # the reference: transformers with W + scaling * B @ A in place of W
    state = merged_state(ours)
    with torch.no_grad():
        for name, arr in state.items():
            dict(hf.named_parameters())[mf_to_hf(name)].copy_(torch.from_numpy(arr))
    assert len(lora_layers(ours)) == 35
    _check(ours, hf, vocab=512)


def test_moe_and_bf16_fall_back_to_the_graph(tmp_path):
    cfg = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=16, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(str(tmp_path / "moe"), safe_serialization=True)
    moe = from_hf_dir(str(tmp_path / "moe"))
    assert moe.decode_layout() is None and fused_decode.plan_for(moe) is None
    logits, cache = moe.forward_with_cache(np.array([[5, 6, 7]], np.int32), None)
    logits, cache = moe.forward_with_cache(np.array([[8]], np.int32), cache)
    assert not isinstance(cache, HostKVCache) and logits.shape == (1, 1, 96)
    bf16 = from_hf_dir(STORIES, param_init_type="bfloat16")
    assert fused_decode.plan_for(bf16) is None


def test_switched_off_by_environment(stories, monkeypatch):
    monkeypatch.setenv("MFSFT_FUSED_DECODE", "0")
    assert fused_decode.plan_for(stories[0]) is None
    assert not os.environ.get("MFSFT_FUSED_DECODE", "1") == "1"
