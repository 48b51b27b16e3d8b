"""Learning-rate schedule: linear warmup, then cosine, linear or constant decay to the minimum.

The formulas are Megatron-LM's (OptimizerParamScheduler), written per optimizer update k = 1, 2, ...
(the iteration number after the update):

    warmup (k <= W, W > 0):   lr = init + (max_lr - init) * k / W
    after decay (k > D):      lr = min_lr
    otherwise, with r = (k - W) / (D - W):
        linear:    lr = min_lr + (max_lr - min_lr) * (1 - r)
        cosine:    lr = min_lr + (max_lr - min_lr) * 0.5 * (cos(pi * r) + 1)
        constant:  lr = max_lr

W is --lr-warmup-iters, D is --lr-decay-iters (default --train-iters), init is --lr-warmup-init.
Update k uses lr(k), so warmup reaches max_lr exactly at update W and no update runs with lr 0.
The schedule is a pure function of k: resuming at iteration k needs nothing but these settings.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

DECAY_STYLES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class LearningRateSchedule:
    max_lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    decay_style: str = "cosine"
    warmup_init: float = 0.0

    def __post_init__(self):
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(f"unknown lr decay style {self.decay_style!r}; use one of {', '.join(DECAY_STYLES)}")

    def lr_at(self, iteration: int) -> float:
        """The learning rate of update number `iteration` (1-based)."""
        if self.warmup_iters > 0 and iteration <= self.warmup_iters:
            return self.warmup_init + (self.max_lr - self.warmup_init) * iteration / self.warmup_iters
        if self.decay_style == "constant":
            return self.max_lr
        if iteration > self.decay_iters:
            return self.min_lr
        decay_ratio = (iteration - self.warmup_iters) / (self.decay_iters - self.warmup_iters)
        if self.decay_style == "linear":
            coefficient = 1.0 - decay_ratio
        else:
            coefficient = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
        return self.min_lr + (self.max_lr - self.min_lr) * coefficient

    def state_dict(self) -> dict:
        return asdict(self)
