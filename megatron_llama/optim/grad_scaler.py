"""Loss scaling for fp16 training: a dynamic scaler (Megatron-LM's DynamicGradScaler rules) and a constant one.

fp16 gradients underflow unless the loss is multiplied by a large factor S before backward; the
optimizer divides the gradients by S again. When any gradient overflows (Inf/NaN) the update is
skipped and, once `hysteresis` overflows have been seen, S is multiplied by `backoff_factor` (halved),
never going below `min_scale`. After `growth_interval` consecutive clean steps S is multiplied by
`growth_factor` (doubled) and the hysteresis budget is refilled.

Flags: --initial-loss-scale, --min-loss-scale, --loss-scale-window (growth interval), --hysteresis,
--loss-scale (a constant scale instead of a dynamic one).

Resuming: a dynamic scaler continues from the checkpoint's scale and counters (a checkpoint saved with a constant
scale gives its scale and a fresh window); a constant scale is the run's flag, whatever the checkpoint holds.
"""
from __future__ import annotations


class ConstantLossScaler:
    """A fixed loss scale; overflowing steps are still skipped by the optimizer."""

    def __init__(self, scale: float):
        self.scale = float(scale)

    def update(self, found_overflow: bool):
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict):
        """Nothing to restore: --loss-scale sets the scale of this run."""


class DynamicLossScaler:
    """Halve on overflow (after `hysteresis` overflows), grow after `growth_interval` clean steps."""

    def __init__(self, initial_scale: float = 2.0**32, min_scale: float = 1.0, growth_interval: int = 1000,
                 hysteresis: int = 2, growth_factor: float = 2.0, backoff_factor: float = 0.5):
        if initial_scale <= 0 or min_scale <= 0 or initial_scale < min_scale:
            raise ValueError(f"loss scales must be positive with initial >= min; got initial {initial_scale}, "
                             f"min {min_scale}")
        self.scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.clean_steps = 0
        self.hysteresis_left = hysteresis

    def update(self, found_overflow: bool):
        if found_overflow:
            self.clean_steps = 0
            self.hysteresis_left -= 1
            if self.hysteresis_left <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            return
        self.clean_steps += 1
        # >=, not ==: a run resumed with a shorter --loss-scale-window may load more clean steps than it needs
        if self.clean_steps >= self.growth_interval:
            self.clean_steps = 0
            self.hysteresis_left = self.hysteresis
            self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "hysteresis_left": self.hysteresis_left}

    def load_state_dict(self, state: dict):
        """The saved scale and counters; a constant scaler's state holds the scale only (a fresh window here)."""
        self.scale = float(state["scale"])
        self.clean_steps = int(state.get("clean_steps", 0))
        self.hysteresis_left = int(state.get("hysteresis_left", self.hysteresis))
