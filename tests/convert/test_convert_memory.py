"""Peak memory of convert_weight.py stays near the largest shard, not the model size, for every output format.

A fake HF Llama (hidden 512, 16 layers, vocab 8192: ~300 MB fp32 in 18 shards of <= 17 MB) is converted in a
subprocess; its peak RSS (getrusage of the child, which counts memory-mapped shard pages too) minus the peak
RSS of a subprocess that only imports the package must stay under 3 x the largest shard + slack.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from mindformers_sft.checkpoint import HF_INDEX_NAME, tensor_infos, verify

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "convert_weight.py")
H, L, FF, V = 512, 16, 2048, 8192
SLACK = 16 * 2 ** 20

# Runs argv[1:] as a child and prints the child's peak RSS in bytes (Linux ru_maxrss is in KiB).
_MEASURE = ("import resource, subprocess, sys\n"
            "p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)\n"
            "sys.stderr.write(p.stderr)\n"
            "print(p.stdout.strip())\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
            "sys.exit(p.returncode)\n")


def _peak_rss(args, cwd):
    p = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable] + args, capture_output=True, text=True,
                       cwd=cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    *out, peak = p.stdout.strip().splitlines()
    return int(peak), "\n".join(out)


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("bighf")
    rng = np.random.default_rng(0)

    def r(*shape):
        return rng.standard_normal(shape, dtype=np.float32)
    shards = [{"model.embed_tokens.weight": r(V, H)}]
    for i in range(L):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": r(H, H), p + "self_attn.k_proj.weight": r(H, H),
                       p + "self_attn.v_proj.weight": r(H, H), p + "self_attn.o_proj.weight": r(H, H),
                       p + "mlp.gate_proj.weight": r(FF, H), p + "mlp.up_proj.weight": r(FF, H),
                       p + "mlp.down_proj.weight": r(H, FF), p + "input_layernorm.weight": r(H),
                       p + "post_attention_layernorm.weight": r(H)})
    shards.append({"model.norm.weight": r(H), "lm_head.weight": r(V, H)})
    total = _save_shards(d, shards)
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": FF,
        "num_hidden_layers": L, "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": V,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "float32"}))
    return str(d), total, _largest(d)


def _save_shards(d, shards):
    """Write `shards` (list of dicts) as an HF sharded directory with its index; the total tensor bytes."""
    n, weight_map, total = len(shards), {}, 0
    for i, sh in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(sh, str(d / name), metadata={"format": "pt"})
        for k, v in sh.items():
            weight_map[k] = name
            total += v.nbytes
    (d / HF_INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def _largest(d):
    return max(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    peak, _ = _peak_rss(["-c", "import argparse, mindformers_sft.convert, mindformers_sft.checkpoint"],
                        str(tmp_path_factory.mktemp("base")))
    return peak


def _check(peak, base, total, largest, what):
    extra = peak - base
    bound = 3 * largest + SLACK
    print(f"{what}: peak RSS {peak / 2**20:.1f} MiB, +{extra / 2**20:.1f} MiB over import baseline "
          f"(bound {bound / 2**20:.1f}, largest shard {largest / 2**20:.1f}, model {total / 2**20:.1f} MiB)")
    assert extra < bound, (f"{what}: peak RSS {peak / 2**20:.0f} MiB is {extra / 2**20:.0f} MiB over the import "
                           f"baseline; bound {bound / 2**20:.0f} MiB (largest shard {largest / 2**20:.0f} MiB, "
                           f"model {total / 2**20:.0f} MiB)")
    assert extra < total / 4, what


@pytest.mark.parametrize("ext,dtype", [("ckpt", None), ("safetensors", None), ("safetensors", "bf16")])
def test_forward_conversion_streams(big_hf, baseline, tmp_path, ext, dtype):
    src, total, largest = big_hf
    assert total > 15 * largest                      # the model is many times its largest shard
    out = str(tmp_path / f"big.{ext}")
    args = [SCRIPT, "--model", "llama", "--input_path", src, "--output_path", out] + (["--dtype", dtype] if dtype
                                                                                      else [])
    peak, stdout = _peak_rss(args, str(tmp_path))
    assert stdout.startswith(f"convert_weight: {L * 9 + 3} tensors")
    infos = verify(out)
    assert len(infos) == L * 9 + 3
    assert sum(i.nbytes for i in infos.values()) == (total if dtype is None else total // 2)
    _check(peak, baseline, total, largest, f"HF -> {ext} {dtype or ''}")


def test_reverse_conversion_streams(big_hf, baseline, tmp_path):
    src, total, largest = big_hf
    ck = str(tmp_path / "big.ckpt")
    subprocess.run([sys.executable, SCRIPT, "--input_path", src, "--output_path", ck], check=True,
                   capture_output=True, cwd=str(tmp_path))
    out = str(tmp_path / "hf")
    peak, stdout = _peak_rss([SCRIPT, "--reversed", "--input_path", ck, "--output_path", out,
                              "--max_shard_size", "20MB"], str(tmp_path))
    assert stdout.startswith(f"convert_weight: {L * 9 + 3} tensors")
    infos = tensor_infos(out)
    assert set(infos) == set(tensor_infos(src))
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 10
    _check(peak, baseline, total, largest, "CKPT -> HF")


# ------------------------------------------------------------------ Qwen3-MoE: grouped conversion (fused q/k/v,
# gate/up, E experts stacked into weight1/weight2) holds about one MoE layer, not the model
QL, QE, QIM, QV = 12, 16, 256, 4096


@pytest.fixture(scope="module")
def big_moe(tmp_path_factory):
    d = tmp_path_factory.mktemp("bigmoe")
    rng = np.random.default_rng(0)

    def r(*shape):
        return rng.standard_normal(shape, dtype=np.float32)
    hd, nh, nkv = 64, 4, 2
    shards = [{"model.embed_tokens.weight": r(QV, H // 2)}]
    h = H // 2
    for i in range(QL):
        p = f"model.layers.{i}."
        sh = {p + "self_attn.q_proj.weight": r(nh * hd, h), p + "self_attn.k_proj.weight": r(nkv * hd, h),
              p + "self_attn.v_proj.weight": r(nkv * hd, h), p + "self_attn.o_proj.weight": r(h, nh * hd),
              p + "self_attn.q_norm.weight": r(hd), p + "self_attn.k_norm.weight": r(hd),
              p + "input_layernorm.weight": r(h), p + "post_attention_layernorm.weight": r(h),
              p + "mlp.gate.weight": r(QE, h)}
        for e in range(QE):
            sh.update({p + f"mlp.experts.{e}.gate_proj.weight": r(QIM, h),
                       p + f"mlp.experts.{e}.up_proj.weight": r(QIM, h),
                       p + f"mlp.experts.{e}.down_proj.weight": r(h, QIM)})
        shards.append(sh)
    shards.append({"model.norm.weight": r(h), "lm_head.weight": r(QV, h)})
    total = _save_shards(d, shards)
    (d / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": h,
        "intermediate_size": 512, "num_hidden_layers": QL, "num_attention_heads": nh, "num_key_value_heads": nkv,
        "head_dim": hd, "vocab_size": QV, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "num_experts": QE, "num_experts_per_tok": 2, "moe_intermediate_size": QIM,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "torch_dtype": "float32"}))
    return str(d), total, _largest(d), sum(len(s) for s in shards)


def test_qwen3_moe_grouped_conversion_streams(big_moe, baseline, tmp_path):
    src, total, largest, n_hf = big_moe
    n_mf = 2 + QL * 9 + 1
    assert total > 10 * largest
    ck = str(tmp_path / "moe.ckpt")
    peak, stdout = _peak_rss([SCRIPT, "--model", "qwen3_moe", "--input_path", src, "--output_path", ck],
                             str(tmp_path))
    assert stdout.startswith(f"convert_weight: {n_mf} tensors")
    assert tensor_infos(ck)["decoder.layers.3.mlp.experts.weight1"].shape == (QE * H // 2, 2 * QIM)
    _check(peak, baseline, total, largest, "Qwen3-MoE HF -> ckpt")
    out = str(tmp_path / "hf")
    peak, stdout = _peak_rss([SCRIPT, "--reversed", "--input_path", ck, "--output_path", out,
                              "--max_shard_size", "20MB"], str(tmp_path))
    assert stdout.startswith(f"convert_weight: {n_hf} tensors")
    assert set(tensor_infos(out)) == set(tensor_infos(src))
    _check(peak, baseline, total, largest, "Qwen3-MoE ckpt -> HF")
