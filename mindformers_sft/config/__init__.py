"""Run configuration: YAML (MindFormers sections) + `--options key.sub=value` + flags -> validated `Config`.

Unknown keys are errors that name the file, line and the closest valid key. Everything is checked
here, before anything is compiled or loaded.
"""
from __future__ import annotations

import copy
import difflib

import yaml

from ..errors import ConfigError
from .schema import CALLBACKS, OPEN, SCHEMA
from .yaml_lines import LineDict, load_yaml, parse_value, where


class Config(dict):
    """A dict whose keys are also attributes (as MindFormers' MindFormerConfig)."""

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k) from None

    def __setattr__(self, k, v):
        self[k] = v

    @classmethod
    def wrap(cls, v):
        if isinstance(v, dict):
            return cls({k: cls.wrap(x) for k, x in v.items()})
        if isinstance(v, list):
            return [cls.wrap(x) for x in v]
        return v

    def to_plain(self):
        def plain(v):
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, list):
                return [plain(x) for x in v]
            return v
        return plain(self)


def _closest(key, options):
    close = difflib.get_close_matches(str(key), [str(o) for o in options], n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_ok(default, value):
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        return isinstance(value, list)
    if isinstance(default, dict):
        return isinstance(value, dict)
    return True


def _check(user: dict, schema: dict, path: str):
    """Raise ConfigError for unknown keys / wrong types in `user` against `schema`."""
    for k, v in user.items():
        name = f"{path}.{k}" if path else str(k)
        if k not in schema:
            raise ConfigError(f"{where(user, k)}: unknown key '{name}'{_closest(k, schema)}")
        sub = schema[k]
        if sub is OPEN or sub == OPEN:
            continue
        if name == "model.model_config":
            continue  # checked by LlamaConfig.from_dict
        if name == "callbacks":
            _check_callbacks(user, v)
            continue
        if isinstance(sub, dict) and sub and isinstance(v, dict):
            _check(v, sub, name)
            continue
        if not _type_ok(sub, v):
            raise ConfigError(f"{where(user, k)}: '{name}' expects {type(sub).__name__}, got {v!r}")


def _check_callbacks(parent, cbs):
    if not isinstance(cbs, list):
        raise ConfigError(f"{where(parent, 'callbacks')}: 'callbacks' expects a list of {{type: ...}} entries")
    for i, cb in enumerate(cbs):
        if not isinstance(cb, dict) or "type" not in cb:
            raise ConfigError(f"{where(parent, 'callbacks')}: callbacks[{i}] needs a 'type' key")
        t = cb["type"]
        if t not in CALLBACKS:
            raise ConfigError(f"{where(cb, 'type')}: unknown callback type '{t}'{_closest(t, CALLBACKS)}")
        keys = CALLBACKS[t]
        if keys == OPEN:
            continue
        for k, v in cb.items():
            if k == "type":
                continue
            if k not in keys:
                raise ConfigError(f"{where(cb, k)}: unknown key 'callbacks[{i}].{k}' for {t}{_closest(k, keys)}")
            if not _type_ok(keys[k], v):
                raise ConfigError(f"{where(cb, k)}: 'callbacks[{i}].{k}' expects {type(keys[k]).__name__}, got {v!r}")


def _merge(defaults, user):
    if isinstance(defaults, dict) and defaults != OPEN and isinstance(user, dict):
        out = {k: copy.deepcopy(v) for k, v in defaults.items()}
        for k, v in user.items():
            out[k] = _merge(defaults.get(k), v) if k in defaults else v
        return out
    if user is None and defaults is not None and defaults != OPEN:
        return copy.deepcopy(defaults)
    return user if user is not None or defaults == OPEN else copy.deepcopy(defaults)


def parse_option(opt: str):
    """'a.b.c=value' -> (['a','b','c'], value parsed as YAML)."""
    if "=" not in opt:
        raise ConfigError(f"--options '{opt}': expected key.sub=value")
    key, raw = opt.split("=", 1)
    try:
        value = parse_value(raw) if raw != "" else ""
    except (yaml.YAMLError, ConfigError):
        value = raw
    return key.strip().split("."), value


def apply_option(cfg: dict, keys, value, source="--options"):
    node, schema_node = cfg, SCHEMA
    for i, k in enumerate(keys[:-1]):
        schema_node = schema_node.get(k) if isinstance(schema_node, dict) else None
        if not isinstance(node.get(k), dict):
            if schema_node is None and not (isinstance(node, dict) and k in node):
                parent = SCHEMA
                for kk in keys[:i]:
                    parent = parent.get(kk, {}) if isinstance(parent, dict) else {}
                raise ConfigError(f"{source} {'.'.join(keys)}: unknown key '{'.'.join(keys[:i + 1])}'"
                                  f"{_closest(k, parent if isinstance(parent, dict) else {})}")
            node[k] = LineDict()
        node = node[k]
    node[keys[-1]] = value
    if isinstance(node, LineDict):
        node.lines[keys[-1]] = f"{source} {'.'.join(keys)}"


def load_config(path: str = None, options=(), overrides: dict = None) -> Config:
    """Read a YAML (or start empty), apply --options and flag overrides, validate, fill defaults."""
    user = load_yaml(path) if path else LineDict()
    for opt in options or ():
        keys, value = parse_option(opt)
        apply_option(user, keys, value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            apply_option(user, dotted.split("."), value, source="flag")
    _check(user, SCHEMA, "")
    mc = (user.get("model") or {}).get("model_config")
    merged = _merge(SCHEMA, user)
    merged["model"]["model_config"] = mc
    cfg = Config.wrap(merged)
    _fill(cfg)
    return cfg


def _fill(cfg: Config):
    """Derived defaults, as MindFormers does them."""
    opt, lr = cfg.optimizer, cfg.lr_schedule
    if opt.betas is not None:
        if not (isinstance(opt.betas, list) and len(opt.betas) == 2):
            raise ConfigError(f"optimizer.betas: expected [beta1, beta2], got {opt.betas!r}")
        opt.beta1, opt.beta2 = opt.betas
    if lr.learning_rate is None:
        lr.learning_rate = opt.learning_rate
    if lr.min_lr is not None:
        lr.lr_end = lr.min_lr
    if cfg.run_mode not in RUN_MODES:
        raise ConfigError(f"run_mode: '{cfg.run_mode}' is not one of {', '.join(RUN_MODES)}"
                          f"{_closest(cfg.run_mode, RUN_MODES)}")
    rw = cfg.runner_wrapper
    if cfg.runner_config.gradient_accumulation_steps < 1:
        raise ConfigError("runner_config.gradient_accumulation_steps must be >= 1")
    if cfg.runner_config.batch_size < 1:
        raise ConfigError("runner_config.batch_size must be >= 1")
    if rw.max_grad_norm is not None and rw.max_grad_norm <= 0:
        raise ConfigError("runner_wrapper.max_grad_norm must be > 0")
    if opt.type not in OPTIMIZERS:
        raise ConfigError(f"optimizer.type: '{opt.type}' is not supported; expected one of "
                          f"{', '.join(OPTIMIZERS)}{_closest(opt.type, OPTIMIZERS)}")
    if lr.type not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule.type: '{lr.type}' is not supported; expected one of "
                          f"{', '.join(LR_SCHEDULES)}{_closest(lr.type, LR_SCHEDULES)}")


RUN_MODES = ("train", "finetune", "eval", "predict", "chat", "plan")
OPTIMIZERS = ("AdamW", "AdamWeightDecay", "FP32StateAdamWeightDecay", "adamw")
LR_SCHEDULES = ("CosineWithWarmUpLR", "LinearWithWarmUpLR", "ConstantWarmUpLR", "constant", "cosine", "linear",
                "CosineWithRestartsAndWarmUpLR", "PolynomialWithWarmUpLR")
