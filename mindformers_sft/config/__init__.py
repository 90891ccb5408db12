"""Run configuration: YAML (MindFormers sections) + `--options key.sub=value` + flags -> validated `Config`.

Unknown keys are errors that name the file, line and the closest valid key. Everything is checked
here, before anything is compiled or loaded.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib

import yaml

from ..errors import ConfigError
from .schema import APPLIED_ON_ASCEND, CALLBACKS, DATASET, EXTRA, HANDLERS, LOADERS, NO_EFFECT_OFF_ASCEND, NOT_ACTED_ON, OPEN, SCHEMA
from .model_config import KEY_ALIASES, LlamaConfig
from .model_names import translate as translate_model_config
from .value_types import check_model_config, check_model_keys, check_union
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
            if schema.get(EXTRA):
                continue      # passed on (HFDataLoader -> datasets)
            raise ConfigError(f"{where(user, k)}: unknown key '{name}'{_closest(k, schema)}")
        sub = schema[k]
        if sub is OPEN or sub == OPEN:
            continue
        if name == "model.model_config":
            check_model_config(user, v)   # value types; keys are checked by LlamaConfig.from_dict
            continue
        if name == "callbacks":
            _check_callbacks(user, v)
            continue
        if name.endswith("data_loader.handler") and v is not None:
            _check_handlers(user, v, name)
            continue
        if sub is None:
            check_union(user, k, name, v)
        if isinstance(sub, dict) and sub and isinstance(v, dict):
            _check(v, sub, name)
            continue
        if not _type_ok(sub, v):
            raise ConfigError(f"{where(user, k)}: '{name}' expects {type(sub).__name__}, got {v!r}")


def _check_callbacks(parent, cbs):
    _check_typed_list(parent, "callbacks", cbs, "callbacks", CALLBACKS, "callback type")


def _check_handlers(parent, steps, name):
    """HFDataLoader handler steps: a {type: ...} or a list of them; types and keys by MindFormers' names."""
    _check_typed_list(parent, "handler", [steps] if isinstance(steps, dict) else steps, name, HANDLERS, "handler")


def _check_typed_list(parent, key, items, name, table, what):
    """A list of {type: T, key: value, ...} entries: T one of `table`, keys (and their types) those of table[T]."""
    if not isinstance(items, list):
        raise ConfigError(f"{where(parent, key)}: '{name}' expects a list of {{type: ...}} entries")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "type" not in item:
            raise ConfigError(f"{where(parent, key)}: {name}[{i}] needs a 'type' key")
        t = item["type"]
        if t not in table:
            extra = f" ({what}s: {', '.join(table)})" if what == "handler" else ""
            raise ConfigError(f"{where(item, 'type')}: unknown {what} '{t}'{_closest(t, table)}{extra}")
        keys = table[t]
        if keys == OPEN:
            continue      # handlers: a datasets.Dataset method, its arguments checked against its signature when run
        for k, v in item.items():
            if k == "type":
                continue
            if k not in keys:
                raise ConfigError(f"{where(item, k)}: unknown key '{name}[{i}].{k}' for {t}{_closest(k, keys)}")
            if not _type_ok(keys[k], v):
                raise ConfigError(f"{where(item, k)}: '{name}[{i}].{k}' expects {type(keys[k]).__name__}, got {v!r}")


def _schema_for(user) -> dict:
    """SCHEMA with the data_loader layout of the loader type each dataset section names."""
    schema = dict(SCHEMA)
    for sec in ("train_dataset", "eval_dataset"):
        dl = user.get(sec, {}).get("data_loader") if isinstance(user.get(sec), dict) else None
        if isinstance(dl, dict) and isinstance(dl.get("type"), str) and dl["type"] in LOADERS:
            schema[sec] = dict(DATASET, data_loader=LOADERS[dl["type"]])
    return schema


def _user_keys(d, prefix="") -> set:
    out = set()
    for k, v in d.items():
        name = f"{prefix}{k}"
        out.add(name)
        if isinstance(v, dict):
            out |= _user_keys(v, name + ".")
    return out


