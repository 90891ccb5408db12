"""Build a run's pieces from a validated Config: device context, model config, the model with its weights
(+ LoRA), the tokenizer, and the generation settings and prompt template of predict / chat / serve. run.py
composes them into runs; serving/, evaluation/, pretrained.py and tools/ reuse them from here."""
from __future__ import annotations

import glob
import importlib
import os
import sys

from .errors import ConfigError, SFTError


def register(path: str):
    """Import a `--register_path` directory (e.g. research/qwen2_5) so it can register architectures."""
    p = os.path.abspath(path)
    if not os.path.isdir(p) or not os.path.isfile(os.path.join(p, "__init__.py")):
        raise ConfigError(f"--register_path {path}: expected a directory with an __init__.py")
    parent, name = os.path.split(p)
    pkg_parent, pkg = os.path.split(parent)
    sys.path.insert(0, pkg_parent)
    sys.path.insert(0, parent)
    importlib.import_module(f"{pkg}.{name}" if os.path.isfile(os.path.join(parent, "__init__.py")) else name)


DEVICE_NODES = {"Ascend": "/dev/davinci[0-9]*", "GPU": "/dev/nvidia[0-9]*"}


def setup_context(cfg):
    import mindspore as ms
    from .parallel import init_parallel
    target = cfg.context.device_target
    if target in DEVICE_NODES and cfg.run_mode != "plan" and not glob.glob(DEVICE_NODES[target]):
        # before MindSpore loads its device plugins (which fail noisily, or deep inside, without the hardware)
        raise ConfigError(f"context.device_target is {target}, but this machine has no {target} device "
                          f"({DEVICE_NODES[target]} is absent); pass --device_target CPU "
                          "(or --options context.device_target=CPU)")
    if not target:
        target = "Ascend" if ms.hal.is_available("Ascend") else "CPU"
    if target != "CPU" and not ms.hal.is_available(target):
        if cfg.run_mode == "plan":
            target = "CPU"      # planning needs no device
        else:
            raise ConfigError(f"context.device_target is {target}, but no {target} device is available on this "
                              "machine; pass --device_target CPU (or --options context.device_target=CPU)")
    cfg.context.device_target = target
    from .config import no_effect_lines
    for line in no_effect_lines(cfg, target):
        if os.environ.get("RANK_ID", "0") in ("0", ""):
            print(line)
    ms.set_device(target)
    ms.set_context(mode=ms.PYNATIVE_MODE)   # mode 0 compiles the train step with mindspore.jit
    if target == "CPU":
        ms.runtime.launch_blocking()        # PyNative on CPU: synchronous launch is ~10x faster here
    if cfg.context.max_call_depth:
        ms.set_context(max_call_depth=cfg.context.max_call_depth)
    ms.set_seed(int(cfg.seed))
    return init_parallel(cfg)


def model_config(cfg, log=print):
    from .config.model_config import LlamaConfig
    from .models.registry import arch_model_type
    mc = dict(cfg.model.model_config or {})
    arch_type = arch_model_type(cfg.model.arch.type)
    base = _checkpoint_architecture(cfg.load_checkpoint)
    if base is not None:
        # the weights' own config (HF config.json, or the one a training checkpoint recorded) describes the
        # architecture; YAML model_config keys override it
        d = base.to_dict()
        d.update(mc)
        conf = LlamaConfig.from_dict(d)
    elif mc:
        missing = [k for k in ("vocab_size", "hidden_size", "num_layers", "num_heads") if k not in mc]
        if missing:
            raise ConfigError(f"model.model_config lacks {', '.join(missing)} and load_checkpoint "
                              f"('{cfg.load_checkpoint}') records no architecture: say what model to build")
        mc.setdefault("model_type", arch_type if arch_type != "llama" else
                      ("qwen2" if mc.get("qkv_has_bias") else "llama"))
        conf = LlamaConfig.from_dict(mc)
    else:
        raise ConfigError("model.model_config is missing and load_checkpoint is not a Hugging Face directory: "
                          "nothing says what model to build")
    if cfg.context.device_target == "CPU":
        for k in ("compute_dtype", "softmax_compute_type", "rotary_dtype", "param_init_type"):
            if getattr(conf, k) != "float32":
                log(f"[config] model_config.{k}: {getattr(conf, k)} has no CPU kernels; using float32 on CPU")
                setattr(conf, k, "float32")
    return conf


def _checkpoint_architecture(path):
    """LlamaConfig recorded with the weights at `path` (HF config.json, or a training checkpoint's meta.json), or None."""
    from .checkpoint.loading import is_hf_dir, resolve
    from .config.model_config import LlamaConfig
    if not path or not os.path.exists(path):
        return None
    if is_hf_dir(path):
        return LlamaConfig.from_hf_config(path)
    try:
        _, _, entry = resolve(path, warn=lambda *a: None)
    except SFTError:
        return None
    if entry and entry.get("hf_config"):
        return LlamaConfig.from_hf_config(entry["hf_config"], **(entry.get("weight_layout") or {}))
    if entry and entry.get("base_checkpoint"):
        return _checkpoint_architecture(entry["base_checkpoint"])
    return None


