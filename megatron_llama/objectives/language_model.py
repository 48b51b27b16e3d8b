"""The language-model objective of pretraining and SFT: the mean next-token cross entropy over the global batch.

Each micro-batch contributes sum(per-token loss) / T, T the tokens that carry a loss in the whole global batch, so
gradient accumulation and the data-parallel sum give the gradient of one big batch. In pretraining T = G x s
(G sequences of s tokens); with SFT (--sft) or --eod-mask-loss some labels are IGNORE_INDEX and add nothing, and T is
the count of the others over the global batch (loss_token_count: one all-reduce per step), so the loss is the mean
over the learned tokens, sum(loss x mask) / sum(mask).

    objective = LanguageModelObjective(layout, global_batch_size=G, seq_length=s, count_loss_tokens=sft)
    batches = objective.prepare(batches)        # counts T when it must
    run_schedule(chunks, batches, objective.loss_fn, ...)
    objective.evaluate(model, batches, device)  # {"loss": mean per-token loss, "perplexity": exp(loss)}
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from megatron_llama.data_loader import as_micro_batch
from megatron_llama.metrics import perplexity
from megatron_llama.model.stage_model import llama_forward_step, model_chunks, schedule_shapes
from megatron_llama.objectives.base import Objective
from megatron_llama.parallel import comm
from megatron_llama.parallel.cross_entropy import IGNORE_INDEX
from megatron_llama.parallel.pipeline import broadcast_from_last_stage, run_schedule
from megatron_llama.parallel.state import ParallelLayout


def token_mean_loss(tokens_in_global_batch: int) -> Callable[[torch.Tensor, dict], torch.Tensor]:
    """run_schedule's loss: a micro-batch's summed per-token loss over the global batch's loss-carrying tokens."""
    return lambda per_token_loss, _: per_token_loss.sum() / tokens_in_global_batch


def loss_token_count(batches: Iterable, layout: ParallelLayout, device: torch.device) -> int:
    """Labels that are not IGNORE_INDEX in the global batch: this rank's micro-batches, summed over data-parallel
    ranks (every tensor and pipeline rank holds the labels, so each computes the same count)."""
    count = torch.zeros(1, dtype=torch.int64, device=device)
    for batch in batches:
        count += (as_micro_batch(batch)["labels"] != IGNORE_INDEX).sum().to(device)  # summed on the device: one sync
    comm.all_reduce(count, layout.data_group)
    return int(count.item())


@torch.no_grad()
def evaluate_token_loss(model: nn.Module, batches: Iterable, layout: ParallelLayout) -> float:
    """Mean per-token loss over `batches` (each data-parallel rank's own), taken over all data-parallel ranks."""
    chunks = model_chunks(model)
    batches = [as_micro_batch(batch) for batch in batches]
    was_training = model.training
    model.eval()
    losses = run_schedule(chunks, batches, lambda per_token_loss, _: per_token_loss.double().sum(), layout=layout,
                          forward_step=llama_forward_step, **schedule_shapes(chunks, batches), forward_only=True)
    model.train(was_training)
    device = next(chunks[0].parameters()).device
    loss_sum = torch.stack(losses).sum() if losses else torch.zeros((), dtype=torch.float64, device=device)
    token_count = sum(int((batch["labels"] != IGNORE_INDEX).sum()) for batch in batches)
    totals = torch.stack([loss_sum, torch.tensor(float(token_count), dtype=torch.float64, device=device)])
    broadcast_from_last_stage(totals[:1], layout)
    comm.all_reduce(totals, layout.data_group)
    return float(totals[0] / totals[1])


class LanguageModelObjective(Objective):
    """Pretraining and SFT: the global-batch mean next-token loss (the module docstring)."""

    def __init__(self, layout: ParallelLayout, global_batch_size: int, seq_length: int, count_loss_tokens: bool,
                 device: torch.device):
        self.layout, self.device, self.count_loss_tokens = layout, device, count_loss_tokens
        self.tokens_in_global_batch = global_batch_size * seq_length

    def prepare(self, batches: list) -> list[dict]:
        batches = [as_micro_batch(batch) for batch in batches]
        if self.count_loss_tokens:
            self.tokens_in_global_batch = loss_token_count(batches, self.layout, self.device)
        return batches

    def loss_fn(self, per_token_loss: torch.Tensor, micro_batch: dict) -> torch.Tensor:
        return per_token_loss.sum() / self.tokens_in_global_batch

    def metrics(self, device: torch.device) -> dict[str, float]:
        return {}

    def evaluate(self, model: nn.Module, batches: list[dict], device: torch.device) -> dict[str, float]:
        loss = evaluate_token_loss(model, batches, self.layout)
        return {"loss": loss, "perplexity": perplexity(loss)}
