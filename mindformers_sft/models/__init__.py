"""Decoder families (Llama/Qwen2 in llama.py, Qwen3 in qwen3.py, Qwen3-MoE in qwen3_moe.py): build by
model_type, load and export numpy weights by MindFormers name (a HF directory: pretrained.from_hf_dir)."""
from __future__ import annotations

from typing import Dict

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ..errors import CheckpointError
from .config import LlamaConfig
from .causal_lm import CausalLM, KVCache
from .llama import LlamaForCausalLM

__all__ = ["LlamaConfig", "LlamaForCausalLM", "CausalLM", "KVCache", "build_model", "model_class",
           "load_state_dict", "state_dict_numpy"]

# model_type -> "module:Class" (imported on use); a new family adds one line here, its model file and its name map
FAMILIES = {
    "llama": "llama:LlamaForCausalLM",
    "qwen2": "llama:LlamaForCausalLM",
    "qwen3": "qwen3:Qwen3ForCausalLM",
    "qwen3_moe": "qwen3_moe:Qwen3MoeForCausalLM",
}


def model_class(model_type: str):
    """The CausalLM class of a model_type (config.MODEL_TYPES)."""
    import importlib
    if model_type not in FAMILIES:
        from ..errors import ConfigError
        raise ConfigError(f"model_config.model_type: '{model_type}' is not supported; expected one of "
                          f"{sorted(FAMILIES)}")
    module, cls = FAMILIES[model_type].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def build_model(config: LlamaConfig) -> CausalLM:
    """A randomly initialised model of config.model_type's family."""
    return model_class(config.model_type)(config)


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
    out_name, emb_name = model.OUTPUT_NAME, model.EMBEDDING_NAME
    if model.config.tie_word_embeddings and out_name in arrays and out_name not in params:
        emb = params[emb_name]
        if tuple(arrays[out_name].shape) != tuple(emb.shape):
            raise CheckpointError(f"{where}tensor '{out_name}': expected shape {tuple(emb.shape)} (tied to the "
                                  f"embedding), found {tuple(arrays[out_name].shape)}")
        arrays.pop(out_name)
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

