"""Compose a run from a validated Config: context -> model (+ weights, + LoRA) -> data -> train/eval/predict."""
from __future__ import annotations

import json
import os
import sys

# the builders live in build.py; _predict_template, recompute_layers and register are imported from here too
from .build import (_generation, _predict_template, build_model, check_tokenizer, model_config,  # noqa: F401
                    recompute_layers, register, setup_context, tokenizer_path)
from .errors import ConfigError


def _dataset(cfg, section_name):
    from .data import build_dataset
    section = cfg[section_name]
    seq = section.seq_length or cfg.model.model_config and cfg.model.model_config.get("seq_length") or 512
    if not _has_data(section):
        raise ConfigError(f"{section_name}.data_loader.dataset_dir is empty (or pass --{section_name}_dir)")
    return build_dataset(section.to_plain(), tokenizer_path(cfg), int(seq))


def _has_data(section) -> bool:
    dl = section.data_loader
    return bool(dl.dataset_dir or (dl.type == "HFDataLoader" and (dl.get("path") or dl.get("data_files"))))


def run(cfg, predict: dict = None):
    rank = setup_context(cfg)
    log = print if rank.is_main else (lambda *a, **k: None)
    from .pretrained import resolve_pretrained
    resolve_pretrained(cfg, log)
    from .parallel.plan import preflight
    preflight(cfg, model_config(cfg, log=lambda *a: None), rank, log=log)
    if cfg.run_mode == "plan":
        return 0
    os.makedirs(cfg.output_dir, exist_ok=True)
    _prepare_checkpoint(cfg, rank.rank, log)
    if rank.is_main:
        with open(os.path.join(cfg.output_dir, "config_resolved.json"), "w", encoding="utf-8") as f:
            json.dump(cfg.to_plain(), f, indent=2, default=str)
    if cfg.run_mode in ("train", "finetune"):
        return _train(cfg, rank, log)
    if cfg.run_mode == "eval":
        return _eval(cfg, rank, log, predict or {})
    if cfg.run_mode == "chat":
        if rank.world_size > 1:
            raise ConfigError("run_mode chat reads stdin in one process: run it with --use_parallel False")
        return _chat(cfg, predict or {}, log)
    if cfg.run_mode == "serve":
        return _serve(cfg, predict or {}, log)
    return _predict(cfg, predict or {}, log)


def _prepare_checkpoint(cfg, rank, log):
    """MindFormers' auto_trans_ckpt: a load_checkpoint of model/pipeline-parallel slices is assembled into one
    complete checkpoint (OUTPUT/transformed_checkpoint/rank_N/) with MindSpore's transform, and loaded from there.
    A complete checkpoint needs nothing: under semi-auto parallel (Ascend) MindSpore slices complete parameters
    for each rank's layout when it compiles; under data parallel every rank loads it whole."""
    from .checkpoint import transform
    src = cfg.load_checkpoint
    if not src or not os.path.isdir(src) or not transform.is_sliced(src, cfg.src_strategy_path_or_dir):
        if cfg.auto_trans_ckpt and src:
            log(f"[auto_trans_ckpt] {src} is a complete checkpoint: each rank takes its part of it as it loads")
        return
    if not cfg.auto_trans_ckpt:
        raise ConfigError(f"load_checkpoint {src} holds model/pipeline-parallel slices (rank_N/ of another layout): "
                          "set auto_trans_ckpt: True (and src_strategy_path_or_dir to its strategy files) to load "
                          "it, or merge it first with python -m mindformers_sft.tools.merge_ckpt")
    work = os.path.join(cfg.output_dir, "transformed_checkpoint", f"rank_{rank}")
    strategy = transform.find_strategy(cfg.src_strategy_path_or_dir, src, work)
    files = transform.rank_files(src, warn=log)
    out = os.path.join(work, "complete.ckpt")
    log(f"[auto_trans_ckpt] assembling {len(files)} rank slices of {src} ({strategy}) into {out}")
    transform.to_complete(src, strategy, out, warn=log)
    transform.write_meta(out, transform.meta_entry(files[0]), source=src)
    cfg.load_checkpoint = out


def _train(cfg, rank, log):
    from .trainer.loop import evaluate, train
    model = build_model(cfg, rank.rank, log)
    check_tokenizer(cfg, model.config)
    cfg.processor.tokenizer.vocab_file = os.path.abspath(tokenizer_path(cfg))   # recorded in meta.json
    train_ds = _dataset(cfg, "train_dataset")
    eval_ds = _dataset(cfg, "eval_dataset") if _has_data(cfg.eval_dataset) else None
    log(f"[data] {len(train_ds)} training samples" + (f", {len(eval_ds)} eval samples" if eval_ds else ""))
    res = train(cfg, model, train_ds, eval_ds, rank)
    if eval_ds is not None and rank.is_main:
        ev = evaluate(model, eval_ds, cfg.runner_config.batch_size)
        log(f"[eval] final: loss {ev['loss']:.6f} perplexity {ev['perplexity']:.3f}")
        _write_json(os.path.join(cfg.output_dir, "eval_results.json"), {"step": res.step, **ev})
    log(f"[done] {res.step} steps; last checkpoint {res.last_checkpoint or '(none: no CheckpointMonitor)'}")
    return 0


