"""Model architectures by the `model.arch.type` name of a YAML. `--register_path DIR` imports DIR, whose
__init__.py may call `register_arch` (see research/qwen2_5)."""
from __future__ import annotations

import difflib

from ..errors import ConfigError

# arch name -> model_type (models.FAMILIES picks the class). Qwen3 / Qwen3-MoE are built in, as in MindFormers 1.8
ARCHS = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe"}


def register_arch(name: str, model_type: str):
    from .config import MODEL_TYPES
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"register_arch('{name}'): model_type must be one of {list(MODEL_TYPES)}, "
                          f"got '{model_type}'")
    ARCHS[name] = model_type


def arch_model_type(name: str) -> str:
    if name not in ARCHS:
        close = difflib.get_close_matches(name, list(ARCHS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        qwen = (" (Qwen2.5 archs are registered by --register_path research/qwen2_5)"
                if "qwen2" in name.lower() else "")
        raise ConfigError(f"model.arch.type: unknown architecture '{name}'{hint}{qwen}; known: {sorted(ARCHS)}")
    return ARCHS[name]
