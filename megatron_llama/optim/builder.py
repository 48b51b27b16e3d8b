"""build_optimizer: AdamW under mixed precision over DataParallelBuffers, replicated or distributed.

The buffers decide: built with use_distributed_optimizer (--use-distributed-optimizer) they get the
DistributedOptimizer (each data-parallel rank updates its shard; the gradient norm spans every rank), else
the MixedPrecisionOptimizer (every rank updates every parameter; the norm spans the model-parallel group).
Both implement optim/base.py's interface. Usage:

    buffers = DataParallelBuffers(model, data_parallel_group, use_distributed_optimizer=False)
    optimizer, description = build_optimizer(model, buffers, lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                                             weight_decay=0.1, clip_grad=1.0, loss_scaler=None)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_llama.optim.base import TrainingOptimizer
from megatron_llama.optim.distributed_optimizer import DistributedOptimizer
from megatron_llama.optim.mixed_precision import MixedPrecisionOptimizer
from megatron_llama.optim.optimizer import build_adamw
from megatron_llama.parallel import state as parallel_state
from megatron_llama.parallel.data_parallel import DataParallelBuffers


def build_optimizer(model: nn.Module, buffers: DataParallelBuffers, *, lr: float, betas: tuple[float, float],
                    eps: float, weight_decay: float, clip_grad: float,
                    loss_scaler=None) -> tuple[TrainingOptimizer, str]:
    """The optimizer of `model` over the main grads of `buffers`, and a log line naming the implementation.
    The model-parallel groups come from parallel.state (none before it is initialised)."""
    descriptions = []

    def build_inner(groups: list[dict]) -> torch.optim.Optimizer:
        inner, description = build_adamw(groups, lr=lr, betas=betas, eps=eps, device=buffers.grad_buffer.device)
        descriptions.append(description)
        return inner

    settings = dict(weight_decay=weight_decay, clip_grad=clip_grad, loss_scaler=loss_scaler,
                    tensor_parallel_rank=parallel_state.get_tensor_model_parallel_rank())
    if buffers.use_distributed_optimizer:
        norm_group = dist.group.WORLD if dist.is_initialized() else None
        optimizer = DistributedOptimizer(model, buffers, build_inner, norm_group=norm_group, **settings)
        return optimizer, (f"{descriptions[0]}, sharded over {buffers.size} data-parallel ranks "
                           f"(distributed optimizer)")
    optimizer = MixedPrecisionOptimizer(model, buffers, build_inner,
                                        norm_group=parallel_state.get_model_parallel_group(), **settings)
    return optimizer, descriptions[0]