def no_effect_lines(cfg, device: str) -> list:
    """Log lines naming the MindFormers keys this config sets that do nothing on `device` (printed once)."""
    keys = getattr(cfg, "user_keys", set())

    def value(dotted):
        node = cfg
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def listed(table):
        out = []
        for k, neutral in table.items():
            v = value(k)
            if k not in keys or v in (None, False, "", {}, []) or (neutral is not None and v == neutral):
                continue
            out += [f"{k}.{sub}" for sub in v] if isinstance(v, dict) and k.startswith("context.") else [k]
        return out
    lines = []
    off = listed(NO_EFFECT_OFF_ASCEND) + [f"model.model_config.{k}" for k in getattr(cfg, "model_config_dropped", ())
                                          if f"model.model_config.{k}" not in NO_EFFECT_OFF_ASCEND]
    if device == "Ascend":
        off = [k for k in off if k not in APPLIED_ON_ASCEND and k.rsplit(".", 1)[0] not in APPLIED_ON_ASCEND]
        if off:
            lines.append(f"[config] accepted, not applied by this suite: {', '.join(sorted(set(off)))}")
    elif off:
        lines.append(f"[config] accepted, no effect on this device ({device}): {', '.join(sorted(set(off)))}")
    idle = listed(NOT_ACTED_ON)
    if idle:
        lines.append(f"[config] accepted, not acted on by this suite: {', '.join(idle)}")
    return lines


def _merge(defaults, user):
    if isinstance(defaults, dict) and defaults != OPEN and isinstance(user, dict):
        out = {k: copy.deepcopy(v) for k, v in defaults.items() if k != EXTRA}
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
    task = user.get("train_dataset_task")
    if "train_dataset" not in user and isinstance(task, dict) and isinstance(task.get("dataset_config"), dict):
        user["train_dataset"] = task["dataset_config"]      # MindFormers builds the dataset from the task's config
    schema = _schema_for(user)
    _check(user, schema, "")
    mc = (user.get("model") or {}).get("model_config")
    merged = _merge(schema, user)
    if merged.get("use_legacy") is not False:
        check_model_keys(mc)
    dropped = []
    if merged.get("use_legacy") is False and mc:
        mc, dropped = translate_model_config(dict(mc), [f.name for f in dataclasses.fields(LlamaConfig)], KEY_ALIASES)
    merged["model"]["model_config"] = mc
    cfg = Config.wrap(merged)
    object.__setattr__(cfg, "user_keys", _user_keys(user))
    object.__setattr__(cfg, "model_config_dropped", dropped)
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
    if cfg.load_ckpt_format not in CKPT_FORMATS:
        raise ConfigError(f"load_ckpt_format: '{cfg.load_ckpt_format}' is not one of {', '.join(CKPT_FORMATS)}"
                          f"{_closest(cfg.load_ckpt_format, CKPT_FORMATS)}")
    if cfg.trainer.type not in TRAINERS:
        raise ConfigError(f"trainer.type: '{cfg.trainer.type}' is not supported; expected {', '.join(TRAINERS)}"
                          f"{_closest(cfg.trainer.type, TRAINERS)}")
    for key in ("train_dataset_task", "eval_dataset_task"):
        task = cfg.get(key)
        if isinstance(task, dict) and task.get("type") not in (None,) + DATASET_TASKS:
            raise ConfigError(f"{key}.type: '{task['type']}' is not supported; expected "
                              f"{', '.join(DATASET_TASKS)}{_closest(task['type'], DATASET_TASKS)}")
    _check_dataset_strategy(cfg)
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


def _check_dataset_strategy(cfg):
    """parallel.dataset_strategy: one [data_parallel, 1, ...] entry per train_dataset.input_columns column (MindFormers'
    rule); every rank then reads its own data-parallel slice of each column, as the trainer does."""
    par = cfg.get("parallel")
    ds = par.get("dataset_strategy") if isinstance(par, dict) else None
    if ds is None or isinstance(ds, str):
        return
    cols = cfg.train_dataset.input_columns or []
    if not isinstance(ds, list) or len(ds) != len(cols):
        raise ConfigError(f"parallel.dataset_strategy has {len(ds) if isinstance(ds, list) else ds!r} entries but "
                          f"train_dataset.input_columns has {len(cols)} ({', '.join(cols)}): one per column")
    dp = cfg.parallel_config.data_parallel
    for i, s in enumerate(ds):
        if not isinstance(s, list) or not s or s[0] != dp or any(x != 1 for x in s[1:]):
            raise ConfigError(f"parallel.dataset_strategy[{i}] ({cols[i]}) is {s!r}; expected [{dp}, 1] "
                              f"(split by data_parallel {dp} on the batch dimension only)")


CKPT_FORMATS = ("ckpt", "safetensors")
DATASET_TASKS = ("CausalLanguageModelDataset",)
TRAINERS = ("CausalLanguageModelingTrainer",)
RUN_MODES = ("train", "finetune", "eval", "predict", "chat", "plan", "serve")
OPTIMIZERS = ("AdamW", "AdamWeightDecay", "FP32StateAdamWeightDecay", "adamw")
LR_SCHEDULES = ("CosineWithWarmUpLR", "LinearWithWarmUpLR", "ConstantWarmUpLR", "constant", "cosine", "linear",
                "CosineWithRestartsAndWarmUpLR", "PolynomialWithWarmUpLR")
