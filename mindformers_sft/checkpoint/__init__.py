"""Checkpoint files: streaming readers/writers for safetensors (single and HF-sharded; ``safetensors_io``) and
MindSpore CKPT (``ckpt_io``), format dispatch over a file or directory (``io``), atomic commits (``atomic``),
integrity checks (``verify``), and dtype helpers (``dtypes``: bf16 as MindSpore's numpy bfloat16). Loading
into a model (``loading``), training state (``training_state``), merging ranks (``merge``) and layout
transforms (``transform``) build on them."""
from .dtypes import (BF16, F16, F32, bf16_from_bits, cast, dtype_name, fp32_to_bf16_bits, is_bf16,
                     to_np_dtype)
from .atomic import atomic_write_bytes, atomic_write_json
from .ckpt_io import MANIFEST_SUFFIX, CkptWriter, ckpt_infos, iter_ckpt, save_ckpt
from .io import (checkpoint_files, file_format, file_infos, infos_of_files, iter_file, iter_tensors, load_tensors,
                 read_index, tensor_infos)
from .safetensors_io import (HF_INDEX_NAME, HF_WEIGHTS_NAME, SafetensorsWriter, ShardedSafetensorsWriter,
                             iter_safetensors, safetensors_infos, safetensors_metadata, save_safetensors,
                             save_safetensors_sharded)
from .tensors import TensorInfo, parse_size
from .verify import verify

__all__ = [
    "BF16", "F16", "F32", "bf16_from_bits", "cast", "dtype_name", "fp32_to_bf16_bits", "is_bf16", "to_np_dtype",
    "HF_INDEX_NAME", "HF_WEIGHTS_NAME", "MANIFEST_SUFFIX", "CkptWriter", "SafetensorsWriter",
    "ShardedSafetensorsWriter", "TensorInfo", "atomic_write_bytes", "atomic_write_json", "checkpoint_files",
    "ckpt_infos", "file_format", "file_infos", "infos_of_files", "iter_ckpt", "iter_file", "iter_safetensors",
    "iter_tensors", "load_tensors", "parse_size", "read_index", "safetensors_infos", "safetensors_metadata", "save_ckpt",
    "save_safetensors", "save_safetensors_sharded", "tensor_infos", "verify",
]
