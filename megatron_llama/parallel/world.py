"""The whole world of processes: this process's global rank and the number of processes, also before the default
process group starts (torchrun's RANK and WORLD_SIZE), and groups over every rank.

    rank, size = world_rank(), world_size()
    group = new_gloo_group()      # every rank must call it, in the same order; None in a one-process run
"""
from __future__ import annotations

import os

import torch.distributed as dist


def world_rank() -> int:
    """This process's global rank: the default group's once it has started, else torchrun's RANK (0 when unset)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes: the default group's once it has started, else torchrun's WORLD_SIZE (1 when unset)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def new_gloo_group():
    """A new gloo group over every rank (a collective call: every rank makes it), or None when torch.distributed
    has not started."""
    return dist.new_group(backend="gloo") if dist.is_initialized() else None
