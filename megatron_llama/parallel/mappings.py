"""Autograd pairs that move activations into and out of the tensor-parallel region.

Each communication is a tiny autograd function whose backward is its mirror image
(Shoeybi et al. 2019, "Megatron-LM", section 3; Korthikanti et al. 2022 for the sequence
pairs). Each takes the tensor-parallel group it acts on (`layout.tensor_group`, passed down by
the layer that calls it) and returns its input untouched when the group has one member (or is None).

    copy_to_tensor_parallel_region        identity        | all-reduce      (the paper's f)
    reduce_from_tensor_parallel_region    all-reduce      | identity        (the paper's g)
    gather_from_tensor_parallel_region    all-gather last | split last dim
    gather_from_sequence_parallel_region  all-gather dim 1| reduce-scatter dim 1   (sequence-parallel f)
    reduce_scatter_to_sequence_parallel_region
                                          reduce-scatter 1| all-gather dim 1      (sequence-parallel g)

Activations are [b, s, h], so the sequence dimension is 1.
"""
from __future__ import annotations

import torch

from megatron_llama.parallel import comm

SEQUENCE_DIM = 1


def split_along(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's contiguous chunk of `tensor` along `dim`. [.., n, ..] -> [.., n / tp, ..]."""
    size = comm.group_size(group)
    if size == 1:
        return tensor
    if tensor.shape[dim] % size:
        raise ValueError(f"cannot split dimension {dim} of size {tensor.shape[dim]} across {size} tensor-parallel "
                         f"ranks: it must be a multiple of {size}")
    return tensor.chunk(size, dim=dim)[comm.group_rank(group)].contiguous()


class _CopyToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        # a copy: autograd may hand the same gradient tensor to another consumer
        return comm.all_reduce(grad.clone(memory_format=torch.contiguous_format), ctx.group), None


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return comm.all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_gather_along(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return split_along(grad, -1, ctx.group), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_gather_along(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return comm.reduce_scatter_along(grad, SEQUENCE_DIM, ctx.group), None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.reduce_scatter_along(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather_along(grad, SEQUENCE_DIM, ctx.group), None


def _apply(function, x: torch.Tensor, group) -> torch.Tensor:
    return x if comm.group_size(group) == 1 else function.apply(x, group)


def copy_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """f: identity forward, all-reduce of the gradient backward (input of a column-parallel layer)."""
    return _apply(_CopyToTensorParallelRegion, x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """g: all-reduce forward, identity backward (output of a row-parallel layer)."""
    return _apply(_ReduceFromTensorParallelRegion, x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the last dimension; backward keeps this rank's chunk. [.., h / tp] -> [.., h]."""
    return _apply(_GatherFromTensorParallelRegion, x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather the sequence; backward reduce-scatters the (partial) gradient. [b, s / tp, h] -> [b, s, h]."""
    return _apply(_GatherFromSequenceParallelRegion, x, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Sum partial results over tensor ranks, keep this rank's sequence chunk; backward all-gathers.
    [b, s, h] -> [b, s / tp, h]."""
    return _apply(_ReduceScatterToSequenceParallelRegion, x, group)
