"""What every tensor-file format shares: :class:`TensorInfo` (a tensor described without its data), the
size parser of ``--max_shard_size``, and the checks every writer applies to a (name, array) pair."""
from __future__ import annotations

import re
from typing import Dict, Iterable, Iterator, NamedTuple, Sequence, Tuple, Union

import numpy as np

from ..errors import CheckpointError, ConfigError

TensorsLike = Union[Dict[str, np.ndarray], Iterable[Tuple[str, np.ndarray]]]
SpecLike = Sequence[Tuple[str, object, Sequence[int]]]


class TensorInfo(NamedTuple):
    """What a file says about one tensor, without its data."""
    name: str
    dtype: np.dtype
    shape: Tuple[int, ...]
    file: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


# --------------------------------------------------------------------------------------------- helpers
def parse_size(value: Union[str, int], key: str = "--max_shard_size") -> int:
    """Bytes of '5GB', '10MB', '500KiB', '1.5GB', '1024' (GB/MB/KB are powers of 10, GiB/MiB/KiB of 2, as HF)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"{key}: expected a positive size, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ConfigError(f"{key}: '{value}' is not a size; expected e.g. '5GB', '10MB', '512MiB' or bytes")
    unit = (m.group(2) or "b").lower().rstrip("b") or "b"
    mult = {"b": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12,
            "ki": 2 ** 10, "mi": 2 ** 20, "gi": 2 ** 30, "ti": 2 ** 40}[unit]
    n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise ConfigError(f"{key}: expected a positive size, got '{value}'")
    return n


def _iter_pairs(tensors: TensorsLike) -> Iterator[Tuple[str, np.ndarray]]:
    if isinstance(tensors, dict):
        return iter(tensors.items())
    return iter(tensors)


def _as_bytes_view(arr: np.ndarray) -> np.ndarray:
    """C-contiguous little-endian uint8 view of `arr` (copies only if it is not contiguous/little-endian)."""
    a = np.ascontiguousarray(arr)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and np.little_endian is False):
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.reshape(-1).view(np.uint8)


def _check_array(name: str, arr, where: str) -> np.ndarray:
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{where}: tensor name {name!r} is not a non-empty string")
    if not isinstance(arr, np.ndarray):
        if hasattr(arr, "asnumpy"):          # mindspore.Tensor / Parameter
            arr = arr.asnumpy()
        elif isinstance(arr, np.generic):
            arr = np.asarray(arr)
        else:
            raise CheckpointError(f"{where}: tensor '{name}' is a {type(arr).__name__}, expected a numpy array")
    return arr


def _spec_of_dict(tensors: Dict[str, np.ndarray], where: str):
    spec = []
    for k, v in tensors.items():
        a = v if isinstance(v, np.ndarray) else _check_array(k, v, where)
        spec.append((k, a.dtype, a.shape))
    return spec
