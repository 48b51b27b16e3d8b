"""Seeding for a parallel layout, and activation recompute that replays the random state.

`set_random_seeds(seed, layout)` seeds python, numpy and torch (CPU, and every GPU) with
seed + 100 * pipeline rank (Megatron-LM's convention): the same on every tensor and data rank,
so randomness on replicated activations agrees across tensor ranks; different per pipeline stage,
which holds different layers.

`checkpoint(function, *args)` recomputes `function` during backward instead of keeping its
activations; the default generators (CPU and the input's device) are restored first, so the
recomputed forward draws the same random numbers and the gradients equal those without
recompute.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.utils.checkpoint

from megatron_llama.parallel.state import ParallelLayout


def set_random_seeds(seed: int, layout: ParallelLayout) -> None:
    """Seed python, numpy and torch: equal across tensor and data ranks, different per pipeline stage."""
    default_seed = seed + 100 * layout.pipeline_rank
    random.seed(default_seed)
    np.random.seed(default_seed % 2**32)
    torch.manual_seed(default_seed)


def checkpoint(function, *args, **kwargs):
    """function(*args, **kwargs) with its activations recomputed in backward, random states replayed."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
