"""A Qwen3 LoRA checkpoint (adapters on the fused linear_qkv / linear_fc1 and on linear_proj / linear_fc2) exports
to a merged Hugging Face model that transformers runs to our LoRA model's logits, and to a PEFT adapter that
peft loads onto the transformers base with the same logits; the fused adapters become q/k/v_proj and
gate/up_proj adapters with the shared A and B's rows split as the weight's rows."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from mindspore import Tensor
from peft import PeftModel
from safetensors.numpy import load_file as np_load_file, save_file as np_save_file

from mindformers_sft.checkpoint import load_tensors
from mindformers_sft.checkpoint.training_state import CheckpointManager
from mindformers_sft.convert import run
from mindformers_sft.errors import CheckpointError
from mindformers_sft.models import build_model, load_state_dict
from mindformers_sft.models.config import LlamaConfig
from mindformers_sft.pet.lora import EXPERT_ADAPTERS, adapter_state, apply_lora, lora_experts, lora_layers
from tests.convert.test_qwen3_convert import D, E, FF, IDS, IM, MOE_LAYERS, NH, NKV, hf_tensors, make_hf

PET = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.0,
       "target_modules": ".*linear_qkv|.*linear_proj|.*linear_fc1|.*linear_fc2"}


def _lora_run(tmp_path, hf_dir, base, pet=PET):
    """Our Qwen3 with random nonzero adapters, saved as a training checkpoint; (its logits, checkpoint dir)."""
    cfg = LlamaConfig.from_hf_config(hf_dir, pet_config=dict(pet))
    model = build_model(cfg)
    load_state_dict(model, load_tensors(base) if os.path.isfile(base) else _hf_as_mf(hf_dir, tmp_path), strict=True)
    apply_lora(model, cfg.pet_config)
    rng = np.random.default_rng(1)
    params = [p for _, c in lora_layers(model) for p in (c.lora_a, c.lora_b)]
    params += [getattr(c, a) for _, c in lora_experts(model) for a in EXPERT_ADAPTERS]
    for p in params:
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.2))
    logits = model.logits(Tensor(np.array(IDS, np.int32))).asnumpy()
    out = str(tmp_path / "run")
    CheckpointManager(out, prefix="qwen3").save(
        adapter_state(model), 1, 0, 1, extra={"full_weights": False, "base_checkpoint": os.path.abspath(base),
                                              "pet_config": cfg.pet_config, "hf_config": cfg.to_hf_config()})
    return logits, adapter_state(model), os.path.join(out, "checkpoint")


def _hf_as_mf(hf_dir, tmp_path):
    ck = str(tmp_path / "base_for_model.ckpt")
    run(["--input_path", hf_dir, "--output_path", ck])
    return load_tensors(ck)


def _deinterleave_qkv_rows(b):
    """Rows of a fused linear_qkv (MindFormers' per-kv-group interleave) -> (q rows, k rows, v rows), by hand."""
    rep, q, k, v = NH // NKV, [], [], []
    step = (rep + 2) * D
    for g in range(NKV):
        blk = b[g * step:(g + 1) * step]
        q.append(blk[:rep * D])
        k.append(blk[rep * D:(rep + 1) * D])
        v.append(blk[(rep + 1) * D:])
    return np.concatenate(q), np.concatenate(k), np.concatenate(v)


@pytest.mark.parametrize("base_kind", ["hf", "mindformers"])
def test_qwen3_lora_merged_and_peft_export(tmp_path, base_kind):
    hf_dir = str(tmp_path / "hf")
    make_hf(hf_dir, "qwen3", tie=False)
    base = hf_dir
    if base_kind == "mindformers":                 # the base as a MindFormers checkpoint: grouped conversion
        base = str(tmp_path / "base.safetensors")
        run(["--input_path", hf_dir, "--output_path", base])
    ours, adapters, ckpt = _lora_run(tmp_path, hf_dir, base)
    merged, peft_dir = str(tmp_path / "merged"), str(tmp_path / "peft")
    r = run(["--reversed", "--input_path", ckpt, "--output_path", merged, "--peft_path", peft_dir])
    assert r.tensors == 7 * 3                      # q, k, v, o, gate, up, down in each of the 3 layers
    ids = torch.tensor(IDS)
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits.numpy()
        base_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        plain = base_model(ids).logits.numpy()
        via_peft = PeftModel.from_pretrained(base_model, peft_dir)(input_ids=ids).logits.numpy()
    assert np.abs(plain - ours).max() > 1e-2                  # the adapters change the model
    assert np.abs(ours - ref).max() < 1e-4
    assert np.abs(ours - via_peft).max() < 1e-4
    # the PEFT tensors are the fused adapters' pieces, exactly
    cfg = json.load(open(os.path.join(peft_dir, "adapter_config.json")))
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                             "v_proj"]
    t = np_load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    pre, mf = "base_model.model.model.layers.1.", "decoder.layers.1."
    a, b = adapters[mf + "self_attention.linear_qkv.lora_a"], adapters[mf + "self_attention.linear_qkv.lora_b"]
    for proj, rows in zip("qkv", _deinterleave_qkv_rows(b)):
        assert np.array_equal(t[pre + f"self_attn.{proj}_proj.lora_A.weight"], a)
        assert np.array_equal(t[pre + f"self_attn.{proj}_proj.lora_B.weight"], rows)
    b1 = adapters[mf + "mlp.linear_fc1.lora_b"]
    assert b1.shape[0] == 2 * FF
    assert np.array_equal(t[pre + "mlp.gate_proj.lora_B.weight"], b1[0::2])      # interleaved [g0, u0, g1, ...]
    assert np.array_equal(t[pre + "mlp.up_proj.lora_B.weight"], b1[1::2])
    assert np.array_equal(t[pre + "mlp.down_proj.lora_B.weight"], adapters[mf + "mlp.linear_fc2.lora_b"])
    if base_kind == "hf":        # a base missing a tensor is refused, naming it (nothing half-merged is left)
        broken = tmp_path / "broken"
        broken.mkdir()
        shutil.copy(os.path.join(hf_dir, "config.json"), broken)
        w = hf_tensors(hf_dir)
        w.pop("model.layers.2.self_attn.k_norm.weight")
        np_save_file(w, str(broken / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=f"{broken}: missing tensor\\(s\\) "
                                                  "'model.layers.2.self_attn.k_norm.weight'"):
            run(["--reversed", "--input_path", ckpt, "--output_path", str(tmp_path / "m2"), "--base_path", str(broken)])
        assert not any(f.endswith(".safetensors") for f in os.listdir(tmp_path / "m2"))


def test_qwen3_moe_expert_lora_export(tmp_path):
    """Stacked expert adapters (lora_a1/b1 on weight1, lora_a2/b2 on weight2) become per-expert PEFT adapters:
    gate_proj and up_proj share A1[e] and take B1[e]'s first / last moe_intermediate_size rows."""
    hf_dir = str(tmp_path / "hf")
    make_hf(hf_dir, "qwen3_moe", tie=False)
    pet = dict(PET, target_modules=".*linear_qkv|.*linear_fc1|.*experts")
    ours, adapters, ckpt = _lora_run(tmp_path, hf_dir, hf_dir, pet)
    merged, peft_dir = str(tmp_path / "merged"), str(tmp_path / "peft")
    run(["--reversed", "--input_path", ckpt, "--output_path", merged, "--peft_path", peft_dir])
    ids = torch.tensor(IDS)
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits.numpy()
        base_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        plain = base_model(ids).logits.numpy()
        via_peft = PeftModel.from_pretrained(base_model, peft_dir)(input_ids=ids).logits.numpy()
    assert np.abs(plain - ours).max() > 1e-2
    assert np.abs(ours - ref).max() < 1e-4
    assert np.abs(ours - via_peft).max() < 1e-4
    t = np_load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    layer = MOE_LAYERS[-1]
    a1, b1 = (adapters[f"decoder.layers.{layer}.mlp.experts.{n}"] for n in ("lora_a1", "lora_b1"))
    assert a1.shape[0] == E and b1.shape[1] == 2 * IM
    pre = f"base_model.model.model.layers.{layer}.mlp.experts.5."
    assert np.array_equal(t[pre + "gate_proj.lora_A.weight"], a1[5])
    assert np.array_equal(t[pre + "up_proj.lora_A.weight"], a1[5])
    assert np.array_equal(t[pre + "gate_proj.lora_B.weight"], b1[5, :IM])
    assert np.array_equal(t[pre + "up_proj.lora_B.weight"], b1[5, IM:])
