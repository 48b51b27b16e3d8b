"""Global-norm gradient clipping (Pascanu et al. 2013): g <- g * min(1, max_norm / ||g||_2).

The norm is taken over all gradients of the whole model. Each rank sums the squares of the
gradients it owns and counts (a parameter replicated on every tensor-parallel rank is counted on
one of them only); the sums are added over `norm_group` (the model-parallel group) before the root.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_llama.parallel import comm


def global_grad_norm(grads: list[torch.Tensor], norm_group=None) -> torch.Tensor:
    """L2 norm over every tensor of `grads` (and over the ranks of `norm_group`), as an fp32 0-dim tensor."""
    if not grads:
        raise ValueError("no gradients to take the norm of")
    squares = torch.stack([torch.linalg.vector_norm(grad, dtype=torch.float32) for grad in grads]).square().sum()
    return comm.all_reduce(squares, norm_group).sqrt()


@torch.no_grad()
def clip_grads_(grads: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor):
    """Scale `grads` in place so their global norm is at most `max_norm` (no sync with the host)."""
    coefficient = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coefficient)


def counts_in_grad_norm(param: nn.Parameter, tensor_parallel_rank: int) -> bool:
    """Whether this rank adds `param`'s gradient to the global norm, so every gradient counts exactly once:
    a parameter replicated on the tensor ranks (norm weights, sequence-parallel ones included) counts on tensor
    rank 0 only; the tied embedding, held by the first and the last pipeline stage, counts on the first only
    (parallel/stages.py marks the last stage's copy `is_tied_embedding_copy`)."""
    if getattr(param, "tensor_parallel_dim", None) is None and tensor_parallel_rank != 0:
        return False
    return not getattr(param, "is_tied_embedding_copy", False)
