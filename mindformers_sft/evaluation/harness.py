"""Run lm-evaluation-harness tasks on our model: `run_mindformer.py --run_mode eval --tasks a,b [--num_fewshot N]
[--limit N] [--eval_batch_size N] [--include_path DIR]`.

Tasks are looked up among lm-eval's own and the YAML directories given (the bundled `assets/eval/` always:
alpaca_mc, alpaca_ppl, alpaca_gen). Offline use (HF_DATASETS_OFFLINE=1): tasks whose YAML reads local files
(`dataset_path: json` + `dataset_kwargs.data_files`) need nothing else; a hub dataset must be in the datasets
cache or be pointed at local copies (assets/eval/README.md). An unknown task name lists the close ones; a task
whose data cannot be had says which dataset or file it needs.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from typing import List, Optional, Sequence

from ..errors import ConfigError, DataError

BUNDLED_TASKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "assets", "eval")


def parse_tasks(spec) -> List[str]:
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec or []) if t and t.strip()]
    if not names:
        raise ConfigError("--tasks: give at least one lm-eval task name (comma-separated), e.g. alpaca_mc")
    return names


def include_paths(extra: Optional[Sequence[str]] = None) -> List[str]:
    paths = [BUNDLED_TASKS] if os.path.isdir(BUNDLED_TASKS) else []
    for p in extra or ():
        if not os.path.isdir(p):
            raise ConfigError(f"--include_path {p}: not a directory of task YAML files")
        paths.append(os.path.abspath(p))
    return paths


def task_manager(names: Sequence[str], extra_paths: Optional[Sequence[str]] = None):
    """A TaskManager that knows every name in `names`: the include paths alone when they suffice (fast), else
    with lm-eval's own tasks. Unknown names raise ConfigError listing the closest known ones."""
    from lm_eval.tasks import TaskManager
    paths = include_paths(extra_paths)
    if paths:
        tm = TaskManager(include_path=paths, include_defaults=False)
        if all(n in tm.all_tasks for n in names):
            return tm
    tm = TaskManager(include_path=paths or None)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        msgs = []
        for n in unknown:
            close = difflib.get_close_matches(n, tm.all_tasks, n=5, cutoff=0.6)
            msgs.append(f"'{n}'" + (f" (close: {', '.join(close)})" if close else ""))
        raise ConfigError(f"--tasks: unknown task {'; '.join(msgs)}; `lm-eval ls tasks` lists the "
                          f"{len(tm.all_tasks)} known names (add your own YAML directory with --include_path)")
    return tm


def _needed(tm, name: str, err: Exception) -> str:
    """The dataset a task asks for: dataset_path (+ dataset_name) of its YAML, else the quoted id in the error."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
        cfg = load_yaml(tm.task_index[name].yaml_path, resolve_func=False)
        if cfg.get("dataset_path"):
            return cfg["dataset_path"] + (f" (config {cfg['dataset_name']!r})" if cfg.get("dataset_name") else "")
    except Exception:       # a group, or another lm-eval version: fall back on the error text
        pass
    m = re.search(r"'([\w.-]+/[\w.-]+)'", str(err))
    return m.group(1) if m else ""


def check_datasets(tm, names: Sequence[str]):
    """Load each task once (its data lands in the datasets cache) so that a missing dataset is reported with
    the task that needs it and what it needs."""
    load = getattr(tm, "load", None)
    if load is None:                          # lm-eval before 0.4.10
        from lm_eval.tasks import get_task_dict
        load = lambda ns: get_task_dict(ns, tm)      # noqa: E731
    for name in names:
        try:
            load([name])
        except FileNotFoundError as e:
            raise DataError(f"task '{name}': a data file it needs is missing: {e}") from None
        except (ConnectionError, OSError, ValueError) as e:
            what = _needed(tm, name, e)
            offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
            raise DataError(
                f"task '{name}': its dataset{' ' + what if what else ''} cannot be loaded"
                f"{' offline' if offline else ''} ({type(e).__name__}: {e}). Download it once with network "
                "access (datasets caches it under ~/.cache/huggingface/datasets), or point the task at local "
                "files with a YAML of `include: <its yaml>`, `dataset_path: json|parquet`, "
                "`dataset_kwargs: {data_files: {test: FILE}}` in a directory given to --include_path "
                "(see assets/eval/README.md)") from None


def run_tasks(lm, names: Sequence[str], num_fewshot: Optional[int] = None, limit=None,
              extra_paths: Optional[Sequence[str]] = None, output_dir: Optional[str] = None, log=print) -> dict:
    """Evaluate `lm` (a MindFormersLM) on the tasks; print lm-eval's table, write OUTPUT/lm_eval_results.json
    and return {'results': ..., 'truncations': ...}."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table
    names = list(names)
    if limit is not None and float(limit) >= 1:
        limit = int(limit)
    tm = task_manager(names, extra_paths)
    check_datasets(tm, names)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                                  log_samples=False)
    log(make_table(out))
    if out.get("groups"):
        log(make_table(out, "groups"))
    if any(lm.truncations.values()):
        log(f"[eval] prompts longer than the context ({lm.max_length} tokens), truncated from the left: "
            f"{lm.truncations}")
    summary = {"tasks": names, "num_fewshot": num_fewshot, "limit": limit, "max_length": lm.max_length,
               "truncations": dict(lm.truncations), "results": out["results"], "groups": out.get("groups", {}),
               "n_samples": out.get("n-samples", {})}
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "lm_eval_results.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
        log(f"[eval] results written to {path}")
    return summary
