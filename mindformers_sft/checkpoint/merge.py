"""Merge per-rank training checkpoints (OUTPUT/checkpoint/rank_N) into one complete checkpoint.

Data parallel: every rank holds a full replica; the ranks' newest verified checkpoints must be of the
same step and agree tensor for tensor, and one complete copy is written.
Model/pipeline parallel: ranks hold slices described by strategy files; MindSpore's own checkpoint transform
assembles them (see transform.py; exercised on CPU with slices cut by `tools.transform_ckpt`).
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import CheckpointError
from .ckpt_io import save_ckpt
from .io import load_tensors
from .safetensors_io import save_safetensors
from .loading import OPT_PREFIXES
from .training_state import CheckpointManager
from .transform import find_strategy, rank_dirs, to_complete



def merge_data_parallel(src: str, output_path: str, keep_optimizer=False, warn=print) -> dict:
    """One complete checkpoint from data-parallel replicas; returns {'step', 'ranks', 'tensors'}."""
    merged, step, first = None, None, None
    dirs = list(rank_dirs(src).values())
    for d in dirs:
        entry, arrays = CheckpointManager.for_dir(d).latest(warn=warn)
        if entry is None:
            raise CheckpointError(f"{d}: no readable checkpoint")
        if step is None:
            step, first, merged = entry["step"], d, arrays
            continue
        if entry["step"] != step:
            raise CheckpointError(f"{d}: newest checkpoint is step {entry['step']}, but {first} is at step {step}; "
                                  "the ranks must be merged at the same step")
        for k, v in merged.items():
            if k not in arrays:
                raise CheckpointError(f"{d}: tensor '{k}' of {first} is missing")
            if k.startswith(OPT_PREFIXES):
                continue
            if v.shape != arrays[k].shape or not np.array_equal(v, arrays[k]):
                raise CheckpointError(f"{d}: tensor '{k}' differs from {first}: these are not data-parallel "
                                      "replicas (model-parallel slices need --strategy_dir)")
    out = {k: v for k, v in merged.items() if keep_optimizer or not k.startswith(OPT_PREFIXES)}
    if output_path.endswith(".safetensors"):
        save_safetensors(out, output_path)
    else:
        save_ckpt(out, output_path)
    return {"step": step, "ranks": len(dirs), "tensors": len(out), "output_path": output_path}


def merge_sliced(src: str, strategy: str, output_path: str, keep_optimizer=False, warn=print) -> dict:
    """Model/pipeline-parallel slices -> one complete checkpoint, assembled by MindSpore's transform with the
    strategy file (or directory of per-rank / per-stage files) that describes them."""
    if not os.path.exists(strategy):
        raise CheckpointError(f"{strategy}: strategy file or directory not found")
    out_dir = os.path.dirname(os.path.abspath(output_path))
    strategy = find_strategy(strategy, src, os.path.join(out_dir, ".merge_strategy"))
    tmp = os.path.join(out_dir, f".{os.path.basename(output_path)}.assembled.ckpt")
    to_complete(src, strategy, tmp, warn=warn)
    try:
        arrays = load_tensors(tmp)
    finally:
        os.remove(tmp)
    out = {k: v for k, v in arrays.items() if keep_optimizer or not k.startswith(OPT_PREFIXES)}
    if output_path.endswith(".safetensors"):
        save_safetensors(out, output_path)
    else:
        save_ckpt(out, output_path)
    return {"strategy": strategy, "tensors": len(out), "output_path": output_path}
