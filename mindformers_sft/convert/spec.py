"""Model configs of a conversion: the --model family, an HF config.json or MindFormers YAML, and where the config
of MindFormers weights is found (sidecar ``<stem>.config.json``, safetensors metadata, ``config.json`` beside).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from ..checkpoint import file_format, safetensors_metadata
from ..errors import ConfigError
from ..config.model_config import LlamaConfig

HF_CONFIG_METADATA_KEY = "hf_config"
# --model value -> LlamaConfig.model_type. qwen2 and qwen2_5 are one family (Qwen2 with q/k/v bias).
FAMILIES = {"llama": "llama", "llama2": "llama", "llama3": "llama", "qwen2": "qwen2", "qwen2_5": "qwen2",
            "qwen2.5": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "qwen3-moe": "qwen3_moe"}


def model_family(model: Optional[str]) -> Optional[str]:
    """LlamaConfig.model_type of a --model value (llama | qwen2 | qwen2_5 | qwen3 | qwen3_moe); None stays None."""
    if model is None:
        return None
    fam = FAMILIES.get(str(model).strip().lower())
    if fam is None:
        raise ConfigError(f"--model: '{model}' is not supported; expected one of llama, qwen2, qwen2_5, qwen3, "
                          "qwen3_moe")
    return fam


def sidecar_config_path(weights_path: str) -> str:
    """Where the model config of a MindFormers weight file lives: ``dir/llama.ckpt`` -> ``dir/llama.config.json``."""
    stem, _ = os.path.splitext(os.path.abspath(weights_path))
    return stem + ".config.json"


@dataclass
class ModelSpec:
    config: LlamaConfig
    hf_config: dict            # the config.json to write on the HF side (verbatim when the source was one)
    source: str                # file the config came from (for messages)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


def spec_from_hf_dict(hf: dict, source: str, family: Optional[str],
                      weight_layout: Optional[dict] = None) -> ModelSpec:
    """weight_layout: the fused-tensor layout a training checkpoint's meta.json records (config.json has none)."""
    cfg = LlamaConfig.from_hf_config(hf, **(weight_layout or {}))  # errors name config.json
    if family is not None and cfg.model_type != family:
        raise ConfigError(f"{source}: model_type '{hf.get('model_type', 'llama')}' does not match "
                          f"--model (family '{family}')")
    return ModelSpec(cfg, dict(hf), source)


def load_model_config(path: str, model: Optional[str] = None) -> ModelSpec:
    """A model config from an HF ``config.json`` (file or its directory) or a MindFormers YAML
    (``model: model_config: {...}``); `model` (the --model family) fills in / checks ``model_type``."""
    family = model_family(model)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    if path.lower().endswith((".yaml", ".yml")):
        import yaml
        try:
            with open(path, encoding="utf-8") as f:
                d = yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
        mc = None
        if isinstance(d, dict):
            m = d.get("model")
            if isinstance(m, dict) and isinstance(m.get("model_config"), dict):
                mc = m["model_config"]
            elif isinstance(d.get("model_config"), dict):
                mc = d["model_config"]
            elif "num_layers" in d and "hidden_size" in d:
                mc = d
        if mc is None:
            raise ConfigError(f"{path}: no 'model: model_config:' section")
        mc = dict(mc)
        if family is not None:
            if mc.get("model_type", family) != family:
                raise ConfigError(f"{path}: model.model_config.model_type '{mc['model_type']}' does not match "
                                  f"--model (family '{family}')")
            mc["model_type"] = family
        try:
            cfg = LlamaConfig.from_dict(mc, where=f"{path}: model.model_config")
        except TypeError as e:
            raise ConfigError(f"{path}: model.model_config: {e}") from None
        return ModelSpec(cfg, cfg.to_hf_config(), path)
    hf = _read_json(path)
    try:
        return spec_from_hf_dict(hf, path, family)
    except ConfigError as e:
        msg = str(e)
        if msg.startswith("config.json:"):
            msg = path + msg[len("config.json"):]
        raise ConfigError(msg) from None


def find_config_for_mf(files: Sequence[str], input_path: str, model: Optional[str]) -> ModelSpec:
    for p in files:
        side = sidecar_config_path(p)
        if os.path.isfile(side):
            return load_model_config(side, model)
    for p in files:
        if file_format(p) == "safetensors":
            meta = safetensors_metadata(p) or {}
            if HF_CONFIG_METADATA_KEY in meta:
                try:
                    hf = json.loads(meta[HF_CONFIG_METADATA_KEY])
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{p}: metadata '{HF_CONFIG_METADATA_KEY}' is not valid JSON ({e.msg})") \
                        from None
                return spec_from_hf_dict(hf, f"{p} (metadata)", model_family(model))
    d = input_path if os.path.isdir(input_path) else os.path.dirname(os.path.abspath(input_path))
    cj = os.path.join(d, "config.json")
    if os.path.isfile(cj):
        return load_model_config(cj, model)
    raise ConfigError(f"{input_path}: no model config found (no {os.path.basename(sidecar_config_path(files[0]))} "
                      "sidecar, no config in the file's metadata, no config.json beside it); pass --config "
                      "with an HF config.json or a MindFormers YAML")


# MindFormers 1.8 reverse-conversion flags (toolkit/weight_convert/qwen3*/reverse_*.py) -> LlamaConfig fields.
# The architecture here comes from the model config; these flags, when given, must agree with it.
MF_ARCH_FLAGS = {"num_layers": "num_layers", "num_attention_heads": "num_heads", "num_query_groups": "n_kv_heads",
                 "kv_channels": "head_dim", "hidden_size": "hidden_size", "ffn_hidden_size": "intermediate_size",
                 "num_routed_experts": "num_experts", "moe_ffn_hidden_size": "moe_intermediate_size"}


def apply_flags(spec: ModelSpec, qkv_concat: Optional[bool] = None, arch: Optional[dict] = None) -> ModelSpec:
    """--qkv_concat (Qwen3: fused linear_qkv / linear_fc1 or split linear_q/k/v, gating/hidden; Llama: only
    the separate wq/wk/wv layout) and MindFormers' architecture flags, checked against `spec`."""
    cfg = spec.config
    if qkv_concat is not None:
        if cfg.is_qwen3:
            cfg.qkv_concat = qkv_concat
        elif qkv_concat:
            raise ConfigError("--qkv_concat: concatenated q/k/v (w_qkv) weights are not supported for "
                              f"{cfg.model_type}; the separate wq/wk/wv layout is written")
    for flag, value in (arch or {}).items():
        have = getattr(cfg, MF_ARCH_FLAGS[flag])
        if value is not None and value != have:
            raise ConfigError(f"--{flag} {value} disagrees with {spec.source} ({MF_ARCH_FLAGS[flag]} = {have})")
    return spec
