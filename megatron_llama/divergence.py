"""Finite divergence: a loss or gradient norm far above its running reference (--check-for-spiky-loss,
--check-for-large-grads, both on by default; NaN/Inf is training.py's own check).

    watch = DivergenceWatch(config.training)
    spike = watch.observe(iteration, loss, grad_norm)   # None, or a Spike: warn, or stop when spike.stop
    watch.spiked_before_save(iteration)                 # None, or why the state must not be saved

The rule, for every applied iteration (an fp16 step skipped for overflow is not looked at):
  * the reference is the last --spike-reference-iters (20) iterations that were not spikes; its medians of the loss
    and of the gradient norm are the yardsticks (the first iteration of a run or a resume has none and is only
    recorded);
  * a spike is a loss above --spiky-loss-factor (2) x the median loss, or a gradient norm above --large-grad-factor
    (10) x the median gradient norm; a spike warns and stays out of the reference, so a run that keeps diverging is
    measured against its healthy past;
  * --spikes-before-stop (3) spikes among the last --spike-reference-iters iterations stop the run: training.py
    raises TrainingDiverged (exit 1), nothing saved;
  * a checkpoint due right after a spike is not written: the run stops as diverged (`spiked_before_save`), so a
    spiking state is never published.
Healthy runs measured (the quickstart at lr 3e-3, 300 iterations, and the trainer tests: tiny models from scratch,
loss falling from ln V) stay within 1.1x the median loss and 3x the median gradient norm; the quickstart's model at
--lr 1.0 spikes from iteration 4 (gradient norm 20 against 2.5, loss 17 against 9) and is stopped at iteration 23.
The loss and gradient norm are equal on every rank, so every rank decides alike without communicating.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

from megatron_llama.config import TrainingConfig


@dataclass(frozen=True)
class Spike:
    message: str  # names the iteration, the value, the factor and the reference
    stop: bool  # the spikes among the recent iterations reached --spikes-before-stop


class DivergenceWatch:
    """The running reference of one run's losses and gradient norms, and the spikes among the recent iterations."""

    def __init__(self, training: TrainingConfig):
        self.check_loss, self.check_grads = training.check_for_spiky_loss, training.check_for_large_grads
        self.loss_factor, self.grad_factor = training.spiky_loss_factor, training.large_grad_factor
        self.window, self.spikes_before_stop = training.spike_reference_iters, training.spikes_before_stop
        self.losses: deque[float] = deque(maxlen=self.window)
        self.grad_norms: deque[float] = deque(maxlen=self.window)
        self.recent_spikes: deque[int] = deque()  # iterations of the spikes among the last `window`
        self.last_spike: str | None = None  # what the latest observed iteration did, when it was a spike

    @property
    def enabled(self) -> bool:
        return self.check_loss or self.check_grads

    def observe(self, iteration: int, loss: float, grad_norm: float) -> Spike | None:
        """Record an applied iteration; the Spike when it is one (stop: the run has diverged)."""
        self.last_spike = self._spike(loss, grad_norm) if self.enabled and self.losses else None
        while self.recent_spikes and self.recent_spikes[0] <= iteration - self.window:
            self.recent_spikes.popleft()
        if self.last_spike is None:
            self.losses.append(loss)
            self.grad_norms.append(grad_norm)
            return None
        self.recent_spikes.append(iteration)
        return Spike(f"iteration {iteration}: {self.last_spike}; spike {len(self.recent_spikes)} of "
                     f"--spikes-before-stop {self.spikes_before_stop} within {self.window} iterations",
                     stop=len(self.recent_spikes) >= self.spikes_before_stop)

    def spiked_before_save(self, iteration: int) -> str | None:
        """Why iteration `iteration`'s state must not be saved (it spiked), or None."""
        if self.last_spike is None:
            return None
        return f"iteration {iteration}: {self.last_spike}, and a checkpoint was due: a spiking state is not saved"

    def _spike(self, loss: float, grad_norm: float) -> str | None:
        median_loss, median_grad_norm = statistics.median(self.losses), statistics.median(self.grad_norms)
        if self.check_loss and loss > self.loss_factor * median_loss:
            return (f"loss {loss:.4g} is above --spiky-loss-factor {self.loss_factor:g} x the median {median_loss:.4g} "
                    f"of the last {len(self.losses)} iterations")
        if self.check_grads and grad_norm > self.grad_factor * median_grad_norm:
            return (f"gradient norm {grad_norm:.4g} is above --large-grad-factor {self.grad_factor:g} x the median "
                    f"{median_grad_norm:.4g} of the last {len(self.grad_norms)} iterations")
        return None
