"""Autograd pairs that move activations into and out of the tensor-parallel region.

Each communication is a tiny autograd function whose backward is its mirror image
(Shoeybi et al. 2019, "Megatron-LM", section 3; Korthikanti et al. 2022 for the sequence
pairs). All of them act on the tensor-parallel group of `parallel.state` and return their
input untouched at tensor-parallel size 1.

    copy_to_tensor_parallel_region        identity        | all-reduce      (the paper's f)
    reduce_from_tensor_parallel_region    all-reduce      | identity        (the paper's g)
    scatter_to_tensor_parallel_region     split last dim  | all-gather last dim
    gather_from_tensor_parallel_region    all-gather last | split last dim
    scatter_to_sequence_parallel_region   split dim 1     | all-gather dim 1
    gather_from_sequence_parallel_region  all-gather dim 1| reduce-scatter dim 1   (sequence-parallel f)
    reduce_scatter_to_sequence_parallel_region
                                          reduce-scatter 1| all-gather dim 1      (sequence-parallel g)

Activations are [b, s, h], so the sequence dimension is 1.
"""
from __future__ import annotations

import torch

from megatron_llama.parallel import comm, state

SEQUENCE_DIM = 1


def _group():
    return state.get_tensor_model_parallel_group()


def split_along(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """This tensor rank's contiguous chunk of `tensor` along `dim`. [.., n, ..] -> [.., n / tp, ..]."""
    size = state.get_tensor_model_parallel_world_size()
    if size == 1:
        return tensor
    if tensor.shape[dim] % size:
        hint = " (make --seq-length a multiple of --tensor-model-parallel-size)" if dim == SEQUENCE_DIM else ""
        raise ValueError(f"cannot split dimension {dim} of size {tensor.shape[dim]} across {size} tensor-parallel "
                         f"ranks: it must be a multiple of {size}{hint}")
    return tensor.chunk(size, dim=dim)[state.get_tensor_model_parallel_rank()].contiguous()


class _CopyToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return comm.all_reduce(grad.clone(memory_format=torch.contiguous_format), _group())  # autograd may share grad


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return comm.all_reduce(x.clone(), _group())

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return split_along(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather_along(grad, -1, _group())


class _GatherFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return comm.all_gather_along(x, -1, _group())

    @staticmethod
    def backward(ctx, grad):
        return split_along(grad, -1)


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return split_along(x, SEQUENCE_DIM)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather_along(grad, SEQUENCE_DIM, _group())


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return comm.all_gather_along(x, SEQUENCE_DIM, _group())

    @staticmethod
    def backward(ctx, grad):
        return comm.reduce_scatter_along(grad, SEQUENCE_DIM, _group())


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return comm.reduce_scatter_along(x, SEQUENCE_DIM, _group())

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather_along(grad, SEQUENCE_DIM, _group())


def _apply(function, x: torch.Tensor) -> torch.Tensor:
    return x if state.get_tensor_model_parallel_world_size() == 1 else function.apply(x)


def copy_to_tensor_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """f: identity forward, all-reduce of the gradient backward (input of a column-parallel layer)."""
    return _apply(_CopyToTensorParallelRegion, x)


def reduce_from_tensor_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """g: all-reduce forward, identity backward (output of a row-parallel layer)."""
    return _apply(_ReduceFromTensorParallelRegion, x)


def scatter_to_tensor_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Keep this rank's chunk of the last dimension; backward all-gathers it. [.., h] -> [.., h / tp]."""
    return _apply(_ScatterToTensorParallelRegion, x)


def gather_from_tensor_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """All-gather along the last dimension; backward keeps this rank's chunk. [.., h / tp] -> [.., h]."""
    return _apply(_GatherFromTensorParallelRegion, x)


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Keep this rank's sequence chunk; backward all-gathers. [b, s, h] -> [b, s / tp, h]."""
    return _apply(_ScatterToSequenceParallelRegion, x)


def gather_from_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """All-gather the sequence; backward reduce-scatters the (partial) gradient. [b, s / tp, h] -> [b, s, h]."""
    return _apply(_GatherFromSequenceParallelRegion, x)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Sum partial results over tensor ranks, keep this rank's sequence chunk; backward all-gathers.
    [b, s, h] -> [b, s / tp, h]."""
    return _apply(_ReduceScatterToSequenceParallelRegion, x)
