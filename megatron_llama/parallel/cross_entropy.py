"""Cross entropy over (possibly vocabulary-parallel) logits.

Columns at or beyond `vocab_size` are vocabulary padding: they are excluded from the
softmax, so padding never changes the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token loss. logits [b, s, padded_vocab], labels [b, s] -> loss [b, s] (fp32)."""
    logits = logits.float()
    if logits.shape[-1] > vocab_size:
        logits = logits[..., :vocab_size]
    return F.cross_entropy(logits.reshape(-1, vocab_size), labels.reshape(-1), reduction="none").view_as(labels)
