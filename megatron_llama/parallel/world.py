"""The default process group of a run (every process torchrun started): starting and stopping it, this
process's rank and the world's size before and after it starts, and groups over all ranks.

    started = start_default_group("cuda", datetime.timedelta(minutes=10), processes=8)   # nccl on cuda, gloo on cpu
    world_rank(), world_size()      # torchrun's RANK / WORLD_SIZE before the group starts, the group's after
    stop_default_group(started)
"""
from __future__ import annotations

import datetime
import os

import torch.distributed as dist


def is_distributed() -> bool:
    """The default process group has been started."""
    return dist.is_available() and dist.is_initialized()


def world_rank() -> int:
    """This process's global rank: the started group's, else torchrun's RANK, else 0."""
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes of this run: the started group's size, else torchrun's WORLD_SIZE, else 1."""
    return dist.get_world_size() if is_distributed() else int(os.environ.get("WORLD_SIZE", "1"))


def world_group():
    """The group of every rank (None when no group was started: a single process)."""
    return dist.group.WORLD if is_distributed() else None


def start_default_group(device_type: str, timeout: datetime.timedelta, processes: int) -> bool:
    """Start the default group (nccl on cuda, gloo on cpu) of a run of `processes` (its configuration's world size)
    when there are several and none is started; True when this call started it."""
    if processes == 1 or is_distributed():
        return False
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    return True


def stop_default_group(started: bool) -> None:
    """Destroy the default group if `started` (this process started it)."""
    if started and is_distributed():
        dist.destroy_process_group()


def new_gloo_group():
    """A new gloo group over every rank (None on a single process); every rank must call it."""
    return dist.new_group(backend="gloo") if is_distributed() else None


def barrier(group=None) -> None:
    """Wait until every rank of `group` (default: all) arrives; nothing on a single process."""
    if is_distributed():
        dist.barrier(group=group)
