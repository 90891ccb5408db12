"""LoRA from `model_config.pet_config` {pet_type: lora, lora_rank, lora_alpha, lora_dropout, target_modules}.

Target layers are chosen by a regex over MindFormers layer names (e.g. '.*wq|.*wk|.*wv|.*wo' matches
`model.layers.3.attention.wq`), fully matched. Each target `Linear` is wrapped in place: its `weight`/`bias`
keep their names, and it gains `<layer>.lora_a` (rank, in) and `<layer>.lora_b` (out, rank) — MindFormers'
names, and the shapes of PEFT's lora_A.weight / lora_B.weight. The base is frozen: only adapters train.

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T
"""
from __future__ import annotations

import math
import re

import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import HeUniform, initializer

from ..errors import ConfigError

PET_KEYS = {"pet_type", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "freeze_include",
            "freeze_exclude", "exclude_layers", "use_rslora"}


class LoraLinear(nn.Cell):
    def __init__(self, base, rank: int, alpha: float, dropout: float, full_name: str):
        super().__init__(auto_prefix=False)
        self.base = base
        self.rank, self.scaling = rank, alpha / rank
        pd = base.weight.dtype
        self.lora_a = Parameter(initializer(HeUniform(negative_slope=math.sqrt(5)), (rank, base.in_features), pd),
                                name=f"{full_name}.lora_a")
        self.lora_b = Parameter(initializer("zeros", (base.out_features, rank), pd), name=f"{full_name}.lora_b")
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else None
        self.matmul_a = ops.MatMul(transpose_b=True)   # two primitives: sharded differently under mp
        self.matmul_b = ops.MatMul(transpose_b=True)

    def construct(self, x):
        y = self.base(x)
        shape = x.shape
        h = x if self.dropout is None else self.dropout(x)
        h = ops.reshape(ops.cast(h, self.base.compute_dtype), (-1, self.base.in_features))
        h = self.matmul_a(h, ops.cast(self.lora_a, self.base.compute_dtype))
        h = self.matmul_b(h, ops.cast(self.lora_b, self.base.compute_dtype)) * self.scaling
        return y + ops.reshape(h, shape[:-1] + (self.base.out_features,))

    def merged_weight(self) -> np.ndarray:
        w = self.base.weight.asnumpy().astype(np.float32)
        delta = self.lora_b.asnumpy().astype(np.float32) @ self.lora_a.asnumpy().astype(np.float32)
        return (w + self.scaling * delta).astype(self.base.weight.asnumpy().dtype)


def parse_pet_config(pet: dict) -> dict:
    if not pet:
        return {}
    unknown = set(pet) - PET_KEYS
    if unknown:
        import difflib
        k = sorted(unknown)[0]
        close = difflib.get_close_matches(k, sorted(PET_KEYS), n=1)
        raise ConfigError(f"model.model_config.pet_config: unknown key '{k}'"
                          + (f"; did you mean '{close[0]}'?" if close else ""))
    if pet.get("pet_type", "lora") != "lora":
        raise ConfigError(f"model.model_config.pet_config.pet_type: '{pet.get('pet_type')}' is not supported; "
                          "expected 'lora'")
    rank = pet.get("lora_rank", 8)
    if not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"model.model_config.pet_config.lora_rank: expected a positive integer, got {rank!r}")
    out = dict(lora_rank=rank, lora_alpha=float(pet.get("lora_alpha", rank)),
               lora_dropout=float(pet.get("lora_dropout", 0.0)),
               target_modules=pet.get("target_modules", ".*wq|.*wv"))
    try:
        re.compile(out["target_modules"])
    except re.error as e:
        raise ConfigError(f"model.model_config.pet_config.target_modules: invalid regex ({e})") from None
    return out


def apply_lora(model, pet: dict) -> list:
    """Wrap matching Linear layers, freeze everything else; returns the wrapped layer names."""
    from ..models.llama import Linear
    pet = parse_pet_config(pet)
    pattern = re.compile(pet["target_modules"])
    targets = [(name, cell) for name, cell in model.cells_and_names() if isinstance(cell, Linear)
               and pattern.fullmatch(name)]
    if not targets:
        examples = [n for n, c in model.cells_and_names() if isinstance(c, Linear)][:3]
        raise ConfigError(f"model.model_config.pet_config.target_modules '{pet['target_modules']}' matched no "
                          f"layer; layer names look like {examples}")
    for p in model.get_parameters():
        p.requires_grad = False
    for name, cell in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model if not parent_name else dict(model.cells_and_names())[parent_name]
        lora = LoraLinear(cell, pet["lora_rank"], pet["lora_alpha"], pet["lora_dropout"], name)
        parent._cells[attr] = lora  # replace in place, keeping the base parameters' names
    return [n for n, _ in targets]


def lora_layers(model):
    return [(n, c) for n, c in model.cells_and_names() if isinstance(c, LoraLinear)]


def adapter_state(model) -> dict:
    """name -> numpy of the adapter parameters only (MindFormers names: ...wq.lora_a / lora_b)."""
    out = {}
    for _, c in lora_layers(model):
        out[c.lora_a.name] = c.lora_a.asnumpy()
        out[c.lora_b.name] = c.lora_b.asnumpy()
    return out


def merged_state(model) -> dict:
    """The base model's state (MindFormers names) with every adapter merged into its weight."""
    from ..models import state_dict_numpy
    state = {k: v for k, v in state_dict_numpy(model).items() if not k.endswith((".lora_a", ".lora_b"))}
    for _, c in lora_layers(model):
        state[c.base.weight.name] = c.merged_weight()
    return state
