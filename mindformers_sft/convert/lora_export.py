"""LoRA checkpoints -> Hugging Face: merged weights (W + alpha/r * B A) as a normal HF model directory, and
optionally a PEFT adapter (adapter_config.json + adapter_model.safetensors) that `peft` loads onto the base.

The adapter-only checkpoint's meta.json names the base weights and the pet_config it was trained with;
`--config` (a YAML with model.model_config.pet_config) and `--base_path` can supply or override them.
Base tensors stream one at a time; only the (small) adapters are held in memory.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np

from ..checkpoint.io import (ShardedSafetensorsWriter, atomic_write_json, checkpoint_files, iter_file,
                             parse_size, save_safetensors)
from ..checkpoint.loading import OPT_PREFIXES, is_hf_dir, resolve
from ..errors import CheckpointError, ConfigError
from ..pet.lora import parse_pet_config
from .names import hf_to_mf, is_ignored_hf, mf_to_hf

LORA_SUFFIXES = (".lora_a", ".lora_b")


def read_adapters(path: str) -> dict:
    """The adapter weights of a checkpoint (not their optimizer moments adam_m.* / adam_v.*)."""
    return {k: v for k, v in iter_file(path) if k.endswith(LORA_SUFFIXES) and not k.startswith(OPT_PREFIXES)}


def _pet_from_yaml(config: str) -> Optional[dict]:
    if not config or not config.lower().endswith((".yaml", ".yml")):
        return None
    from ..config.yaml_lines import load_yaml
    d = load_yaml(config)
    return ((d.get("model") or {}).get("model_config") or {}).get("pet_config")


def _base_tensors(base_path: str):
    """(mf_name, array) of the base weights, streaming, from a HF dir or a MindFormers file."""
    hf = is_hf_dir(base_path)
    for fp in checkpoint_files(base_path):
        for name, arr in iter_file(fp):
            if hf:
                if is_ignored_hf(name):
                    continue
                yield hf_to_mf(name, source=fp), arr
            elif not name.startswith(OPT_PREFIXES) and not name.endswith(LORA_SUFFIXES):
                yield name, arr


def peft_names(layer: str):
    """MindFormers layer name -> PEFT names of its lora_A / lora_B weights."""
    hf_layer = mf_to_hf(layer + ".weight")[: -len(".weight")]
    return f"base_model.model.{hf_layer}.lora_A.weight", f"base_model.model.{hf_layer}.lora_B.weight"


def peft_target_modules(layers, num_layers):
    """Short HF module names when every layer has them, else a regex that fully matches exactly these modules."""
    hf = [mf_to_hf(l + ".weight")[: -len(".weight")] for l in layers]
    short = sorted({h.rsplit(".", 1)[1] for h in hf})
    full = {f"model.layers.{i}.{grp}.{s}" for i in range(num_layers) for s in short
            for grp in ("self_attn", "mlp") if (grp == "mlp") == (s in ("gate_proj", "up_proj", "down_proj"))}
    if full == set(hf):
        return short
    return "|".join(re.escape(h) for h in sorted(hf))


def export_lora(input_path: str, output_path: str, peft_path: Optional[str] = None, config: Optional[str] = None,
                base_path: Optional[str] = None, dtype=None, max_shard_size="5GB", warn=print) -> dict:
    from .spec import load_model_config
    kind, src, entry = resolve(input_path, warn=warn)
    if kind != "file":
        raise CheckpointError(f"{input_path}: not a LoRA training checkpoint")
    adapters = read_adapters(src)
    if not adapters:
        raise CheckpointError(f"{src}: holds no LoRA adapters (no '*.lora_a' / '*.lora_b' tensors)")
    entry = entry or {}
    pet = parse_pet_config(_pet_from_yaml(config) or entry.get("pet_config") or {})
    if not pet:
        raise ConfigError(f"{src}: its meta.json records no pet_config; pass --config with a YAML whose "
                          "model.model_config.pet_config gives lora_rank and lora_alpha")
    base = base_path or entry.get("base_checkpoint")
    if not base:
        raise ConfigError(f"{src}: adapter-only checkpoint with no recorded base weights; pass --base_path")
    if config and config.lower().endswith(".json"):
        spec = load_model_config(config)
    elif is_hf_dir(base):
        spec = load_model_config(base)
    elif entry.get("hf_config"):
        from .spec import spec_from_hf_dict
        spec = spec_from_hf_dict(entry["hf_config"], os.path.join(os.path.dirname(src), "meta.json"), None)
    else:
        raise ConfigError(f"{src}: no model config: pass --config with the base model's config.json")
    scaling = pet["lora_alpha"] / pet["lora_rank"]
    layers = sorted({k[: -len(".lora_a")] for k in adapters if k.endswith(".lora_a")})
    for layer in layers:
        if layer + ".lora_b" not in adapters:
            raise CheckpointError(f"{src}: '{layer}.lora_a' has no matching '{layer}.lora_b'")
        a, b = adapters[layer + ".lora_a"], adapters[layer + ".lora_b"]
        if a.shape[0] != pet["lora_rank"] or b.shape[1] != pet["lora_rank"]:
            raise CheckpointError(f"{src}: '{layer}' adapters have rank {a.shape[0]}, pet_config says "
                                  f"lora_rank {pet['lora_rank']}")
    out = os.path.abspath(output_path)
    os.makedirs(out, exist_ok=True)
    writer = ShardedSafetensorsWriter(out, parse_size(max_shard_size), metadata={"format": "pt"})
    merged, layer_set = 0, set(layers)
    try:
        for name, arr in _base_tensors(base):
            if name == "lm_head.weight" and spec.config.tie_word_embeddings:
                continue
            layer = name[: -len(".weight")]
            if name.endswith(".weight") and layer in layer_set:
                a = adapters[layer + ".lora_a"].astype(np.float32)
                b = adapters[layer + ".lora_b"].astype(np.float32)
                if (b.shape[0], a.shape[1]) != tuple(arr.shape):
                    raise CheckpointError(f"{src}: adapters of '{layer}' ({b.shape[0]}x{a.shape[1]}) do not fit the "
                                          f"base weight {tuple(arr.shape)} of {base}")
                arr = (arr.astype(np.float32) + scaling * (b @ a)).astype(arr.dtype)
                merged += 1
            if dtype is not None:
                from ..checkpoint.dtypes import cast, to_np_dtype
                arr = cast(arr, to_np_dtype(dtype), name)
            writer.add(mf_to_hf(name), arr)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    if merged != len(layers):
        raise CheckpointError(f"{base}: only {merged} of the {len(layers)} adapted layers were found in the base")
    atomic_write_json(os.path.join(out, "config.json"), spec.hf_config)
    result = {"merged_layers": merged, "output_path": out}
    if peft_path:
        os.makedirs(peft_path, exist_ok=True)
        tensors = {}
        for layer in layers:
            na, nb = peft_names(layer)
            tensors[na] = adapters[layer + ".lora_a"]
            tensors[nb] = adapters[layer + ".lora_b"]
        save_safetensors(tensors, os.path.join(peft_path, "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(os.path.join(peft_path, "adapter_config.json"), {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": os.path.abspath(base),
            "r": pet["lora_rank"], "lora_alpha": pet["lora_alpha"], "lora_dropout": pet["lora_dropout"],
            "target_modules": peft_target_modules(layers, spec.config.num_layers), "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
            "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
        })
        result["peft_path"] = os.path.abspath(peft_path)
    return result

