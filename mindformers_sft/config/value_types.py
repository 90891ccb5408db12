"""Value types the schema's defaults cannot tell: keys whose default is None (several kinds allowed) and the
model_config / pet_config fields (checked here against LlamaConfig's defaults, before the model is built)."""
from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from .model_config import KEY_ALIASES, MINDFORMERS_IGNORED_KEYS, LlamaConfig
from .yaml_lines import where

# keys with a None default -> the kinds of value they take
UNION_TYPES = {"resume_training": (bool, str), "seq_length": (int,), "context.device_target": (str,), "data_loader.pack": (bool, str)}
PET_TYPES = {"pet_type": str, "lora_rank": int, "lora_alpha": (int, float), "lora_dropout": (int, float),
             "target_modules": (str, list)}


_OPTIONAL = {"Optional[int]": 0, "Optional[float]": 0.0, "Optional[str]": "", "Optional[bool]": False}


def _kinds(t) -> str:
    return " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))


def _is(value, t) -> bool:
    ts = t if isinstance(t, tuple) else (t,)
    if isinstance(value, bool):
        return bool in ts
    if isinstance(value, int) and float in ts:
        return True
    return isinstance(value, ts)


def check_union(parent, key, name: str, value):
    """ConfigError when `value` of a None-default key `name` is not one of the kinds it takes."""
    t = next((t for k, t in UNION_TYPES.items() if name == k or name.endswith("." + k)), None)
    if t is not None and value is not None and not _is(value, t):
        raise ConfigError(f"{where(parent, key)}: '{name}' expects {_kinds(t)}, got {value!r}")


def check_model_config(parent, mc):
    """Types of model.model_config values against LlamaConfig's field defaults (unknown keys are left to
    LlamaConfig.from_dict, which names the closest key)."""
    if mc is None:
        return
    if not isinstance(mc, dict):
        raise ConfigError(f"{where(parent, 'model_config')}: 'model.model_config' expects a mapping, got {mc!r}")
    fields = {f.name: f for f in dataclasses.fields(LlamaConfig)}
    for k, v in mc.items():
        f = fields.get(KEY_ALIASES.get(k, k))
        d = f.default if f is not None else dataclasses.MISSING
        if d is None:       # Optional[int] / Optional[float] / Optional[str] fields: the annotation tells
            d = _OPTIONAL.get(str(f.type).replace("typing.", ""), dataclasses.MISSING)
        if v is None or d is dataclasses.MISSING:
            continue
        t = bool if isinstance(d, bool) else (int, float) if isinstance(d, (int, float)) else type(d)
        if not _is(v, t):
            raise ConfigError(f"{where(mc, k)}: 'model.model_config.{k}' expects {_kinds(t)}, got {v!r}")
    pet = mc.get("pet_config")
    if pet is None:
        return
    if not isinstance(pet, dict):
        raise ConfigError(f"{where(mc, 'pet_config')}: 'model.model_config.pet_config' expects a mapping, got {pet!r}")
    for k, v in pet.items():
        if k in PET_TYPES and v is not None and not _is(v, PET_TYPES[k]):
            raise ConfigError(f"{where(pet, k)}: 'model.model_config.pet_config.{k}' expects {_kinds(PET_TYPES[k])}, "
                              f"got {v!r}")


def check_model_keys(mc):
    """Unknown model.model_config keys (legacy names), with the file:line and the closest key; the same keys
    LlamaConfig.from_dict accepts."""
    if not isinstance(mc, dict):
        return
    import difflib
    known = {f.name for f in dataclasses.fields(LlamaConfig)} - {"extra"}
    known |= set(KEY_ALIASES) | set(MINDFORMERS_IGNORED_KEYS) | {"type"}
    for k in mc:
        if k not in known:
            close = difflib.get_close_matches(str(k), sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where(mc, k)}: unknown key 'model.model_config.{k}'{hint}")
