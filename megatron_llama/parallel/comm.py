"""Collectives on tensors, with every torch version difference handled here once.

torch 2.13 deprecates `all_gather_into_tensor` / `reduce_scatter_tensor` in favour of
`all_gather_single` / `reduce_scatter_single`, which torch 2.11 and older lack; the rest of
the package calls `all_gather_along` / `reduce_scatter_along` / `all_reduce` from here and
never touches `torch.distributed` for activations or gradients.

The dimension helpers move the collective dimension to the front, where the flat
collectives work on contiguous memory, and move it back afterwards, so callers can gather
or scatter along any dimension (the sequence dimension 1 of [b, s, h] activations, the last
dimension of tensor-parallel outputs). Every function returns its input untouched when the
group has one member, so nothing is communicated at tensor-parallel size 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group) -> int:
    """Members of `group` (None, or torch.distributed not started, means a group of one)."""
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank within `group` (0 in a group of one)."""
    return dist.get_rank(group) if group_size(group) > 1 else 0


def all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce `tensor` in place over `group` and return it."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_reduce_max(tensor: torch.Tensor, group) -> torch.Tensor:
    """The elementwise maximum of `tensor` over `group`, in place; returned."""
    return all_reduce(tensor, group, op=dist.ReduceOp.MAX)


def all_gather_along(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every member's `tensor` along `dim`, in rank order. [.., n, ..] -> [.., n * size, ..]."""
    size = group_size(group)
    if size == 1:
        return tensor
    front = tensor.movedim(dim, 0).contiguous()  # [n, ...]
    gathered = torch.empty((size * front.shape[0],) + tuple(front.shape[1:]), dtype=front.dtype, device=front.device)
    all_gather_flat(gathered, front, group=group)  # [size * n, ...]
    return gathered.movedim(0, dim)


def reduce_scatter_along(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum `tensor` over `group` and keep this member's chunk along `dim`. [.., n, ..] -> [.., n / size, ..]."""
    size = group_size(group)
    if size == 1:
        return tensor
    if tensor.shape[dim] % size:
        raise ValueError(f"cannot reduce-scatter dimension {dim} of size {tensor.shape[dim]} over {size} ranks: "
                         f"it must be a multiple of {size} (for sequence parallelism, make --seq-length a multiple "
                         f"of --tensor-model-parallel-size)")
    front = tensor.movedim(dim, 0).contiguous()  # [n, ...]
    reduced = torch.empty((front.shape[0] // size,) + tuple(front.shape[1:]), dtype=front.dtype, device=front.device)
    reduce_scatter_flat(reduced, front, group=group)  # [n / size, ...]
    return reduced.movedim(0, dim)


def broadcast_object(value, source_rank: int, group):
    """`value` of global rank `source_rank` on every member of `group` (any picklable object; others pass None).

    For control messages, not activations: the inference server sends each request from the rank that speaks HTTP.
    """
    if group_size(group) == 1:
        return value
    holder = [value]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    dist.broadcast_object_list(holder, src=source_rank, group=group, device=device)
    return holder[0]


def all_ranks_true(flag: bool, group, device: torch.device | None = None) -> bool:
    """True on every member of `group` when every member's `flag` is. `device`: where `group` reduces (None, the
    CPU, for gloo; the rank's GPU for nccl)."""
    return _reduced_flag(flag, group, dist.ReduceOp.MIN, device)


def any_rank_true(flag: bool, group, device: torch.device | None = None) -> bool:
    """True on every member of `group` when any member's `flag` is (`device` as for all_ranks_true)."""
    return _reduced_flag(flag, group, dist.ReduceOp.MAX, device)


def _reduced_flag(flag: bool, group, op, device: torch.device | None) -> bool:
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    return bool(all_reduce(value, group, op=op).item())
