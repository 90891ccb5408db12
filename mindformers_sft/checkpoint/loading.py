"""Find and read the weights named by `--load_checkpoint`, in any of the forms a user brings:

- a Hugging Face directory (config.json + model.safetensors or shards): names are renamed to MindFormers';
- a MindFormers CKPT or safetensors file;
- a training output / checkpoint directory (OUTPUT, OUTPUT/checkpoint or OUTPUT/checkpoint/rank_N with
  meta.json): the newest verified checkpoint of this rank (or of rank_0). An adapter-only (LoRA)
  checkpoint also brings in the base weights it was trained from (recorded in its meta.json).

Returns MindFormers-named numpy arrays split into base weights, adapters and optimizer state.
"""
from __future__ import annotations

import glob
import os

from ..convert.names import hf_to_mf, is_ignored_hf
from ..errors import CheckpointError
from .io import checkpoint_files, iter_file, load_tensors
from .training_state import META, CheckpointManager, meta_entry

OPT_PREFIXES = ("adam_m.", "adam_v.", "global_step")
# LoRA adapter names: Linear layers (.lora_a/.lora_b) and stacked MoE experts (models/moe.py)
ADAPTER_SUFFIXES = (".lora_a", ".lora_b", ".lora_a1", ".lora_b1", ".lora_a2", ".lora_b2")


def is_hf_dir(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) and \
        bool(glob.glob(os.path.join(path, "*.safetensors")))


def _training_rank_dir(path, rank):
    for cand in (path, os.path.join(path, f"rank_{rank}"), os.path.join(path, "rank_0"),
                 os.path.join(path, "checkpoint", f"rank_{rank}"), os.path.join(path, "checkpoint", "rank_0")):
        if os.path.isfile(os.path.join(cand, META)):
            return cand
    return None


def _llama_state(arrays, files, config, source):
    return {hf_to_mf(k, source=files[k]): v for k, v in arrays.items()}


def _qwen3_state(arrays, files, config, source):
    from ..convert import names_qwen3
    names_qwen3.check_hf_state({k: v.shape for k, v in arrays.items()}, config, files, source)
    return names_qwen3.hf_state_to_mf(arrays, config, source)


# model_type -> (HF arrays, {HF name: file}, config, source) -> MindFormers-named arrays of that family's model
HF_STATE_TO_MF = {"llama": _llama_state, "qwen2": _llama_state, "qwen3": _qwen3_state, "qwen3_moe": _qwen3_state}


def read_hf_dir(path, config=None) -> dict:
    """MindFormers-named arrays of a Hugging Face directory (single file or index + shards), in the layout of the
    model `config` (config.model_config.LlamaConfig; default: the directory's config.json) describes."""
    if config is None:
        from ..config.model_config import LlamaConfig
        config = LlamaConfig.from_hf_config(path)
    arrays, files = {}, {}
    for fp in checkpoint_files(path):
        for name, arr in iter_file(fp):
            if not is_ignored_hf(name):
                arrays[name], files[name] = arr, fp
    return HF_STATE_TO_MF[config.model_type](arrays, files, config, path)


def read_file(path, config=None) -> dict:
    """A MindFormers CKPT/safetensors file (a safetensors file with HF names is converted with the name map of
    `config`'s family, Llama's without a config)."""
    arrays = load_tensors(path)
    if any(k.startswith("model.embed_tokens") or ".self_attn." in k for k in arrays):
        arrays = {k: v for k, v in arrays.items() if not is_ignored_hf(k)}
        convert = HF_STATE_TO_MF[config.model_type if config is not None else "llama"]
        arrays = convert(arrays, dict.fromkeys(arrays, path), config, path)
    return arrays


def split(arrays: dict):
    base, adapters, opt = {}, {}, {}
    for k, v in arrays.items():
        if k.startswith(OPT_PREFIXES):
            opt[k] = v
        elif k.endswith(ADAPTER_SUFFIXES):
            adapters[k] = v
        else:
            base[k] = v
    return base, adapters, opt


def resolve(path: str, rank: int = 0, warn=print):
    """-> (kind, file_or_dir, meta_entry): kind 'hf' (a HF directory), or 'file' (a CKPT/safetensors file,
    with its meta.json entry when it is a training checkpoint). Training directories resolve to their newest
    verified checkpoint."""
    if not path:
        raise CheckpointError("load_checkpoint is empty: name a checkpoint file, a checkpoint directory or a "
                              "Hugging Face directory")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: load_checkpoint does not exist")
    if is_hf_dir(path):
        return "hf", path, None
    if os.path.isfile(path):
        entry = meta_entry(path) or None
        if entry and "sha256" in entry:     # a training checkpoint named directly: size and sha256 as on resume
            CheckpointManager.for_dir(os.path.dirname(os.path.abspath(path))).verify(entry)
        return "file", path, entry
    rdir = _training_rank_dir(path, rank)
    if rdir is None:
        raise CheckpointError(f"{path}: a directory with neither a Hugging Face model (config.json + *.safetensors) "
                              f"nor training checkpoints (rank_N/{META})")
    entry = CheckpointManager.for_dir(rdir).latest_entry(warn=warn)
    if entry is None:
        raise CheckpointError(f"{rdir}: no readable checkpoint listed in {META}")
    return "file", os.path.join(rdir, entry["file"]), entry


def read_weights(path: str, rank: int = 0, warn=print, config=None):
    """-> (base, adapters, source) MindFormers-named arrays from any supported checkpoint form. An adapter-only
    checkpoint brings in the base weights its meta.json records. `config`: the model the weights are for (a HF
    directory is converted to its layout, e.g. qkv_concat)."""
    kind, src, entry = resolve(path, rank, warn)
    if kind == "hf":
        return read_hf_dir(src, config), {}, src
    base, adapters, _ = split(read_file(src, config))
    if adapters and not base and (entry or {}).get("base_checkpoint"):
        base = read_weights(entry["base_checkpoint"], rank, warn, config)[0]
    return base, adapters, src
