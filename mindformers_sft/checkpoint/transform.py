"""Checkpoints between parallel layouts (MindFormers' auto_trans_ckpt and transform_ckpt), on MindSpore's engine.

A *distributed* checkpoint is a directory of rank_N/ subdirectories whose files hold slices of the parameters,
described by a strategy file (MindSpore writes one per rank when it compiles under semi-auto parallel,
`strategy_ckpt_save_file`; MindFormers keeps them in OUTPUT/strategy/). A *complete* checkpoint holds every
parameter whole (one CKPT/safetensors file, a Hugging Face directory, or data-parallel replicas).

  to_complete(src_dir, strategy)          slices -> one complete CKPT   (merge_ckpt, auto_trans_ckpt)
  to_layout(src, dst_strategy, dst_dir)   complete or slices -> rank_N slices of another layout (transform_ckpt)

Both call `mindspore.transform_checkpoint_by_rank` / `transform_checkpoints`; this module only finds the files
(each rank's newest verified checkpoint, not the last name in sort order), merges per-stage strategy files,
and writes atomically (a temporary directory renamed into place).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile

from ..errors import CheckpointError
from .training_state import META, CheckpointManager, meta_entry

_RANK = re.compile(r"^rank_(\d+)$")
STRATEGY_SUFFIXES = (".ckpt", ".json")


def checkpoint_root(path: str) -> str:
    """OUTPUT or OUTPUT/checkpoint -> the directory holding rank_N/."""
    sub = os.path.join(path, "checkpoint")
    return sub if os.path.isdir(sub) and not _rank_dirs(path) else path


def _rank_dirs(path):
    if not os.path.isdir(path):
        return {}
    out = {}
    for d in os.listdir(path):
        m = _RANK.match(d)
        if m and os.path.isdir(os.path.join(path, d)):
            out[int(m.group(1))] = os.path.join(path, d)
    return out


def rank_dirs(path: str) -> dict:
    """{rank: directory} of the rank_N/ under OUTPUT or OUTPUT/checkpoint, in rank order; CheckpointError if none."""
    dirs = _rank_dirs(checkpoint_root(path))
    if not dirs:
        raise CheckpointError(f"{path}: no rank_N/ checkpoint directories")
    return dict(sorted(dirs.items()))


def rank_files(path: str, warn=print) -> dict:
    """{rank: checkpoint file} of a distributed checkpoint: per rank_N/, the newest verified file of meta.json,
    or (a directory written by MindFormers, without meta.json) its only / last CKPT file."""
    root = checkpoint_root(path)
    dirs = rank_dirs(path)
    files = {}
    for rank, d in sorted(dirs.items()):
        if os.path.isfile(os.path.join(d, META)):
            entry = CheckpointManager.for_dir(d).latest_entry(warn=warn)
            if entry is None:
                raise CheckpointError(f"{d}: no readable checkpoint listed in {META}")
            files[rank] = os.path.join(d, entry["file"])
        else:
            cands = sorted(glob.glob(os.path.join(d, "*.ckpt")))
            if not cands:
                raise CheckpointError(f"{d}: no .ckpt file (and no {META})")
            files[rank] = cands[-1]
    missing = sorted(set(range(max(files) + 1)) - set(files))
    if missing:
        raise CheckpointError(f"{root}: rank directories {', '.join(f'rank_{r}' for r in missing)} are missing")
    return files


def is_sliced(path: str, src_strategy: str = "") -> bool:
    """True when `path` is a distributed checkpoint of parallel slices: its meta.json says so (`parallel.sliced`,
    or a model_parallel / pipeline_stage above 1), or (no layout recorded, e.g. MindFormers' own rank_N/ files) a
    strategy file is given or lies beside it, or its first and last ranks hold tensors of different shapes."""
    root = checkpoint_root(path) if os.path.isdir(path) else None
    if not root or not _rank_dirs(root):
        return False
    files = rank_files(root, warn=lambda *a: None)
    par = meta_entry(files[0]).get("parallel")
    if par:
        if "sliced" in par:
            return bool(par["sliced"])
        return int(par.get("model_parallel", 1)) * int(par.get("pipeline_stage", 1)) > 1
    if src_strategy or any(os.path.isdir(d) for d in _strategy_dirs(root)):
        return True
    from .io import file_infos
    shapes = [{k: tuple(i.shape) for k, i in file_infos(f).items()} for f in (files[0], files[max(files)])]
    return shapes[0] != shapes[1]


def _strategy_dirs(root):
    return [os.path.join(os.path.dirname(os.path.abspath(root)), "strategy"), os.path.join(root, "strategy")]


def find_strategy(src_strategy: str, ckpt_path: str, workdir: str) -> str:
    """The strategy file describing `ckpt_path`: `src_strategy` (a file, or a directory of per-rank / per-stage
    files merged with MindSpore's merge_pipeline_strategys), else OUTPUT/strategy/ beside OUTPUT/checkpoint."""
    cands = ([src_strategy] if src_strategy else []) + _strategy_dirs(checkpoint_root(ckpt_path))
    for cand in cands:
        if cand and os.path.isfile(cand):
            return cand
        if cand and os.path.isdir(cand):
            files = [f for f in sorted(os.listdir(cand)) if f.endswith(STRATEGY_SUFFIXES)
                     and os.path.isfile(os.path.join(cand, f))]
            if len(files) == 1:
                return os.path.join(cand, files[0])
            if files:
                return _merge_stages(cand, files, workdir)
        if cand == src_strategy:
            raise CheckpointError(f"src_strategy_path_or_dir '{src_strategy}' is neither a strategy file nor a "
                                  "directory of strategy files (*.ckpt / *.json)")
    raise CheckpointError(f"{ckpt_path} holds model/pipeline-parallel slices but no strategy file describes them: "
                          "set src_strategy_path_or_dir to the strategy file or directory of the run that wrote it "
                          "(MindFormers: OUTPUT/strategy)")


def _merge_stages(directory, files, workdir):
    import mindspore as ms
    kinds = {os.path.splitext(f)[1] for f in files}
    if len(kinds) > 1:
        raise CheckpointError(f"{directory}: mixes .json and .ckpt strategy files; keep one kind")
    os.makedirs(workdir, exist_ok=True)
    merged = os.path.join(workdir, "merged_ckpt_strategy" + kinds.pop())
    ms.merge_pipeline_strategys(directory, merged)
    return merged


def _stage_complete_source(src: str, tmp: str, warn) -> str:
    """A complete source as one CKPT file MindSpore can read (HF dirs and safetensors are converted)."""
    from .ckpt_io import save_ckpt
    from .loading import read_weights, resolve
    kind, path, _ = resolve(src, warn=warn)
    if kind == "file" and path.endswith(".ckpt"):
        return path
    base, adapters, _ = read_weights(src, warn=warn)
    out = os.path.join(tmp, "complete.ckpt")
    save_ckpt({**base, **adapters}, out)
    return out


def to_complete(src: str, strategy: str, out_file: str, warn=print) -> str:
    """Assemble the slices of distributed checkpoint `src` (layout in `strategy`) into one complete CKPT."""
    import mindspore as ms
    files = rank_files(src, warn)
    try:
        needed = ms.rank_list_for_transform(0, strategy, None)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{strategy}: not a MindSpore strategy file MindSpore can read ({e})") from None
    absent = [r for r in needed if r not in files]
    if absent:
        raise CheckpointError(f"{src}: the strategy {strategy} needs ranks {absent}, which are not there "
                              f"(found rank_0..rank_{max(files)})")
    with _atomic_dir(os.path.dirname(os.path.abspath(out_file))) as tmp:
        part = os.path.join(tmp, os.path.basename(out_file))
        try:
            ms.transform_checkpoint_by_rank(0, {r: files[r] for r in needed}, part, strategy, None)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{src}: MindSpore could not assemble the slices with {strategy}: {e}") from None
        os.replace(part, out_file)
    return out_file


def to_layout(src: str, dst_strategy: str, dst_dir: str, src_strategy: str = None, prefix: str = "checkpoint_",
              warn=print) -> dict:
    """Re-slice `src` (complete, or distributed with `src_strategy`) for the layout of `dst_strategy`:
    dst_dir/rank_N/{prefix}N.ckpt for every rank of it. Returns {rank: file}."""
    import mindspore as ms
    parent = os.path.dirname(os.path.abspath(dst_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".transform_") as tmp:
        view = os.path.join(tmp, "src")
        if src_strategy:
            for rank, f in rank_files(src, warn).items():
                os.makedirs(os.path.join(view, f"rank_{rank}"))
                os.symlink(os.path.abspath(f), os.path.join(view, f"rank_{rank}", os.path.basename(f)))
        else:
            complete = _stage_complete_source(src, tmp, warn)
            os.makedirs(os.path.join(view, "rank_0"))
            os.symlink(os.path.abspath(complete), os.path.join(view, "rank_0", "complete.ckpt"))
        out = os.path.join(tmp, "dst")
        try:
            ms.transform_checkpoints(view, out, prefix, src_strategy, dst_strategy)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{src}: MindSpore could not re-slice it for {dst_strategy}: {e}") from None
        if os.path.exists(dst_dir):
            shutil.rmtree(dst_dir)
        os.replace(out, dst_dir)
    return rank_files(dst_dir, warn)


class _atomic_dir:
    """A temporary directory inside `parent`, removed on exit (its contents are moved out by the caller)."""

    def __init__(self, parent):
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(dir=parent, prefix=".transform_")

    def __enter__(self):
        return self.tmp

    def __exit__(self, *exc):
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_meta(path: str, source_entry: dict, source: str, parallel: dict = None):
    """meta.json beside an assembled checkpoint, carrying what the source recorded (architecture, LoRA base,
    step), so eval, predict and convert_weight.py treat it like any training checkpoint."""
    from .atomic import atomic_write_json
    from .training_state import _sha256
    keep = {k: v for k, v in source_entry.items() if k not in ("file", "size", "sha256", "parallel")}
    entry = {**keep, "file": os.path.basename(path), "size": os.path.getsize(path), "sha256": _sha256(path),
             "transformed_from": os.path.abspath(source)}
    if parallel:
        entry["parallel"] = parallel
    entry.setdefault("step", 0)
    entry.setdefault("epoch", 0)
    entry.setdefault("consumed_samples", 0)
    atomic_write_json(os.path.join(os.path.dirname(path), META),
                      {"checkpoints": [entry], "last_step": entry["step"], "last_ckpt_file": entry["file"]})


def resume_arrays(output_dir: str, rank: int, warn=print) -> dict:
    """Ascend, semi-auto parallel (not run on CPU): the complete training state of OUTPUT/checkpoint's rank
    slices, assembled with the strategy files the compile wrote to OUTPUT/strategy/."""
    from .io import load_tensors
    work = os.path.join(output_dir, "transformed_checkpoint", f"rank_{rank}")
    strategy = find_strategy("", output_dir, work)
    return load_tensors(to_complete(output_dir, strategy, os.path.join(work, "resume.ckpt"), warn))
