"""`run_mindformer.py` flags (MindFormers-compatible where they overlap) -> a validated Config -> run."""
from __future__ import annotations

import argparse
import sys

from .errors import SFTError


def str2bool_or_str(v):
    if isinstance(v, bool):
        return v
    low = str(v).lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no", "none", ""):
        return False
    return v   # a checkpoint name, for --resume_training


def str2bool(v):
    r = str2bool_or_str(v)
    if not isinstance(r, bool):
        raise argparse.ArgumentTypeError(f"expected True or False, got '{v}'")
    return r


def build_parser():
    p = argparse.ArgumentParser(prog="run_mindformer.py",
                                description="Fine-tune, evaluate and run Llama/Qwen2 models (MindFormers-style).")
    p.add_argument("--config", help="YAML config (MindFormers sections)")
    p.add_argument("--run_mode", choices=["train", "finetune", "eval", "predict", "chat", "plan", "serve"])
    p.add_argument("--use_parallel", type=str2bool, help="True under msrun (data parallel)")
    p.add_argument("--load_checkpoint", help="CKPT/safetensors file, a checkpoint dir (rank_N), or a HF directory")
    p.add_argument("--train_dataset_dir", "--train_dataset", dest="train_dataset_dir")
    p.add_argument("--eval_dataset_dir", "--eval_dataset", dest="eval_dataset_dir")
    p.add_argument("--output_dir")
    p.add_argument("--resume_training", type=str2bool_or_str, help="True, or the checkpoint file name to resume")
    p.add_argument("--register_path", help="directory of extra model registrations, e.g. research/qwen2_5")
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch_size", type=int)
    p.add_argument("--gradient_accumulation_steps", type=int)
    p.add_argument("--do_eval", type=str2bool)
    p.add_argument("--device_id", type=int)
    p.add_argument("--device_target", choices=["CPU", "Ascend", "GPU"])
    p.add_argument("--mode", type=int, choices=[0, 1], help="0 graph (jit), 1 PyNative")
    p.add_argument("--src_strategy_path_or_dir")
    p.add_argument("--auto_trans_ckpt", type=str2bool)
    p.add_argument("--only_save_strategy", type=str2bool)
    p.add_argument("--vocab_file", help="tokenizer file or directory (sets processor.tokenizer.vocab_file)")
    p.add_argument("--predict_data", nargs="+", help="prompt(s) for --run_mode predict, or one dataset file "
                                                     "(.json/.jsonl/.parquet/.csv) to predict and score")
    p.add_argument("--chat_template", help="predict: wrap each prompt as a user turn of this template (default: the "
                                           "training data's template for SFTDataLoader; 'none' sends it as is)")
    p.add_argument("--max_new_tokens", type=int)
    p.add_argument("--do_sample", type=str2bool)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top_k", type=int)
    p.add_argument("--top_p", type=float)
    p.add_argument("--host", help="serve: address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="serve: port (default 8000)")
    p.add_argument("--api_key", help="serve: every request needs 'Authorization: Bearer API_KEY'")
    add_evaluation_flags(p)
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override any YAML key: --options runner_config.epochs=3 optimizer.learning_rate=1e-4")
    return p


EVAL_FLAGS = ("tasks", "num_fewshot", "limit", "eval_batch_size", "include_path", "predict_split", "predict_limit")


def add_evaluation_flags(p):
    g = p.add_argument_group("evaluation (lm-evaluation-harness tasks, predictions over a dataset)")
    g.add_argument("--tasks", help="eval: lm-eval task names, comma-separated (e.g. alpaca_mc,alpaca_ppl,mmlu); "
                                   "without it eval reports loss and perplexity")
    g.add_argument("--num_fewshot", type=int, help="eval --tasks: few-shot examples per prompt")
    g.add_argument("--limit", type=float, help="eval --tasks: at most N documents per task (a fraction if < 1)")
    g.add_argument("--eval_batch_size", type=int, help="eval --tasks / predict over a file: batch size "
                                                       "(default runner_config.batch_size)")
    g.add_argument("--include_path", nargs="+", help="eval --tasks: directories of extra task YAML files")
    g.add_argument("--predict_split", help="predict over a file: records to use, e.g. 'train[90%%:]'")
    g.add_argument("--predict_limit", type=int, help="predict over a file: at most N records")


FLAG_KEYS = {
    "run_mode": "run_mode", "use_parallel": "use_parallel", "load_checkpoint": "load_checkpoint",
    "train_dataset_dir": "train_dataset.data_loader.dataset_dir",
    "eval_dataset_dir": "eval_dataset.data_loader.dataset_dir", "output_dir": "output_dir",
    "resume_training": "resume_training", "register_path": "register_path", "seed": "seed",
    "epochs": "runner_config.epochs", "batch_size": "runner_config.batch_size",
    "gradient_accumulation_steps": "runner_config.gradient_accumulation_steps", "do_eval": "do_eval",
    "device_id": "context.device_id", "device_target": "context.device_target", "mode": "context.mode",
    "src_strategy_path_or_dir": "src_strategy_path_or_dir", "auto_trans_ckpt": "auto_trans_ckpt",
    "only_save_strategy": "only_save_strategy", "vocab_file": "processor.tokenizer.vocab_file",
}


def main(argv=None):
    args = build_parser().parse_args(argv)
    overrides = {FLAG_KEYS[k]: v for k, v in vars(args).items() if k in FLAG_KEYS and v is not None}
    if args.batch_size is not None:
        overrides["train_dataset.batch_size"] = args.batch_size
    predict = {k: getattr(args, k) for k in ("predict_data", "max_new_tokens", "do_sample", "temperature",
                                             "top_k", "top_p", "chat_template") + EVAL_FLAGS
               if getattr(args, k) is not None}
    serve = {k: getattr(args, k) for k in ("host", "port", "api_key") if getattr(args, k) is not None}
    if serve:
        predict["serve"] = serve
    try:
        from . import run
        if args.register_path:
            run.register(args.register_path)
        from .config import load_config
        cfg = load_config(args.config, args.options, overrides)
        return run.run(cfg, predict)
    except SFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
