"""One training step on Qwen3 / Qwen3-MoE equals transformers + torch.optim.AdamW (full fine-tuning, router weights
included) and peft (LoRA), within 1e-5."""
import numpy as np
import pytest
import torch
from mindspore import Tensor

from mindformers_sft.convert.names_qwen3 import fc1_split, mf_state_to_hf, qkv_split
from mindformers_sft.models import load_state_dict, state_dict_numpy
from mindformers_sft.pet.lora import adapter_state, apply_lora, merged_state
from mindformers_sft.pretrained import from_hf_dir

from tests.models.test_qwen3_moe_vs_hf import tiny_qwen3_moe
from tests.models.test_qwen3_vs_hf import tiny_qwen3
from tests.trainer.test_step_vs_torch import CLIP, LR, _ours, _torch_groups


def _batch(b=3, s=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 96, (b, s + 1)).astype(np.int32)
    labels = ids.copy()
    labels[:, : s // 3] = -100
    labels[1, -4:] = -100
    return ids, labels


def _torch_step(model, ids, labels):
    """transformers' loss on the S tokens our model reads (ids[:, :-1] -> labels[:, 1:]: the aux loss of a MoE
    model covers the same tokens), one clipped AdamW step."""
    opt = torch.optim.AdamW(_torch_groups(model), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    opt.zero_grad()
    target = torch.tensor(labels[:, 1:], dtype=torch.long)
    out = model(input_ids=torch.tensor(ids[:, :-1], dtype=torch.long), labels=target, shift_labels=target)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP)
    opt.step()
    return out.loss.item()


def _compare_full(ours, hf, w0, ref_loss, loss):
    assert abs(loss - ref_loss) < 1e-5
    ref = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    ours_hf = mf_state_to_hf(state_dict_numpy(ours), ours.config)
    assert set(ours_hf) == set(ref) - ({"lm_head.weight"} if ours.config.tie_word_embeddings else set())
    for name, arr in ours_hf.items():
        diff = np.abs(arr - ref[name]).max()
        assert diff < 1e-5, f"{name}: max diff {diff}"
        d_ref = ref[name] - w0[name]
        if np.linalg.norm(d_ref) > 0:
            rel = np.linalg.norm((arr - w0[name]) - d_ref) / np.linalg.norm(d_ref)
            assert rel < 2e-2, f"{name}: update differs by {rel:.2%}"
    return ours_hf


def test_qwen3_full_step_matches_torch_adamw(tmp_path):
    hf = tiny_qwen3(str(tmp_path), "gqa_untied")
    ours = from_hf_dir(str(tmp_path))
    w0 = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    ids, labels = _batch()
    ref_loss = _torch_step(hf, ids, labels)
    loss = _ours(ours, [{"input_ids": ids, "labels": labels}], steps=1)[0]
    _compare_full(ours, hf, w0, ref_loss, loss)


def test_qwen3_moe_full_step_matches_torch_adamw_router_included(tmp_path):
    hf = tiny_qwen3_moe(str(tmp_path), "mlp_only")
    ours = from_hf_dir(str(tmp_path))
    w0 = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    ids, labels = _batch(seed=1)
    ref_loss = _torch_step(hf, ids, labels)          # CE + 0.05 * aux
    loss = _ours(ours, [{"input_ids": ids, "labels": labels}], steps=1)[0]
    after = _compare_full(ours, hf, w0, ref_loss, loss)
    router = "model.layers.0.mlp.gate.weight"
    assert np.abs(after[router] - w0[router]).max() > 1e-6          # the router trained (CE and aux gradients)


def _peft(hf, targets, rank=4, alpha=8):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(hf, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))


def _random_adapters(ours, seed):
    rng = np.random.default_rng(seed)
    state = {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in adapter_state(ours).items()}
    load_state_dict(ours, state, strict=False)
    return state


def _peft_name(mf_layer, kind):
    """PEFT parameter of our `<layer>.lora_a|lora_b` (qkv_concat False names)."""
    from mindformers_sft.convert.names_qwen3 import mf_to_hf
    return "base_model.model." + mf_to_hf(mf_layer + ".weight").replace(".weight", f".lora_{kind}.default.weight")


