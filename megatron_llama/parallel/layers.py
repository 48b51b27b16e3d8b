"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding.

The model is written only against these classes. At tensor-parallel size 1 each is a
plain linear or embedding layer; the tensor-parallel work (Megatron-LM paper, section 3)
changes these classes and never the model.

Layout-independent initialisation: a weight with `init_std` set is drawn whole, in its
full (unpartitioned) shape, from a generator seeded by (seed, parameter name), and then
the local slice is kept (`tensor_parallel_dim` says which dimension is split). So the
initial model depends only on the seed and the parameter's place in the full model,
never on tp, pp or dp. Parameters without `init_std` keep their constructor values
(norm weights ones, biases zeros).
"""
from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn


def _mark(param: nn.Parameter, tensor_parallel_dim: int | None, full_shape: tuple[int, ...], init_std: float | None):
    param.tensor_parallel_dim = tensor_parallel_dim  # None: replicated on every tensor rank
    param.full_shape = full_shape
    param.init_std = init_std
    return param


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A's output rows split across tensor ranks. [.., in] -> [.., out/tp]."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, init_std: float = 0.02):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = _mark(nn.Parameter(torch.empty(output_size, input_size)), 0, (output_size, input_size), init_std)
        self.bias = _mark(nn.Parameter(torch.zeros(output_size)), 0, (output_size,), None) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A's input columns split across tensor ranks. [.., in/tp] -> [.., out]."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, init_std: float = 0.02):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = _mark(nn.Parameter(torch.empty(output_size, input_size)), 1, (output_size, input_size), init_std)
        self.bias = _mark(nn.Parameter(torch.zeros(output_size)), None, (output_size,), None) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary rows split across tensor ranks. [b, s] -> [b, s, h]."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init_std: float = 0.02):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = _mark(nn.Parameter(torch.empty(num_embeddings, embedding_dim)), 0,
                            (num_embeddings, embedding_dim), init_std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


def parameter_seed(seed: int, name: str) -> int:
    """A seed that depends only on the run's seed and the parameter's name in the full model."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def initialize_parameters(module: nn.Module, seed: int, *, tensor_parallel_rank: int = 0, tensor_parallel_size: int = 1):
    """Draw every parameter with `init_std` whole from its own generator, keep the local slice."""
    for name, param in module.named_parameters():
        std = getattr(param, "init_std", None)
        if std is None:
            continue
        generator = torch.Generator(device="cpu").manual_seed(parameter_seed(seed, name))
        full = torch.empty(param.full_shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
        dim = param.tensor_parallel_dim
        if dim is not None and tensor_parallel_size > 1:
            full = full.chunk(tensor_parallel_size, dim=dim)[tensor_parallel_rank]
        param.copy_(full)
