"""Tensor dtypes of checkpoint files, including bfloat16, as plain numpy arrays.

bfloat16 representation
-----------------------
numpy has no bfloat16, but MindSpore ships one: ``mindspore.common.np_dtype.bfloat16`` (the same
design as ``ml_dtypes.bfloat16``), and importing it registers the name with numpy, so
``np.dtype("bfloat16")`` works. This module imports it once and exposes it as :data:`BF16`. Every reader
of this package therefore returns bf16 tensors as ordinary ``np.ndarray`` of dtype ``BF16`` (2 bytes per
element, ``arr.view(np.uint16)`` gives the raw bits), and:

* ``safetensors.safe_open(path, framework="np")`` reads BF16 tensors (without the registration it
  fails with "data type 'bfloat16' not understood");
* ``safetensors.numpy.save_file`` / our writers store them as ``"BF16"``;
* ``mindspore.Tensor(arr)`` gives a ``mindspore.bfloat16`` tensor and ``Tensor.asnumpy()`` returns ``BF16``.

Casting (:func:`cast`) goes through float32 whenever bf16 is involved; numpy's cast to ``BF16`` rounds to
nearest, ties to even, which is what ``torch.Tensor.to(torch.bfloat16)`` does (tested bit for bit; only
NaN payloads may differ). bf16 *arithmetic* on numpy arrays is not something this package relies on.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np

from mindspore.common import np_dtype as _ms_np_dtype  # registers numpy "bfloat16"

from ..errors import CheckpointError, ConfigError

BF16 = np.dtype(_ms_np_dtype.bfloat16)
F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)

# numpy dtype <-> safetensors header code <-> MindSpore CKPT `tensor_type` string.
_TABLE = [
    (F32, "F32", "Float32"),
    (F16, "F16", "Float16"),
    (BF16, "BF16", "BFloat16"),
    (np.dtype(np.float64), "F64", "Float64"),
    (np.dtype(np.int8), "I8", "Int8"),
    (np.dtype(np.int16), "I16", "Int16"),
    (np.dtype(np.int32), "I32", "Int32"),
    (np.dtype(np.int64), "I64", "Int64"),
    (np.dtype(np.uint8), "U8", "UInt8"),
    (np.dtype(np.uint16), "U16", "UInt16"),
    (np.dtype(np.uint32), "U32", "UInt32"),
    (np.dtype(np.uint64), "U64", "UInt64"),
    (np.dtype(np.bool_), "BOOL", "Bool"),
]
_NP_TO_ST = {d: s for d, s, _ in _TABLE}
_ST_TO_NP = {s: d for d, s, _ in _TABLE}
_NP_TO_MS = {d: m for d, _, m in _TABLE}
_MS_TO_NP = {m: d for d, _, m in _TABLE}

FLOAT_DTYPES = (F32, F16, BF16)
# --dtype flag values and config names -> numpy dtype.
_NAMES = {"fp32": F32, "float32": F32, "fp16": F16, "float16": F16, "half": F16,
          "bf16": BF16, "bfloat16": BF16}

DTypeLike = Union[str, np.dtype, type, None]


def to_np_dtype(dtype: DTypeLike, key: str = "--dtype") -> Optional[np.dtype]:
    """numpy dtype of 'fp32'|'fp16'|'bf16'|'float32'|'float16'|'bfloat16' or a numpy dtype; None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        d = _NAMES.get(dtype.strip().lower())
        if d is None:
            raise ConfigError(f"{key}: '{dtype}' is not a dtype; expected fp32, fp16 or bf16 "
                              "(or float32, float16, bfloat16)")
        return d
    try:
        return np.dtype(dtype)
    except TypeError:
        raise ConfigError(f"{key}: {dtype!r} is not a dtype") from None


def dtype_name(dtype: np.dtype) -> str:
    """'float32' | 'float16' | 'bfloat16' | numpy name (the name HF config.json `torch_dtype` uses)."""
    return "bfloat16" if np.dtype(dtype) == BF16 else np.dtype(dtype).name


def is_bf16(arr_or_dtype) -> bool:
    d = arr_or_dtype.dtype if hasattr(arr_or_dtype, "dtype") else np.dtype(arr_or_dtype)
    return d == BF16