SPLIT_TARGETS = ".*linear_q|.*linear_k|.*linear_v|.*linear_proj|.*gating|.*hidden|.*linear_fc2"
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_lora_step_matches_peft(tmp_path, family):
    """LoRA on every attention projection (and, for dense layers, the MLP) with qkv_concat False: PEFT's adapters
    one for one. MoE: the sparse layers' experts stay frozen (not named by the regex)."""
    make = tiny_qwen3 if family == "qwen3" else tiny_qwen3_moe
    hf = make(str(tmp_path), "gqa_untied" if family == "qwen3" else "step2")
    ours = from_hf_dir(str(tmp_path), qkv_concat=False)
    names = apply_lora(ours, {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": SPLIT_TARGETS})
    peft_model = _peft(hf, PEFT_TARGETS if family == "qwen3" else
                       r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)")
    n_layers = ours.config.num_layers
    n_dense = sum(not ours.config.is_moe_layer(i) for i in range(n_layers))
    assert len(names) == 4 * n_layers + 3 * n_dense
    state = _random_adapters(ours, 2)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, arr in state.items():
            layer, kind = name.rsplit(".", 1)
            params[_peft_name(layer, kind[-1].upper())].copy_(torch.from_numpy(arr))
    ids, labels = _batch(seed=3)
    ref_loss = _torch_step(peft_model, ids, labels)
    loss = _ours(ours, [{"input_ids": ids, "labels": labels}], steps=1)[0]
    assert abs(loss - ref_loss) < 1e-5
    for name, arr in adapter_state(ours).items():
        layer, kind = name.rsplit(".", 1)
        ref = params[_peft_name(layer, kind[-1].upper())].detach().numpy()
        assert np.abs(arr - ref).max() < 1e-5, name
        assert np.abs(arr - state[name]).max() > 0, f"{name} did not train"


def test_fused_qkv_fc1_lora_is_peft_with_split_b(tmp_path):
    """One adapter on linear_qkv / linear_fc1 = PEFT adapters on q/k/v (gate/up) sharing A, B split by rows."""
    hf = tiny_qwen3(str(tmp_path), "gqa_untied")
    ours = from_hf_dir(str(tmp_path))
    apply_lora(ours, {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8,
                      "target_modules": ".*linear_qkv|.*linear_fc1"})
    state = _random_adapters(ours, 5)
    peft_model = _peft(hf, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])
    params = dict(peft_model.named_parameters())
    c = ours.config
    with torch.no_grad():
        for i in range(c.num_layers):
            a = state[f"decoder.layers.{i}.self_attention.linear_qkv.lora_a"]
            parts = qkv_split(state[f"decoder.layers.{i}.self_attention.linear_qkv.lora_b"], c.num_heads,
                              c.n_kv_heads, c.head_dim)
            for proj, b in zip(("q_proj", "k_proj", "v_proj"), parts):
                p = f"base_model.model.model.layers.{i}.self_attn.{proj}"
                params[p + ".lora_A.default.weight"].copy_(torch.from_numpy(a))
                params[p + ".lora_B.default.weight"].copy_(torch.from_numpy(b))
            a = state[f"decoder.layers.{i}.mlp.linear_fc1.lora_a"]
            parts = fc1_split(state[f"decoder.layers.{i}.mlp.linear_fc1.lora_b"])
            for proj, b in zip(("gate_proj", "up_proj"), parts):
                p = f"base_model.model.model.layers.{i}.mlp.{proj}"
                params[p + ".lora_A.default.weight"].copy_(torch.from_numpy(a))
                params[p + ".lora_B.default.weight"].copy_(torch.from_numpy(b))
    ids, labels = _batch(seed=6)
    target = torch.tensor(labels[:, 1:], dtype=torch.long)
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor(ids[:, :-1], dtype=torch.long), labels=target,
                         shift_labels=target).loss.item()
    assert abs(float(ours(Tensor(ids), Tensor(labels)).asnumpy()) - ref) < 1e-5


def test_moe_experts_lora_by_regex_trains_and_merges(tmp_path):
    tiny_qwen3_moe(str(tmp_path), "step2")
    ours = from_hf_dir(str(tmp_path))
    names = apply_lora(ours, {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 4,
                              "target_modules": ".*linear_qkv|.*experts"})
    assert names == [f"decoder.layers.{i}.self_attention.linear_qkv" for i in range(4)] + \
        ["decoder.layers.1.mlp.experts", "decoder.layers.3.mlp.experts"]
    trainable = {p.name for p in ours.trainable_params()}
    assert {"decoder.layers.1.mlp.experts.lora_a1", "decoder.layers.3.mlp.experts.lora_b2"} <= trainable
    assert not any(n.endswith(("weight1", "weight2", "router.weight")) for n in trainable)
    base0 = {k: v for k, v in state_dict_numpy(ours).items() if k in merged_state(ours)}
    ids, labels = _batch(seed=7)
    losses = _ours(ours, [{"input_ids": ids, "labels": labels}], steps=3)
    assert losses[-1] < losses[0]
    after = adapter_state(ours)
    assert np.abs(after["decoder.layers.1.mlp.experts.lora_b1"]).max() > 0      # B left zero: it trained
    # the base is frozen; merging the adapters gives a plain model with the same loss
    for k, v in state_dict_numpy(ours).items():
        if k in base0:
            assert np.array_equal(v, base0[k]), k
    plain = from_hf_dir(str(tmp_path))
    load_state_dict(plain, merged_state(ours), strict=True)
    a = float(ours(Tensor(ids), Tensor(labels)).asnumpy())
    b = float(plain(Tensor(ids), Tensor(labels)).asnumpy())
    assert abs(a - b) < 1e-5


def test_moe_lora_steps_compiled_equal_pynative(tmp_path):
    """The trainer's compiled step (jit: router logits tuple, aux loss, packing mask, expert adapters) equals
    PyNative."""
    import mindspore as ms
    from mindformers_sft.trainer.optimizer import AdamW
    from mindformers_sft.trainer.step import TrainStep
    tiny_qwen3_moe(str(tmp_path), "mlp_only")
    ids, labels = _batch(b=2, seed=8)
    seg = np.ones((2, 16), np.int32)
    seg[1, 6:], seg[1, 12:] = 2, 0
    runs = {}
    for jit in (False, True):
        ms.set_seed(1)      # same adapter init
        model = from_hf_dir(str(tmp_path))
        apply_lora(model, {"pet_type": "lora", "lora_rank": 2, "target_modules": ".*linear_qkv|.*experts"})
        step = TrainStep(model, AdamW(model.trainable_params(), 0.9, 0.999, 1e-8, 0.1), CLIP, None, jit=jit)
        losses = [step([{"input_ids": ids, "labels": labels, "segment_ids": seg}], 1e-3).loss for _ in range(2)]
        runs[jit] = losses, adapter_state(model)
    assert np.allclose(runs[True][0], runs[False][0], atol=1e-6, rtol=0)
    for k, v in runs[False][1].items():
        assert np.abs(runs[True][1][k] - v).max() < 1e-6, k