def build_model(cfg, rank=0, log=print):
    """The model with --load_checkpoint weights and, if pet_config is set, LoRA adapters."""
    from .checkpoint.loading import read_weights
    from .models import build_model as build_family_model, load_state_dict
    conf = model_config(cfg, log)
    model = build_family_model(conf)     # the family's class by conf.model_type (models.FAMILIES)
    adapters = {}
    if cfg.load_checkpoint:
        base, adapters, src = read_weights(cfg.load_checkpoint, rank, warn=log, config=conf)
        load_state_dict(model, base, strict=True, source=src)
        log(f"[model] loaded {len(base)} tensors from {src}")
    elif cfg.run_mode in ("finetune", "eval", "predict", "chat", "serve"):
        raise ConfigError(f"run_mode {cfg.run_mode} needs load_checkpoint (pretrained weights); "
                          "use run_mode train to start from random weights")
    n = recompute_layers(cfg.recompute_config.recompute, conf.num_layers)
    for layer in model.decoder_layers()[:n]:
        layer.recompute()   # activations of these layers are recomputed in the backward pass (graph mode)
    if conf.pet_config:
        from .pet.lora import apply_lora
        names = apply_lora(model, conf.pet_config)
        log(f"[lora] rank {conf.pet_config.get('lora_rank')} on {len(names)} layers; "
            f"trainable {sum(p.size for p in model.trainable_params())} of "
            f"{sum(p.size for p in model.get_parameters())} parameters")
        if adapters:
            load_state_dict(model, adapters, strict=False, source=cfg.load_checkpoint)
            log(f"[lora] loaded {len(adapters)} adapter tensors")
    elif adapters:
        raise ConfigError(f"{cfg.load_checkpoint} holds LoRA adapters but model_config.pet_config is not set")
    if cfg.use_parallel:
        from .parallel.strategies import apply_strategies
        apply_strategies(model, cfg.parallel_config)   # semi-auto parallel (Ascend) only; a no-op for data parallel
    return model


def recompute_layers(recompute, num_layers) -> int:
    """recompute_config.recompute: True (every layer), False, or MindFormers' per-stage list of layer counts."""
    if isinstance(recompute, bool) or recompute is None:
        return num_layers if recompute else 0
    if isinstance(recompute, int):
        return min(recompute, num_layers)
    if isinstance(recompute, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in recompute):
        return min(sum(recompute), num_layers)
    raise ConfigError(f"recompute_config.recompute: expected True/False or a list of layer counts per stage, "
                      f"got {recompute!r}")


def tokenizer_path(cfg) -> str:
    tok = cfg.processor.tokenizer
    for p in (tok.path, tok.tokenizer_file, tok.vocab_file, cfg.train_dataset.data_loader.tokenizer):
        if p:
            return p
    for recorded, d in _checkpoint_sources(cfg.load_checkpoint):
        if recorded and os.path.exists(recorded):
            return recorded
        if d and any(os.path.isfile(os.path.join(d, f)) for f in TOKENIZER_FILES):
            return d
    raise ConfigError("no tokenizer: set processor.tokenizer.vocab_file (or --vocab_file)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _checkpoint_sources(path, depth=0):
    """(tokenizer recorded by the training run, directory) for `path` and, for a training checkpoint, the base
    weights it was trained from (meta.json's base_checkpoint), where the tokenizer files usually are."""
    from .checkpoint.loading import resolve
    if not path or not os.path.exists(path) or depth > 4:
        return
    entry = None
    try:
        _, _, entry = resolve(path, warn=lambda *a: None)
    except SFTError:
        pass
    yield (entry or {}).get("tokenizer"), path if os.path.isdir(path) else None
    if entry and entry.get("base_checkpoint"):
        yield from _checkpoint_sources(entry["base_checkpoint"], depth + 1)


def check_tokenizer(cfg, model_conf):
    """The tokenizer must fit the model: every id it can produce is a row of the embedding."""
    from .tokenizer import load_tokenizer
    path = tokenizer_path(cfg)
    tok = load_tokenizer(path)
    if tok.vocab_size > model_conf.vocab_size:
        raise ConfigError(f"{path}: the tokenizer has {tok.vocab_size} tokens but model_config.vocab_size is "
                          f"{model_conf.vocab_size}: wrong tokenizer for this model (processor.tokenizer.vocab_file)")
    return tok


def _generation(cfg, predict, log):
    """Model, tokenizer, template and sampling settings shared by predict and chat."""
    model = build_model(cfg, 0, log)
    model.set_train(False)
    tok = check_tokenizer(cfg, model.config)
    mc = model.config
    template = _predict_template(cfg, predict.get("chat_template"), tok)
    gen = dict(max_new_tokens=predict.get("max_new_tokens", mc.max_decode_length),
               do_sample=predict.get("do_sample", mc.do_sample), temperature=predict.get("temperature", mc.temperature),
               top_k=predict.get("top_k", mc.top_k), top_p=predict.get("top_p", mc.top_p))
    return model, tok, template, gen


def _predict_template(cfg, name, tok):
    """Template for predict prompts: --chat_template, else the training data's template (SFTDataLoader);
    'none' (or no template) sends the prompt as it is."""
    dl = cfg.train_dataset.data_loader
    if name is None and dl.type == "SFTDataLoader":
        name = dl.template
    if name is None and dl.type == "HFDataLoader":
        from .data.handlers import training_template
        name = training_template(dl.get("handler"))
    if not name or str(name).lower() == "none":
        return None
    from .data.templates import get_template
    return get_template(name, tok)
