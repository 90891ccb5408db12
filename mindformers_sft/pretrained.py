"""MindFormers 1.6+ `pretrained_model_dir` (a Hugging Face directory) -> load_checkpoint, model_config and tokenizer
of a validated Config, before anything is built; `load_ckpt_format` checked against load_checkpoint; and
`from_hf_dir`, a model with its weights straight from a Hugging Face directory."""
from __future__ import annotations

import json
import os

from .errors import ConfigError


def resolve_pretrained(cfg, log=print):
    """MindFormers 1.6+ `pretrained_model_dir` (a Hugging Face directory): the architecture (its config.json, which
    model.model_config only overrides), the tokenizer (its tokenizer files) and, when load_checkpoint is empty,
    the weights (its safetensors, sharded or not), as MindFormers' trainer falls back to it."""
    from .checkpoint.loading import is_hf_dir
    d = cfg.get("pretrained_model_dir")
    if d:
        if not os.path.isdir(d):
            raise ConfigError(f"pretrained_model_dir: {d} is not a directory")
        if not os.path.isfile(os.path.join(d, "config.json")):
            raise ConfigError(f"pretrained_model_dir: {d} has no config.json (the model's architecture)")
        has_weights = is_hf_dir(d)
        if not cfg.load_checkpoint:
            if has_weights:
                cfg.load_checkpoint = d
                log(f"[model] load_checkpoint is empty: weights from pretrained_model_dir {d}")
            elif cfg.run_mode != "train":
                raise ConfigError(f"pretrained_model_dir: {d} has no *.safetensors weights and load_checkpoint is "
                                  f"empty: nothing to {cfg.run_mode} from (run_mode train starts from random weights)")
        _keep_tied(cfg, d, log)
        from .build import _checkpoint_architecture
        if _checkpoint_architecture(cfg.load_checkpoint) is None:
            from .config.model_config import LlamaConfig
            cfg.model.model_config = {**LlamaConfig.from_hf_config(d).to_dict(), **(cfg.model.model_config or {})}
        tok = cfg.processor.tokenizer
        if not (tok.path or tok.tokenizer_file or tok.vocab_file):
            names = ("tokenizer.json", "tokenizer.model", "vocab.json")
            if not any(os.path.isfile(os.path.join(d, n)) for n in names):
                raise ConfigError(f"pretrained_model_dir: {d} has no tokenizer ({', '.join(names)}); set "
                                  "processor.tokenizer.vocab_file")
            tok.vocab_file = d
    _check_ckpt_format(cfg)


def _keep_tied(cfg, d, log):
    """MindFormers' Qwen3 YAML unties the output layer (untie_embeddings_and_output_weights: True, right for the
    large models); small checkpoints with tied weights have no output layer to load: keep them tied, and say so."""
    mc = cfg.model.model_config or {}
    if mc.get("tie_word_embeddings") is not False or os.path.abspath(cfg.load_checkpoint or "") != os.path.abspath(d):
        return
    with open(os.path.join(d, "config.json"), encoding="utf-8") as f:
        tied = json.load(f).get("tie_word_embeddings", False)
    if tied:
        log(f"[model] model_config unties the output layer, but {d} has tied weights (no lm_head): kept tied")
        mc["tie_word_embeddings"] = True


def _check_ckpt_format(cfg):
    """load_ckpt_format (when the YAML sets it) must match a load_checkpoint file's form."""
    path, fmt = cfg.load_checkpoint, cfg.load_ckpt_format
    if "load_ckpt_format" not in getattr(cfg, "user_keys", ()) or not path or not os.path.isfile(path):
        return
    ext = os.path.splitext(path)[1].lstrip(".")
    if ext in ("ckpt", "safetensors") and ext != fmt:
        raise ConfigError(f"load_checkpoint {path} is a .{ext} file but load_ckpt_format is '{fmt}'; set "
                          f"load_ckpt_format: {ext}")


def from_hf_dir(path: str, **config_overrides):
    """Build from a Hugging Face directory: config.json plus its safetensors (single file or shards); the family
    comes from config.json's model_type."""
    from .checkpoint.loading import read_hf_dir
    from .config.model_config import LlamaConfig
    from .models import build_model, load_state_dict
    config = LlamaConfig.from_hf_config(path, **config_overrides)
    model = build_model(config)
    load_state_dict(model, read_hf_dir(path, config), strict=True, source=path)
    return model
