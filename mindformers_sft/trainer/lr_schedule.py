"""Learning-rate schedules with linear warmup, as MindFormers' CosineWithWarmUpLR / LinearWithWarmUpLR /
ConstantWarmUpLR: a pure function of the optimizer step, so resuming at step N gives the same rate."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError

_KIND = {"CosineWithWarmUpLR": "cosine", "cosine": "cosine", "CosineWithRestartsAndWarmUpLR": "cosine",
         "LinearWithWarmUpLR": "linear", "linear": "linear", "PolynomialWithWarmUpLR": "linear",
         "ConstantWarmUpLR": "constant", "constant": "constant"}


@dataclass
class LRSchedule:
    kind: str
    learning_rate: float
    total_steps: int
    warmup_steps: int = 0
    lr_end: float = 0.0
    warmup_lr_init: float = 0.0
    num_cycles: float = 0.5

    def __call__(self, step: int) -> float:
        """Rate for optimizer step `step` (0-based: the first update uses step 0)."""
        if step < self.warmup_steps:
            frac = (step + 1) / self.warmup_steps
            return self.warmup_lr_init + (self.learning_rate - self.warmup_lr_init) * frac
        if self.kind == "constant":
            return self.learning_rate
        decay = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay)
        if self.kind == "linear":
            return self.lr_end + (self.learning_rate - self.lr_end) * (1.0 - progress)
        cos = 0.5 * (1.0 + math.cos(math.pi * 2.0 * self.num_cycles * progress))
        return self.lr_end + (self.learning_rate - self.lr_end) * cos


def build_lr_schedule(cfg, total_steps: int) -> LRSchedule:
    """cfg: the `lr_schedule` section; total_steps: optimizer steps of the run (used when total_steps is -1)."""
    kind = _KIND.get(cfg.type)
    if kind is None:
        raise ConfigError(f"lr_schedule.type: '{cfg.type}' is not supported; expected one of {sorted(_KIND)}")
    steps = cfg.total_steps if cfg.total_steps and cfg.total_steps > 0 else total_steps
    if cfg.decay_steps:
        steps = cfg.decay_steps + (cfg.warmup_steps or 0)
    warmup = cfg.warmup_steps or 0
    if cfg.warmup_ratio:
        if not 0 <= cfg.warmup_ratio < 1:
            raise ConfigError(f"lr_schedule.warmup_ratio: expected a value in [0, 1), got {cfg.warmup_ratio}")
        warmup = int(steps * cfg.warmup_ratio)
    return LRSchedule(kind=kind, learning_rate=float(cfg.learning_rate), total_steps=int(steps),
                      warmup_steps=int(warmup), lr_end=float(cfg.lr_end or 0.0),
                      warmup_lr_init=float(cfg.warmup_lr_init or 0.0), num_cycles=float(cfg.num_cycles))
