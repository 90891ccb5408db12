"""Checkpoint files: streaming readers/writers for safetensors (single and HF-sharded) and MindSpore CKPT,
atomic commits, integrity checks, and dtype helpers (bf16 as MindSpore's numpy bfloat16)."""
from .dtypes import (BF16, F16, F32, bf16_from_bits, cast, dtype_name, fp32_to_bf16_bits, is_bf16,
                     to_np_dtype)
from .io import (HF_INDEX_NAME, HF_WEIGHTS_NAME, MANIFEST_SUFFIX, CkptWriter, SafetensorsWriter,
                 ShardedSafetensorsWriter, TensorInfo, atomic_write_bytes, atomic_write_json, checkpoint_files,
                 ckpt_infos, file_format, file_infos, iter_ckpt, iter_file, iter_safetensors, iter_tensors,
                 load_tensors, parse_size, read_index, safetensors_infos, safetensors_metadata, save_ckpt,
                 save_safetensors, save_safetensors_sharded, tensor_infos, verify)

__all__ = [
    "BF16", "F16", "F32", "bf16_from_bits", "cast", "dtype_name", "fp32_to_bf16_bits", "is_bf16", "to_np_dtype",
    "HF_INDEX_NAME", "HF_WEIGHTS_NAME", "MANIFEST_SUFFIX", "CkptWriter", "SafetensorsWriter",
    "ShardedSafetensorsWriter", "TensorInfo", "atomic_write_bytes", "atomic_write_json", "checkpoint_files",
    "ckpt_infos", "file_format", "file_infos", "iter_ckpt", "iter_file", "iter_safetensors", "iter_tensors",
    "load_tensors", "parse_size", "read_index", "safetensors_infos", "safetensors_metadata", "save_ckpt",
    "save_safetensors", "save_safetensors_sharded", "tensor_infos", "verify",
]
