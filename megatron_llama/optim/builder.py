"""build_optimizer: AdamW under mixed precision over DataParallelBuffers, replicated or distributed.

The buffers decide: built with use_distributed_optimizer (--use-distributed-optimizer) they get the
DistributedOptimizer (each data-parallel rank updates its shard; the gradient norm spans every rank), else
the MixedPrecisionOptimizer (every rank updates every parameter; the norm spans the model-parallel group).
Both implement optim/base.py's interface. Usage:

    buffers = DataParallelBuffers(model, layout.data_group, use_distributed_optimizer=False)
    optimizer, description = build_optimizer(model, buffers, layout, lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                                             weight_decay=0.1, clip_grad=1.0, loss_scaler=None)
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_llama.optim.base import TrainingOptimizer
from megatron_llama.optim.distributed_optimizer import DistributedOptimizer
from megatron_llama.optim.mixed_precision import MixedPrecisionOptimizer
from megatron_llama.optim.optimizer import build_adamw
from megatron_llama.parallel import world
from megatron_llama.parallel.data_parallel import DataParallelBuffers
from megatron_llama.parallel.state import ParallelLayout


def build_optimizer(model: nn.Module, buffers: DataParallelBuffers, layout: ParallelLayout, *, lr: float,
                    betas: tuple[float, float], eps: float, weight_decay: float, clip_grad: float,
                    loss_scaler=None) -> tuple[TrainingOptimizer, str]:
    """The optimizer of `model` (built for `layout`) over the main grads of `buffers`, and a log line naming the
    implementation. The gradient norm spans the layout's model-parallel group, or every rank (the default group)
    with the distributed optimizer."""
    descriptions = []

    def build_inner(groups: list[dict]) -> torch.optim.Optimizer:
        inner, description = build_adamw(groups, lr=lr, betas=betas, eps=eps, device=buffers.grad_buffer.device)
        descriptions.append(description)
        return inner

    settings = dict(weight_decay=weight_decay, clip_grad=clip_grad, loss_scaler=loss_scaler,
                    tensor_parallel_rank=layout.tensor_rank)
    if buffers.use_distributed_optimizer:
        optimizer = DistributedOptimizer(model, buffers, build_inner, norm_group=world.world_group(), **settings)
        return optimizer, (f"{descriptions[0]}, sharded over {buffers.size} data-parallel ranks "
                           f"(distributed optimizer)")
    optimizer = MixedPrecisionOptimizer(model, buffers, build_inner,
                                        norm_group=layout.model_group, **settings)
    return optimizer, descriptions[0]
