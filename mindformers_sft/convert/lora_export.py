"""LoRA checkpoints -> Hugging Face: merged weights (W + alpha/r * B A) as a normal HF model directory, and
optionally a PEFT adapter (adapter_config.json + adapter_model.safetensors) that `peft` loads onto the base.

The adapter-only checkpoint's meta.json names the base weights and the pet_config it was trained with;
`--config` (a YAML with model.model_config.pet_config) and `--base_path` can supply or override them.

Adapters are first carried over to Hugging Face modules (:func:`hf_adapters`): a renamed layer keeps its A and
B; a fused layer (Qwen3 ``linear_qkv``, ``linear_fc1``) gives each HF projection the shared A and the rows of B
that belong to it, split exactly as the weight's rows are (``q = B_q A x`` for every row, so nothing is
approximated); stacked Qwen3-MoE expert adapters (``experts.lora_a1/b1/a2/b2``) give each expert's
gate/up/down_proj its own A and B. The merge then happens on the HF side, on base tensors streamed one group
at a time (an HF directory as is, MindFormers weights through the conversion plan); only the (small) adapters
are held in memory.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import numpy as np

from ..checkpoint.dtypes import cast, to_np_dtype
from ..checkpoint import (ShardedSafetensorsWriter, atomic_write_json, checkpoint_files, file_infos,
                          infos_of_files, iter_file, parse_size, save_safetensors)
from ..checkpoint.loading import OPT_PREFIXES, is_hf_dir, resolve
from ..errors import CheckpointError, ConfigError
from ..pet.lora import parse_pet_config
from .layouts import layout_for
from .plan import Layout, plan, stream

LORA_SUFFIXES = (".lora_a", ".lora_b")
EXPERT_LORA_SUFFIXES = (".lora_a1", ".lora_b1", ".lora_a2", ".lora_b2")
_EXPERTS_RE = re.compile(r"decoder\.layers\.(\d+)\.mlp\.experts$")


def read_adapters(path: str) -> dict:
    """The adapter weights of a checkpoint (not their optimizer moments adam_m.* / adam_v.*)."""
    return {k: v for k, v in iter_file(path) if k.endswith(LORA_SUFFIXES + EXPERT_LORA_SUFFIXES)
            and not k.startswith(OPT_PREFIXES)}


def _pet_from_yaml(config: str) -> Optional[dict]:
    if not config or not config.lower().endswith((".yaml", ".yml")):
        return None
    from ..config.yaml_lines import load_yaml
    d = load_yaml(config)
    return ((d.get("model") or {}).get("model_config") or {}).get("pet_config")


def hf_adapters(adapters: dict, layout: Layout, source: str) -> "OrderedDict[str, Tuple[np.ndarray, np.ndarray]]":
    """HF module name (e.g. ``model.layers.0.self_attn.q_proj``) -> (A (r, in), B (out, r)) of every adapter."""
    by_mf = {}
    for rule in layout.rules:
        for n in rule.mf:
            by_mf[n] = rule
    out = OrderedDict()
    for key in sorted(adapters):
        if key.endswith(".lora_a"):
            layer = key[: -len(".lora_a")]
            a, b = adapters[key], adapters.get(layer + ".lora_b")
            if b is None:
                raise CheckpointError(f"{source}: '{layer}.lora_a' has no matching '{layer}.lora_b'")
            rule = by_mf.get(layer + ".weight")
            if rule is None or len(rule.mf) != 1:
                raise CheckpointError(f"{source}: adapter '{key}' belongs to no Linear weight of the model "
                                      f"({layer}.weight is not one)")
            if a.shape[1] != layout.mf_shapes[layer + ".weight"][1] or b.shape[0] != layout.mf_shapes[
                    layer + ".weight"][0]:
                raise CheckpointError(f"{source}: adapters of '{layer}' ({b.shape[0]}x{a.shape[1]}) do not fit its "
                                      f"weight {layout.mf_shapes[layer + '.weight']}")
            parts = [b] if rule.to_hf is None else list(rule.to_hf([b]))
            for hf_name, bp in zip(rule.hf, parts):
                out[hf_name[: -len(".weight")]] = (a, np.ascontiguousarray(bp))
        elif key.endswith(".lora_a1"):
            prefix = key[: -len(".lora_a1")]
            m = _EXPERTS_RE.match(prefix)
            need = [prefix + s for s in EXPERT_LORA_SUFFIXES]
            if m is None or any(n not in adapters for n in need):
                raise CheckpointError(f"{source}: expert adapters '{prefix}.lora_a1/b1/a2/b2' are incomplete or not "
                                      "under decoder.layers.N.mlp.experts")
            a1, b1, a2, b2 = (adapters[n] for n in need)
            f = b1.shape[1] // 2
            for e in range(a1.shape[0]):
                p = f"model.layers.{m.group(1)}.mlp.experts.{e}."
                out[p + "gate_proj"] = (a1[e], np.ascontiguousarray(b1[e, :f]))
                out[p + "up_proj"] = (a1[e], np.ascontiguousarray(b1[e, f:]))
                out[p + "down_proj"] = (a2[e], b2[e])
        elif key.endswith(".lora_b") and key[: -len(".lora_b")] + ".lora_a" not in adapters:
            raise CheckpointError(f"{source}: '{key}' has no matching '{key[: -len('.lora_b')]}.lora_a'")
    return out


def _base_hf_tensors(base_path: str, layout: Layout, spec):
    """(HF name, array) of the base weights, streaming: an HF directory as is (names and shapes checked),
    MindFormers weights converted group by group."""
    from .names import is_ignored_hf, is_ignored_mf
    files = checkpoint_files(base_path)
    if is_hf_dir(base_path):
        seen = set()
        for fp in files:
            infos = file_infos(fp)
            for name, info in infos.items():
                if is_ignored_hf(name) or name in layout.tied_head:
                    continue
                if layout.hf_shapes.get(name) != tuple(info.shape):
                    layout.check_hf_name(name, fp)
                    raise CheckpointError(f"{fp}: tensor '{name}' ({list(info.shape)}) is not a weight of the model "
                                          f"in {spec.source} ({layout.facts})")
                seen.add(name)
            yield from iter_file(fp, [n for n in infos if not is_ignored_hf(n) and n not in layout.tied_head])
        missing = [n for n in layout.hf_shapes if n not in seen]
        if missing:
            raise CheckpointError(f"{base_path}: missing tensor(s) {', '.join(repr(n) for n in missing[:3])} that "
                                  f"{spec.source} requires ({layout.facts})")
        return
    infos = OrderedDict((k, v) for k, v in infos_of_files(files).items()
                        if not k.endswith(LORA_SUFFIXES + EXPERT_LORA_SUFFIXES))
    yield from stream(plan(infos, layout, False, base_path, spec.source, is_ignored_mf), None)


def peft_target_modules(modules, num_layers):
    """Short HF module names when every layer has them, else a regex that fully matches exactly these modules."""
    short = sorted({h.rsplit(".", 1)[1] for h in modules})
    full = {f"model.layers.{i}.{grp}.{s}" for i in range(num_layers) for s in short
            for grp in ("self_attn", "mlp") if (grp == "mlp") == (s in ("gate_proj", "up_proj", "down_proj"))}
    if full == set(modules):
        return short
    return "|".join(re.escape(h) for h in sorted(modules))


def export_lora(input_path: str, output_path: str, peft_path: Optional[str] = None, config: Optional[str] = None,
                base_path: Optional[str] = None, dtype=None, max_shard_size="5GB", warn=print) -> dict:
    from .spec import load_model_config, spec_from_hf_dict
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
        spec = spec_from_hf_dict(entry["hf_config"], os.path.join(os.path.dirname(src), "meta.json"), None,
                                 entry.get("weight_layout"))
    else:
        raise ConfigError(f"{src}: no model config: pass --config with the base model's config.json")
    layout = layout_for(spec.config, None if is_hf_dir(base) else
                        [n for p in checkpoint_files(base) for n in file_infos(p)])
    scaling = pet["lora_alpha"] / pet["lora_rank"]
    mods = hf_adapters(adapters, layout, src)
    for mod, (a, b) in mods.items():
        if a.shape[0] != pet["lora_rank"] or b.shape[1] != pet["lora_rank"]:
            raise CheckpointError(f"{src}: adapters of '{mod}' have rank {a.shape[0]}, pet_config says "
                                  f"lora_rank {pet['lora_rank']}")
    out = os.path.abspath(output_path)
    os.makedirs(out, exist_ok=True)
    writer = ShardedSafetensorsWriter(out, parse_size(max_shard_size), metadata={"format": "pt"})
    merged = 0
    try:
        for name, arr in _base_hf_tensors(base, layout, spec):
            ab = mods.get(name[: -len(".weight")]) if name.endswith(".weight") else None
            if ab is not None:
                a, b = (x.astype(np.float32) for x in ab)
                if (b.shape[0], a.shape[1]) != tuple(arr.shape):
                    raise CheckpointError(f"{src}: adapters of '{name}' ({b.shape[0]}x{a.shape[1]}) do not fit the "
                                          f"base weight {tuple(arr.shape)} of {base}")
                arr = (arr.astype(np.float32) + scaling * (b @ a)).astype(arr.dtype)
                merged += 1
            if dtype is not None:
                arr = cast(arr, to_np_dtype(dtype), name)
            writer.add(name, arr)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    if merged != len(mods):
        raise CheckpointError(f"{base}: only {merged} of the {len(mods)} adapted modules were found in the base")
    atomic_write_json(os.path.join(out, "config.json"), spec.hf_config)
    result = {"merged_layers": merged, "output_path": out}
    if peft_path:
        _write_peft(peft_path, mods, pet, base, spec.config.num_layers)
        result["peft_path"] = os.path.abspath(peft_path)
    return result


def _write_peft(peft_path: str, mods: Dict[str, Tuple[np.ndarray, np.ndarray]], pet: dict, base: str, num_layers):
    os.makedirs(peft_path, exist_ok=True)
    tensors = {}
    for mod, (a, b) in mods.items():
        tensors[f"base_model.model.{mod}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"base_model.model.{mod}.lora_B.weight"] = np.ascontiguousarray(b)
    save_safetensors(tensors, os.path.join(peft_path, "adapter_model.safetensors"), metadata={"format": "pt"})
    atomic_write_json(os.path.join(peft_path, "adapter_config.json"), {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": os.path.abspath(base),
        "r": pet["lora_rank"], "lora_alpha": pet["lora_alpha"], "lora_dropout": pet["lora_dropout"],
        "target_modules": peft_target_modules(list(mods), num_layers), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
    })
