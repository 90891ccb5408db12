"""`data_loader.split` in Hugging Face datasets' slice syntax: "train", "train[:90%]", "train[90%:]",
"train[100:200]". It selects a contiguous range of a dataset's samples (in file order, before shuffling),
so a held-out eval split never overlaps the training split."""
from __future__ import annotations

import re

from ..errors import ConfigError

_SPLIT = re.compile(r"^\s*(\w+)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*$")


def _bound(tok, n, default):
    if tok is None:
        return default
    v = n * int(tok[:-1]) // 100 if tok.endswith("%") else int(tok)
    return max(0, min(n, v + n if v < 0 else v))


def split_range(spec: str, n: int, key: str = "data_loader.split"):
    m = _SPLIT.match(str(spec or "train"))
    if not m:
        raise ConfigError(f"{key}: '{spec}' is not a split; expected e.g. 'train', 'train[:90%]', 'train[90%:]' "
                          "or 'train[0:500]'")
    return _bound(m.group(2), n, 0), _bound(m.group(3), n, n)


class Subset:
    """Samples [start, stop) of a dataset, with the dataset interface (len, [i])."""

    def __init__(self, dataset, start, stop):
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.dataset[self.start + i]


def apply_split(dataset, spec, key="data_loader.split"):
    if not spec or str(spec).strip() == "train":
        return dataset
    start, stop = split_range(spec, len(dataset), key)
    if stop <= start:
        raise ConfigError(f"{key}: '{spec}' selects no samples of the {len(dataset)} available")
    return Subset(dataset, start, stop)