def _eval(cfg, rank, log, extra=None):
    if extra and extra.get("tasks"):
        return _eval_tasks(cfg, rank, log, extra)
    from .trainer.loop import evaluate
    model = build_model(cfg, rank.rank, log)
    check_tokenizer(cfg, model.config)
    section = "eval_dataset" if _has_data(cfg.eval_dataset) else "train_dataset"
    ds = _dataset(cfg, section)
    ev = evaluate(model, ds, cfg.runner_config.batch_size)
    log(f"[eval] {len(ds)} samples, {int(ev['tokens'])} tokens: loss {ev['loss']:.6f} "
        f"perplexity {ev['perplexity']:.3f}")
    if rank.is_main:
        _write_json(os.path.join(cfg.output_dir, "eval_results.json"), ev)
    return 0


def _predict(cfg, predict, log):
    from .generation.chat import prompt_ids, reply
    prompts = predict.get("predict_data")
    if not prompts:
        raise ConfigError("run_mode predict needs --predict_data \"your prompt\"")
    from .evaluation.predict_dataset import is_dataset_file
    if is_dataset_file(prompts):
        return _predict_dataset(cfg, predict, log)
    model, tok, template, gen = _generation(cfg, predict, log)
    for text in prompts:   # each prompt as a user turn in the template the model was fine-tuned with
        ids = prompt_ids(template, tok, [("user", text)])
        completion, out = reply(model, tok, ids, gen, model.config.eos_token_ids, cfg.seed)
        print(json.dumps({"prompt": text, "completion": completion, "tokens": out}, ensure_ascii=False))
    return 0


def _eval_tasks(cfg, rank, log, extra):
    """--run_mode eval --tasks: lm-evaluation-harness tasks on this model (evaluation/harness.py)."""
    if rank.world_size > 1:
        raise ConfigError("--tasks runs in one process: use --use_parallel False")
    from .evaluation.harness import parse_tasks, run_tasks
    from .evaluation.lm_eval_model import MindFormersLM
    names = parse_tasks(extra["tasks"])
    model = build_model(cfg, rank.rank, log)
    tok = check_tokenizer(cfg, model.config)
    lm = MindFormersLM(model=model, tokenizer=tok, seed=cfg.seed,
                       batch_size=extra.get("eval_batch_size") or cfg.runner_config.batch_size)
    run_tasks(lm, names, extra.get("num_fewshot"), extra.get("limit"), extra.get("include_path"),
              cfg.output_dir, log)
    return 0


def _predict_dataset(cfg, predict, log):
    """--run_mode predict --predict_data FILE: predictions and BLEU/ROUGE over a dataset (evaluation/)."""
    from .evaluation.predict_dataset import predict_file
    model, tok, template, gen = _generation(cfg, predict, log)
    dl = cfg.eval_dataset.data_loader if cfg.eval_dataset.data_loader.type == "SFTDataLoader" \
        else cfg.train_dataset.data_loader
    predict_file(predict["predict_data"][0], model, tok, template, gen, dl, cfg.output_dir, cfg.seed,
                 predict.get("predict_split"), predict.get("predict_limit"),
                 predict.get("eval_batch_size") or cfg.runner_config.batch_size, log=log)
    return 0


def _chat(cfg, predict, log):
    import sys
    from .generation.chat import chat
    model, tok, template, gen = _generation(cfg, predict, log)
    log(f"[chat] template {template.name if template else 'none'}; one message per line, /reset forgets the "
        "history, /exit or end of input stops")
    max_context = int(model.config.seq_length or model.config.max_position_embedding or 2048)
    chat(model, tok, template, gen, model.config.eos_token_ids, cfg.seed, sys.stdin,
         lambda line: print(line, flush=True), max_context)
    return 0


def _serve(cfg, predict, log):
    """--run_mode serve: the OpenAI-compatible API and chat page (serving/)."""
    from . import serving
    if cfg.use_parallel:
        raise ConfigError("run_mode serve runs one process: use --use_parallel False")
    serve = predict.get("serve", {})
    return serving.main(cfg, {k: v for k, v in predict.items() if k != "serve"}, log=log, **serve)


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
