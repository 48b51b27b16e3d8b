"""Direct preference optimization (--dpo): the DPO loss of a micro-batch of preference pairs, and the frozen
reference policy that gives its reference log-probabilities in the same step.

A micro-batch of b pairs holds 2b rows, each pair's chosen and rejected answer adjacent (data/preference_dataset.py,
data_loader.collate); labels are IGNORE_INDEX outside the answers. The log-probability of an answer under a policy
is the sum over its tokens of minus the vocab-parallel cross entropy, which is 0 on ignored labels:

    log pi(y | x) = -per_token_loss.sum(-1)         [2b, s] -> [2b] -> [b, 2] (chosen, rejected)

With r = beta * (log pi - log pi_ref), the rewards of Rafailov et al. (2023), per pair:

    sigmoid  loss = -log sigmoid(r_chosen - r_rejected)                                        (DPO, eq. 7)
    ipo      loss = (h - 1 / (2 beta))^2,  h = (log-ratio / answer tokens)_chosen - (...)_rejected  (IPO, eq. 17;
             log-ratios averaged over the answer's tokens, as TRL's DPOTrainer does)

The loss of a step is the mean over the global batch's pairs: each micro-batch adds sum(pair losses) / G (G pairs
in the global batch), so gradient accumulation and the data-parallel sum give the mean, at any (tp, pp, dp).

The reference policy is a second, frozen copy of this rank's chunks holding the weights of --dpo-reference (by
default the model as loaded with --load ... --finetune; checkpoint.dpo_reference_folder).
Before a step's forward-backward it runs the same micro-batches forward only, through the same pipeline schedule
(or, with --dpo-precompute-reference, every pair's reference log-probabilities are computed once before training,
precompute_reference_logps, the reference copy is freed, and the micro-batches carry them):

    objective = DPOObjective(layout, reference_model, beta=0.1, loss_type="sigmoid", pairs_in_global_batch=G)
    batches = objective.prepare(batches)                 # adds "reference_logps" [2b] on the last stage
    run_schedule(chunks, batches, objective.loss_fn, ...)
    objective.metrics()                                  # means since the last call; every rank calls it

    dataset.reference_logps = precompute_reference_logps(reference_model, dataset, pairs_per_micro_batch, layout,
                                                         device)
    objective = DPOObjective(layout, None, ...)                 # --dpo-precompute-reference: the samples carry them

The step's loss is logged as the run's loss; `metrics` gives the rewards of the chosen and rejected answers, the
reward accuracy (how often the chosen reward is the larger) and margin (chosen - rejected), averaged over the pairs
seen since its last call; `evaluate` gives the loss and the same metrics on held-out pairs (--valid-data-path).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from megatron_llama.data_loader import as_micro_batch, collate_micro_batch
from megatron_llama.model.stage_model import llama_forward_step, model_chunks, schedule_shapes
from megatron_llama.objectives.base import Objective
from megatron_llama.parallel import comm
from megatron_llama.parallel.cross_entropy import IGNORE_INDEX
from megatron_llama.parallel.pipeline import broadcast_from_last_stage, run_schedule
from megatron_llama.parallel.state import ParallelLayout

DPO_LOSSES = ("sigmoid", "ipo")
PRECOMPUTE_MICRO_BATCHES = 32  # micro-batches per forward-only schedule run while precomputing the reference
METRICS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin")


def sequence_log_probs(per_token_loss: torch.Tensor) -> torch.Tensor:
    """Per-token loss [2b, s] (0 on ignored labels) -> log-probability of each row's answer [2b], fp32."""
    return -per_token_loss.float().sum(dim=-1)


def dpo_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float, loss_type: str,
             answer_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss and the rewards of the chosen and rejected answers, each [b], from log-probabilities [b, 2]
    (column 0 chosen, 1 rejected); IPO needs the answers' token counts [b, 2]."""
    log_ratios = policy_logps - reference_logps  # [b, 2]
    rewards = beta * log_ratios.detach()
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (log_ratios[:, 0] - log_ratios[:, 1]))
    elif loss_type == "ipo":
        mean_ratios = log_ratios / answer_tokens.clamp(min=1)
        losses = (mean_ratios[:, 0] - mean_ratios[:, 1] - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r} (--dpo-loss); choose one of {', '.join(DPO_LOSSES)}")
    return losses, rewards[:, 0], rewards[:, 1]


def _reference_log_probs(reference_chunks: list[nn.Module], batches: list[dict],
                         layout: ParallelLayout) -> list[torch.Tensor]:
    """The frozen reference's log-probability of every row of `batches` ([2b] per micro-batch, last stage only)."""
    return run_schedule(reference_chunks, batches, lambda per_token_loss, _: sequence_log_probs(per_token_loss),
                        layout=layout, forward_step=llama_forward_step, **schedule_shapes(reference_chunks, batches),
                        forward_only=True)


def frozen_chunks(reference_model: nn.Module) -> list[nn.Module]:
    """The reference's pipeline chunks in eval mode, their parameters excluded from autograd."""
    chunks = model_chunks(reference_model)
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks


