"""`--run_mode serve`: the fine-tuned model behind an OpenAI-compatible API and a web chat page.

    python run_mindformer.py --run_mode serve --config CONFIG --load_checkpoint CKPT [--host 127.0.0.1 --port 8000
                             --api_key KEY --chat_template NAME]

The prompt template is the one the model was fine-tuned with: --chat_template, else the one recorded with the
checkpoint's training run (OUTPUT/config_resolved.json beside OUTPUT/checkpoint), else the YAML's training data
template, else the tokenizer's own chat_template; `none` sends the last user message as it is.
"""
from __future__ import annotations

import json
import os

from ..errors import ConfigError

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def recorded_template(load_checkpoint) -> str:
    """The training data template recorded by the run that wrote `load_checkpoint` (its config_resolved.json, up
    to three directories above it), or None."""
    if not load_checkpoint:
        return None
    d = os.path.abspath(load_checkpoint)
    d = d if os.path.isdir(d) else os.path.dirname(d)
    for _ in range(4):
        path = os.path.join(d, "config_resolved.json")
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    loader = json.load(f).get("train_dataset", {}).get("data_loader", {})
            except (OSError, ValueError, AttributeError):
                return None
            return loader.get("template") if loader.get("type") in ("SFTDataLoader", "HFDataLoader") else None
        d = os.path.dirname(d)
    return None


def serving_template(cfg, flag, tok):
    """The template prompts are rendered with (see the module docstring)."""
    from ..data.templates import get_template
    from ..build import _predict_template
    if flag is not None:
        return _predict_template(cfg, flag, tok)
    name = recorded_template(cfg.load_checkpoint)
    if name:
        return get_template(name, tok)
    template = _predict_template(cfg, None, tok)
    if template is None and getattr(tok, "chat_template", None):
        template = get_template("auto", tok)
    return template


def model_name(load_checkpoint) -> str:
    """The served model id: the checkpoint's directory name (its training output's for OUTPUT/checkpoint)."""
    path = os.path.normpath(os.path.abspath(load_checkpoint or "model"))
    name = os.path.basename(path)
    if os.path.isfile(path):
        name = os.path.splitext(name)[0]
    while name in ("checkpoint", "rank_0") and os.path.dirname(path) != path:
        path = os.path.dirname(path)
        name = os.path.basename(path)
    return name


def main(cfg, predict: dict, host: str = None, port: int = None, api_key: str = None, max_batch: int = 8,
         log=print) -> int:
    import uvicorn
    from ..generation.engine import Engine
    from ..build import _generation
    from .app import create_app
    model, tok, _, _ = _generation(cfg, {k: v for k, v in predict.items() if k != "chat_template"}, log)
    template = serving_template(cfg, predict.get("chat_template"), tok)
    mc = model.config
    max_context = int(mc.seq_length or mc.max_position_embedding or 2048)
    engine = Engine(model, mc.eos_token_ids, max_batch=max_batch, max_context=max_context)
    name = model_name(cfg.load_checkpoint)
    app = create_app(engine, tok, template, name, api_key=api_key)
    host, port = host or DEFAULT_HOST, DEFAULT_PORT if port is None else int(port)
    if not 0 <= port < 65536:
        raise ConfigError(f"--port: expected 0..65535, got {port}")
    log(f"[serve] model '{name}' (template {template.name if template else 'none'}, context {max_context}, "
        f"batch {max_batch}) on http://{host}:{port}/  (chat page at /, API at /v1"
        f"{', API key required' if api_key else ''})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
