"""Micro-batches for the trainer: a sampler that starts at the consumed-sample count, and collation.

Sample order is the dataset's own (a pure function of seed, data paths, weights and seq length);
the sampler only decides which indices go into which micro-batch. Global batch number n covers the
dataset indices [n * G, (n + 1) * G) (G = global batch size); within it, data-parallel rank r takes
micro-batch m as the indices

    start + m * (micro_batch_size * dp) + r * micro_batch_size  ... + micro_batch_size

so resuming at `consumed_samples` continues exactly where the previous run stopped, replaying and
skipping nothing. A sample is {"text": int64 array of seq_length + 1 tokens}; the model's input is
text[:-1] and its labels are text[1:]. An SFT sample (data/sft_dataset.py) adds "loss_mask" [seq_length + 1];
labels whose mask is 0 become IGNORE_INDEX (-100), which the cross entropy skips. A packed sample (data/packing.py)
adds "position_ids" and/or "document_ids" [seq_length + 1], cut like the tokens to [seq_length].
A micro-batch is a dict {"tokens", "labels"[, "position_ids", "document_ids"]}, each [b, s] int64
(collate_micro_batch): what the pipeline's forward step (model/stage_model.py) reads on every stage.
A DPO sample (data/preference_dataset.py) is a pair, [2, seq_length + 1]: it becomes two adjacent rows, chosen then
rejected.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from megatron_llama.parallel.cross_entropy import IGNORE_INDEX


class PretrainingSampler:
    """Dataset indices of this data-parallel rank's micro-batches, from `consumed_samples` on."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int = 0, data_parallel_size: int = 1):
        if consumed_samples > total_samples:
            raise ValueError(f"the run has consumed {consumed_samples} samples but the dataset holds "
                             f"only {total_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.data_parallel_size
        start = self.consumed_samples
        while start + step <= self.total_samples:
            first = start + self.data_parallel_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))
            start += step


def _rows(samples: list[dict], key: str, dtype=None) -> torch.Tensor:
    """The samples' `key` arrays as rows: [s + 1] each -> [b, s + 1]; [n, s + 1] each (n sequences that stay together,
    e.g. a preference pair) -> [b * n, s + 1], a sample's sequences adjacent and in order."""
    stacked = np.stack([np.asarray(sample[key], dtype=dtype) for sample in samples])
    return torch.from_numpy(stacked.reshape(-1, stacked.shape[-1]))


def collate(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """[{"text": [s + 1], optional "loss_mask": [s + 1]}] * b -> (tokens [b, s], labels [b, s]), int64.
    Samples of n sequences ([n, s + 1] each) give n * b rows (_rows)."""
    text = _rows(samples, "text", np.int64)
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()  # [b, s + 1] -> 2 x [b, s]
    if "loss_mask" in samples[0]:
        mask = _rows(samples, "loss_mask")[:, 1:]  # [b, s]
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    return tokens, labels


PACKING_FIELDS = ("position_ids", "document_ids")


def collate_micro_batch(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Samples -> {"tokens", "labels"} (collate) plus the packing fields the samples carry, cut to the inputs, and
    precomputed DPO reference log-probabilities ("reference_logps": [2] per pair -> [2b], one per row)."""
    tokens, labels = collate(samples)
    batch = {"tokens": tokens, "labels": labels}
    for field in PACKING_FIELDS:
        if field in samples[0]:
            batch[field] = _rows(samples, field, np.int64)[:, :-1].contiguous()  # [b, s + 1] -> [b, s], as tokens
    if "reference_logps" in samples[0]:
        batch["reference_logps"] = torch.from_numpy(
            np.concatenate([sample["reference_logps"] for sample in samples]).astype(np.float32))
    return batch


def as_micro_batch(batch) -> dict:
    """A micro-batch as the dict the pipeline's forward step reads; a (tokens, labels) pair becomes
    {"tokens", "labels"}."""
    if isinstance(batch, dict):
        return batch
    tokens, labels = batch
    return {"tokens": tokens, "labels": labels}


def micro_batches(dataset, sampler: PretrainingSampler, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batch (collate_micro_batch) on `device` for each micro-batch the sampler names."""
    for indices in sampler:
        batch = collate_micro_batch([dataset[index] for index in indices])
        if device.type == "cuda":
            batch = {name: tensor.pin_memory() for name, tensor in batch.items()}
        yield {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