@torch.no_grad()
def precompute_reference_logps(reference_model: nn.Module, dataset, pairs_per_micro_batch: int,
                               layout: ParallelLayout, device: torch.device) -> np.ndarray:
    """Every pair's reference log-probabilities, [pairs, 2] float32 (chosen, rejected), on every rank: each
    data-parallel rank runs its share of the pairs through the pipeline (forward only), then the shares are summed.
    `dataset`: a PreferenceDataset (its pair_sample)."""
    chunks = frozen_chunks(reference_model)
    pairs = len(dataset.pairs)
    table = torch.zeros(pairs, 2, dtype=torch.float32, device=device)
    mine = list(range(layout.data_rank, pairs, layout.data_size))
    groups = [mine[start:start + pairs_per_micro_batch] for start in range(0, len(mine), pairs_per_micro_batch)]
    for first in range(0, len(groups), PRECOMPUTE_MICRO_BATCHES):
        window = groups[first:first + PRECOMPUTE_MICRO_BATCHES]
        batches = [{name: tensor.to(device) for name, tensor in collate_micro_batch(
            [dataset.pair_sample(pair) for pair in group + group[-1:] * (pairs_per_micro_batch - len(group))]).items()}
            for group in window]  # the last micro-batch filled up with its last pair; the extra rows are dropped
        for group, logps in zip(window, _reference_log_probs(chunks, batches, layout)):
            table[group] = logps.view(-1, 2)[:len(group)]  # [2b] -> [b, 2]
    broadcast_from_last_stage(table, layout)
    comm.all_reduce(table, layout.data_group)
    return table.cpu().numpy()


class DPOObjective(Objective):
    """The schedule's loss function for preference pairs, its frozen reference chunks (None when the micro-batches
    carry precomputed "reference_logps") and its running metrics."""

    def __init__(self, layout: ParallelLayout, reference_model: nn.Module | None, beta: float, loss_type: str,
                 pairs_in_global_batch: int):
        if loss_type not in DPO_LOSSES:
            raise ValueError(f"unknown DPO loss {loss_type!r} (--dpo-loss); choose one of {', '.join(DPO_LOSSES)}")
        self.reference_chunks = frozen_chunks(reference_model) if reference_model is not None else None
        self.layout, self.beta, self.loss_type, self.pairs_in_global_batch = layout, beta, loss_type, pairs_in_global_batch
        self._sums = None  # [pairs, *METRICS] summed over this rank's micro-batches since the last metrics()

    @torch.no_grad()
    def prepare(self, batches: list) -> list[dict]:
        """The micro-batches as dicts, each with its rows' reference log-probabilities ("reference_logps" [2b]) on
        the last pipeline stage, where the loss is computed (other stages get the dicts unchanged)."""
        batches = [as_micro_batch(batch) for batch in batches]
        if self.reference_chunks is None:
            if not all("reference_logps" in batch for batch in batches):
                raise ValueError("the DPO reference was precomputed, but a micro-batch carries no reference_logps")
            return batches
        reference = _reference_log_probs(self.reference_chunks, batches, self.layout)
        return [dict(batch, reference_logps=logps) for batch, logps in zip(batches, reference)] or batches

    def loss_fn(self, per_token_loss: torch.Tensor, micro_batch: dict) -> torch.Tensor:
        """run_schedule's loss: this micro-batch's share of the global-batch mean DPO loss; records the metrics."""
        losses, sums = self._pair_losses(per_token_loss, micro_batch)
        self._sums = sums if self._sums is None else self._sums + sums
        return losses.sum() / self.pairs_in_global_batch

    def _pair_losses(self, per_token_loss: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair losses [b] and the sums [pairs, *METRICS] of the micro-batch's pairs."""
        policy = sequence_log_probs(per_token_loss).view(-1, 2)  # [2b] -> [b, 2]
        reference = micro_batch["reference_logps"].view(-1, 2)
        answer_tokens = (micro_batch["labels"] != IGNORE_INDEX).sum(dim=-1).view(-1, 2)
        losses, chosen, rejected = dpo_loss(policy, reference, self.beta, self.loss_type, answer_tokens)
        sums = torch.stack([torch.tensor(float(len(losses)), device=losses.device), chosen.sum(), rejected.sum(),
                            (chosen > rejected).float().sum(), (chosen - rejected).sum()])
        return losses, sums

    def metrics(self, device: torch.device) -> dict[str, float]:
        """Means over the pairs of every data-parallel rank since the last call (METRICS); a collective: every rank
        calls it at the same iteration."""
        sums, self._sums = self._sums, None
        return _means_over_ranks(sums, self.layout, device, METRICS)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[dict], device: torch.device) -> dict[str, float]:
        """The mean DPO loss ("loss") and METRICS over the pairs of `batches` (each data-parallel rank's own), on
        every rank; the training metrics are left as they are."""
        chunks = model_chunks(model)
        was_training = model.training
        model.eval()
        batches = self.prepare(batches)

        def pair_sums(per_token_loss: torch.Tensor, micro_batch: dict) -> torch.Tensor:
            losses, sums = self._pair_losses(per_token_loss, micro_batch)
            return torch.cat([sums[:1], losses.sum()[None], sums[1:]])  # [pairs, loss, *METRICS]

        sums = run_schedule(chunks, batches, pair_sums, layout=self.layout, forward_step=llama_forward_step,
                            **schedule_shapes(chunks, batches), forward_only=True)
        model.train(was_training)
        return _means_over_ranks(torch.stack(sums).sum(dim=0) if sums else None, self.layout, device,
                                 ("loss", *METRICS))


def _means_over_ranks(sums: torch.Tensor | None, layout: ParallelLayout, device: torch.device,
                      names: tuple[str, ...]) -> dict[str, float]:
    """Sums [pairs, *names] of the last stage (None elsewhere, or with no pair) -> each name's mean over the pairs
    of every data-parallel rank; a collective of the pipeline and data-parallel groups."""
    sums = sums.double() if sums is not None else torch.zeros(1 + len(names), dtype=torch.float64, device=device)
    broadcast_from_last_stage(sums, layout)
    comm.all_reduce(sums, layout.data_group)
    pairs = max(float(sums[0]), 1.0)
    return {name: float(value) / pairs for name, value in zip(names, sums[1:].tolist())}
