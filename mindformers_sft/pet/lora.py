"""LoRA from `model_config.pet_config` {pet_type: lora, lora_rank, lora_alpha, lora_dropout, target_modules}.

Target layers are chosen by a regex over MindFormers layer names (e.g. '.*wq|.*wk|.*wv|.*wo' matches
`model.layers.3.attention.wq`), fully matched. Each target `Linear` is wrapped in place: its `weight`/`bias`
keep their names, and it gains `<layer>.lora_a` (rank, in) and `<layer>.lora_b` (out, rank) — MindFormers'
names, and the shapes of PEFT's lora_A.weight / lora_B.weight. The base is frozen: only adapters train.

    y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T

Qwen3 / Qwen3-MoE layer names are MindFormers 1.8's (`decoder.layers.3.self_attention.linear_qkv`, `...linear_proj`,
`...mlp.linear_fc1`, `...mlp.linear_fc2`; with qkv_concat False `linear_q|linear_k|linear_v`, `mlp.gating|hidden`).
A fused linear_qkv / linear_fc1 gets one adapter whose B rows follow the fused layout (split them with
convert/names_qwen3.qkv_split / fc1_split for PEFT). The stacked experts of a MoE layer (`decoder.layers.N.mlp.experts`)
are adapted when the regex names them: they expose `enable_lora(rank, alpha, dropout)` (models/moe.py: per-expert
`experts.lora_a1/lora_b1/lora_a2/lora_b2`).
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
        h = self.matmul_b(h, ops.cast(self.base.rows(self.lora_b), self.base.compute_dtype)) * self.scaling
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
    experts = [(name, cell) for name, cell in model.cells_and_names() if hasattr(cell, "enable_lora")
               and pattern.fullmatch(name)]
    if not targets and not experts:
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
    for _, cell in experts:      # stacked MoE experts: adapters of their own (frozen base weights stay frozen)
        cell.enable_lora(pet["lora_rank"], pet["lora_alpha"], pet["lora_dropout"])
    return [n for n, _ in targets] + [n for n, _ in experts]


def lora_experts(model):
    """(name, experts cell) of every MoE experts cell with LoRA enabled."""
    return [(n, c) for n, c in model.cells_and_names() if hasattr(c, "enable_lora") and getattr(c, "lora_rank", 0)]


EXPERT_ADAPTERS = ("lora_a1", "lora_b1", "lora_a2", "lora_b2")


def lora_layers(model):
    return [(n, c) for n, c in model.cells_and_names() if isinstance(c, LoraLinear)]


def adapter_state(model) -> dict:
    """name -> numpy of the adapter parameters only (MindFormers names: ...wq.lora_a / lora_b)."""
    out = {}
    for _, c in lora_layers(model):
        out[c.lora_a.name] = c.lora_a.asnumpy()
        out[c.lora_b.name] = c.lora_b.asnumpy()
    for _, c in lora_experts(model):
        for attr in EXPERT_ADAPTERS:
            p = getattr(c, attr)
            out[p.name] = p.asnumpy()
    return out


def merged_state(model) -> dict:
    """The base model's state (MindFormers names) with every adapter merged into its weight."""
    from ..models import state_dict_numpy
    adapters = set(adapter_state(model))
    state = {k: v for k, v in state_dict_numpy(model).items() if k not in adapters}
    for _, c in lora_layers(model):
        state[c.base.weight.name] = c.merged_weight()
    for _, c in lora_experts(model):
        state[c.weight1.name], state[c.weight2.name] = c.merged_weights()
    return state
