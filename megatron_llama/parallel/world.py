"""The default process group: every process of the run, as torchrun launched it.

The one module outside the rest of parallel/ that touches torch.distributed's world, so that entry points,
data, checkpoints and optimizers ask here and never import torch.distributed themselves. Before the group
starts (or in a plain one-process run) every answer comes from torchrun's environment (RANK, WORLD_SIZE) or
is that of a single process: rank 0 of 1, no group, nothing to wait for.

    started = start_default_group("cuda", datetime.timedelta(minutes=10), 8)   # every rank; no-op for 1 process
    layout = state.initialize_model_parallel(tp, pp)                         # the groups of the layout on it
    ...
    barrier()                                # every rank of the run waits here
    agree_group = new_gloo_group()           # a group of all ranks on gloo (host-side control messages)
    ...
    state.destroy_model_parallel(); stop_default_group(started)
"""
from __future__ import annotations

import datetime
import os

import torch.distributed as dist


def is_distributed() -> bool:
    """A default process group is started in this process."""
    return dist.is_available() and dist.is_initialized()


def world_rank() -> int:
    """This process's rank: the started group's, else torchrun's RANK, else 0."""
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes of this run: the started group's size, else torchrun's WORLD_SIZE, else 1."""
    return dist.get_world_size() if is_distributed() else int(os.environ.get("WORLD_SIZE", "1"))


def world_group():
    """The default group (torch.distributed.group.WORLD) when started, else None (a group of one for comm.py)."""
    return dist.group.WORLD if is_distributed() else None


def start_default_group(device_type: str, timeout: datetime.timedelta, processes: int) -> bool:
    """Start the default group (nccl on "cuda", gloo otherwise) from torchrun's environment when the run has
    more than one process (`processes`, its configuration's world size) and none is started yet; True when this
    call started it. `timeout`: how long a collective of the default group waits before failing."""
    if processes == 1 or is_distributed():
        return False
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    return True


def stop_default_group(started: bool) -> None:
    """Destroy the default group if start_default_group started it (`started`, its answer)."""
    if started and is_distributed():
        dist.destroy_process_group()


def new_gloo_group():
    """A new gloo group of every rank (collectives on host tensors beside an nccl default group), None when
    not distributed. Every rank must call it, in the same order as its other new groups."""
    return dist.new_group(backend="gloo") if is_distributed() else None


def barrier(group=None) -> None:
    """Wait until every rank of `group` (None: the default group) arrives; returns at once when not distributed."""
    if is_distributed():
        dist.barrier(group=group)
