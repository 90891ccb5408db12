"""Llama-family models: build, load numpy weights by MindFormers name, export, and load a HF directory."""
from __future__ import annotations

import glob
import json
import os
import struct
from typing import Dict

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ..convert.names import hf_to_mf, is_ignored_hf
from ..errors import CheckpointError
from .config import LlamaConfig
from .llama import KVCache, LlamaForCausalLM

__all__ = ["LlamaConfig", "LlamaForCausalLM", "KVCache", "build_model", "load_state_dict", "state_dict_numpy",
           "from_hf_dir", "read_safetensors"]


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


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """All tensors of one .safetensors file as numpy arrays (BF16 is widened to float32 exactly)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if os.path.getsize(path) > 8 + n else None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        raw = data[begin:end] if data is not None else np.zeros(0, np.uint8)
        if info["dtype"] == "BF16":
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _ST_DTYPES:
            arr = raw.view(_ST_DTYPES[info["dtype"]])
        else:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        if arr.size != int(np.prod(shape)):
            raise CheckpointError(f"{path}: tensor '{name}' is truncated (expected {int(np.prod(shape))} values, "
                                  f"found {arr.size})")
        out[name] = np.array(arr.reshape(shape))
    return out


def from_hf_dir(path: str, **config_overrides) -> LlamaForCausalLM:
    """Build from a Hugging Face directory: config.json plus all *.safetensors (single file or shards)."""
    config = LlamaConfig.from_hf_config(path, **config_overrides)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors file in the directory")
    model = LlamaForCausalLM(config)
    arrays = {}
    for fp in files:
        for hf_name, arr in read_safetensors(fp).items():
            if is_ignored_hf(hf_name):
                continue
            name = hf_to_mf(hf_name, source=fp)
            arrays[name] = arr
    source = files[0] if len(files) == 1 else f"{path}/*.safetensors"
    load_state_dict(model, arrays, strict=True, source=source)
    return model
