"""The interface every training objective implements; the training loop (training.py) knows only this.

An objective turns a step's micro-batches into the loss the pipeline schedule backpropagates, and says what to log
and how to evaluate:

    batches = objective.prepare(batches)                 # per step, before the forward-backward (a collective
                                                         # where the objective needs one, e.g. a loss-token count)
    run_schedule(chunks, batches, objective.loss_fn, ...)    # loss_fn(per_token_loss [b, s], micro_batch) -> scalar
    record.update(objective.metrics(device))             # extra fields of the training record (every rank calls it)
    values = objective.evaluate(model, batches, device)  # the evaluation record's values on held-out micro-batches

`loss_fn` returns this micro-batch's share of the global-batch loss (already divided by the global count), so the
gradient accumulation over micro-batches and the data-parallel reduction are plain sums, at any layout.
Implementations: objectives/language_model.py (pretraining and SFT), objectives/dpo.py (--dpo).
"""
from __future__ import annotations

import torch
from torch import nn


class Objective:
    """What the training loop asks of an objective (see the module docstring); subclasses implement every method."""

    def prepare(self, batches: list[dict]) -> list[dict]:
        """This step's micro-batches, made ready for loss_fn (e.g. with reference log-probabilities added)."""
        raise NotImplementedError

    def loss_fn(self, per_token_loss: torch.Tensor, micro_batch: dict) -> torch.Tensor:
        """The micro-batch's share of the step's loss, from the last stage's per-token loss [b, s]."""
        raise NotImplementedError

    def metrics(self, device: torch.device) -> dict[str, float]:
        """Extra fields of the training record since the last call (a collective: every rank calls it)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batches: list[dict], device: torch.device) -> dict[str, float]:
        """The evaluation record's values over `batches` (each data-parallel rank's own), on every rank."""
        raise NotImplementedError
