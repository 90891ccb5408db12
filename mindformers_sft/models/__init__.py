"""Llama-family models: build, load numpy weights by MindFormers name, export, and load a HF directory."""
from __future__ import annotations

from typing import Dict

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ..errors import CheckpointError
from .config import LlamaConfig
from .llama import KVCache, LlamaForCausalLM

__all__ = ["LlamaConfig", "LlamaForCausalLM", "KVCache", "build_model", "load_state_dict", "state_dict_numpy",
           "from_hf_dir"]


def build_model(config: LlamaConfig) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM for `config`."""
    return LlamaForCausalLM(config)


def _params(model) -> dict:
    # Parameter.name, not the cell path: a LoRA wrapper nests the base layer but keeps its parameter names
    return {p.name: p for p in model.get_parameters()}


def load_state_dict(model, named_arrays: Dict[str, np.ndarray], strict: bool = True, source: str = "") -> list:
    """Copy numpy arrays into the model's parameters by MindFormers name (cast to each parameter's dtype).

    strict: every parameter must be given and every given name must be a parameter. With tied embeddings an
    incoming `lm_head.weight` of the embedding's shape is accepted and dropped. Raises CheckpointError naming
    `source` and the tensor. Returns the list of parameter names that were not given (empty when strict).
    """
    where = f"{source}: " if source else ""
    params = _params(model)
    arrays = dict(named_arrays)
    if model.config.tie_word_embeddings and "lm_head.weight" in arrays and "lm_head.weight" not in params:
        emb = params["model.tok_embeddings.embedding_weight"]
        if tuple(arrays["lm_head.weight"].shape) != tuple(emb.shape):
            raise CheckpointError(f"{where}tensor 'lm_head.weight': expected shape {tuple(emb.shape)} (tied to the "
                                  f"embedding), found {tuple(arrays['lm_head.weight'].shape)}")
        arrays.pop("lm_head.weight")
    unexpected = sorted(set(arrays) - set(params))
    missing = sorted(set(params) - set(arrays))
    if strict and unexpected:
        raise CheckpointError(f"{where}unexpected tensor '{unexpected[0]}' (not a parameter of this model"
                              f"{'; %d more' % (len(unexpected) - 1) if len(unexpected) > 1 else ''})")
    if strict and missing:
        raise CheckpointError(f"{where}missing tensor '{missing[0]}'"
                              f"{' (and %d more)' % (len(missing) - 1) if len(missing) > 1 else ''}")
    for name, arr in arrays.items():
        if name not in params:
            continue
        p = params[name]
        if tuple(arr.shape) != tuple(p.shape):
            raise CheckpointError(f"{where}tensor '{name}': expected shape {tuple(p.shape)}, "
                                  f"found {tuple(arr.shape)}")
        p.set_data(Tensor(np.ascontiguousarray(arr), dtype=p.dtype))
    return missing


def state_dict_numpy(model) -> Dict[str, np.ndarray]:
    """name -> numpy array of every parameter (bf16 parameters are returned as float32)."""
    out = {}
    for name, p in _params(model).items():
        t = p.value() if hasattr(p, "value") else p
        out[name] = (t.float() if p.dtype == ms.bfloat16 else t).asnumpy().copy()
    return out


def from_hf_dir(path: str, **config_overrides) -> LlamaForCausalLM:
    """Build from a Hugging Face directory: config.json plus its safetensors (single file or shards)."""
    from ..checkpoint.loading import read_hf_dir
    config = LlamaConfig.from_hf_config(path, **config_overrides)
    model = LlamaForCausalLM(config)
    load_state_dict(model, read_hf_dir(path), strict=True, source=path)
    return model