def is_float(dtype) -> bool:
    return np.dtype(dtype) in FLOAT_DTYPES or np.dtype(dtype) == np.float64


def _lookup(table, key, name, where, problem):
    v = table.get(key)
    if v is None:
        raise CheckpointError(f"{where + ': ' if where else ''}tensor '{name}': {problem}")
    return v


def st_code(dtype, name: str = "", where: str = "") -> str:
    """safetensors header dtype code ('F32', 'BF16', ...) of a numpy dtype."""
    return _lookup(_NP_TO_ST, np.dtype(dtype), name, where,
                   f"dtype {np.dtype(dtype)} cannot be stored in safetensors")


def from_st_code(code: str, name: str = "", where: str = "") -> np.dtype:
    return _lookup(_ST_TO_NP, code, name, where,
                   f"safetensors dtype '{code}' is not supported (expected one of {', '.join(_ST_TO_NP)})")


def ms_type(dtype, name: str = "", where: str = "") -> str:
    """MindSpore CKPT `tensor_type` string ('Float32', 'BFloat16', ...) of a numpy dtype."""
    return _lookup(_NP_TO_MS, np.dtype(dtype), name, where,
                   f"dtype {np.dtype(dtype)} cannot be stored in a MindSpore checkpoint")


def from_ms_type(tensor_type: str, name: str = "", where: str = "") -> np.dtype:
    return _lookup(_MS_TO_NP, tensor_type, name, where,
                   f"MindSpore tensor_type '{tensor_type}' is not supported (expected one of {', '.join(_MS_TO_NP)})")


_CAST_CHUNK = 1 << 18   # elements per step: bounds the temporaries of a cast to a few MB


def cast(arr: np.ndarray, dtype: DTypeLike, name: str = "", where: str = "") -> np.ndarray:
    """`arr` as `dtype` (None or same dtype: returned unchanged, no copy).

    Only floating tensors are cast (integer/bool tensors are returned as they are). Conversions involving
    bf16 go through float32 (exact for bf16 -> fp32), then round to nearest even. A finite value that
    overflows the target (e.g. 7e4 -> fp16) raises CheckpointError naming the tensor rather than writing inf.
    The cast runs in chunks, so it needs the output plus a few MB, whatever the tensor size.
    """
    target = to_np_dtype(dtype)
    if target is None or arr.dtype == target or not is_float(arr.dtype):
        return arr
    src = np.ascontiguousarray(arr).reshape(-1)
    out = np.empty(src.shape, dtype=target)
    via_f32 = arr.dtype == BF16 or target == BF16
    # Overflow is possible only when narrowing the exponent range.
    check = target == F16 or (target == BF16 and arr.dtype in (F32, np.dtype(np.float64)))
    for i in range(0, src.size, _CAST_CHUNK):
        s = src[i:i + _CAST_CHUNK]
        if via_f32 and s.dtype != F32:
            s = s.astype(F32)
        with np.errstate(over="ignore", invalid="ignore"):
            o = s.astype(target)
        if check:
            o_f = o.astype(F32) if target == BF16 else o
            overflow = ~np.isfinite(o_f) & np.isfinite(s)
            if overflow.any():
                j = int(np.argmax(overflow))
                idx = [int(x) for x in np.unravel_index(i + j, arr.shape)] if arr.ndim else []
                raise CheckpointError(f"{where + ': ' if where else ''}tensor '{name}': value {float(s[j])!r} at "
                                      f"index {idx} does not fit {dtype_name(target)} (it would become inf)")
        out[i:i + _CAST_CHUNK] = o
    return out.reshape(arr.shape)


def fp32_to_bf16_bits(arr: np.ndarray) -> np.ndarray:
    """uint16 bit patterns of `arr` (float32) rounded to bf16, nearest-even (for interop with other tools)."""
    return np.ascontiguousarray(np.asarray(arr, dtype=F32)).astype(BF16).view(np.uint16)


def bf16_from_bits(bits: np.ndarray) -> np.ndarray:
    """A BF16 array viewing uint16 bit patterns (no copy)."""
    return np.ascontiguousarray(bits, dtype=np.uint16).view(BF16)
