"""The one optimizer interface the trainer and the checkpoints use, whichever optimizer runs.

Two optimizers implement it, both over the fp32 main grads of parallel/data_parallel.py's
DataParallelBuffers (their only owner, at every data-parallel size) and both keeping fp32 master params:
MixedPrecisionOptimizer (optim/mixed_precision.py: every data-parallel rank updates every parameter) and
DistributedOptimizer (optim/distributed_optimizer.py: each rank updates its shard). optim/builder.py picks
one. A step:

    optimizer.zero_grad()                                   zeroes the main grads (the buffers own them)
    optimizer.scale_loss(loss).backward() per micro-batch   loss x loss_scale (1.0 without a loss scaler)
    finalize_model_grads(model, buffers)                    parallel/grad_finalize.py
    optimizer.step(lr) -> StepOutcome                       unscale, global norm, clip, AdamW, params updated

Checkpoints: each data-parallel rank saves `state_dict()` to a file of its own. A run resuming at any
data-parallel size calls `load_state_dict(read_saved_shard, saved_data_parallel_size, model_state)`, where
`read_saved_shard(r)` loads the file of saved data-parallel rank r (memory-mapped: the optimizer copies what
it keeps) and `model_state` is the model weights just loaded; each optimizer reads only the files it needs.
`set_master_params(values)` takes the weights alone (a model-only checkpoint, --finetune).
A run resuming at another tensor/pipeline layout or with the other optimizer kind instead calls
`load_named_state(state)` with a NamedOptimizerState (optim/named_state.py) re-split for this rank's parameters.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_llama.parallel.data_parallel import DataParallelBuffers

ShardReader = Callable[[int], dict]  # saved data-parallel rank -> the state_dict() that rank saved


MASTER = "master"  # the key of the fp32 master values among a NamedOptimizerState's per-element states


@dataclass
class NamedOptimizerState:
    """Optimizer state by parameter name, whatever the layout and optimizer kind that saved it."""

    tensors: dict[str, dict[str, torch.Tensor]]  # state key (MASTER, exp_avg, ...) -> parameter name -> values
    scalar_states: dict  # states equal for every parameter (Adam's step)
    param_groups: list[dict]  # group settings (lr, betas, weight_decay, ...), without their parameters


def matching_group_settings(saved_groups: list[dict], weight_decay: float) -> dict:
    """The saved settings of the group with this weight decay (the decayed or the undecayed one), else {}."""
    return next((dict(group) for group in saved_groups if group.get("weight_decay") == weight_decay), {})


@dataclass
class StepOutcome:
    grad_norm: float  # before clipping; Inf/NaN when a gradient overflowed
    skipped: bool  # True when the update was not applied (fp16 overflow, or a non-finite norm)


class TrainingOptimizer(ABC):
    """What every optimizer of ours offers: gradients zeroed through `buffers`, the loss scale (1.0 without a
    loss scaler) and loss scaling, one step, and the checkpoint methods of the module docstring."""

    def __init__(self, buffers: DataParallelBuffers, loss_scaler=None):
        self.buffers = buffers
        self.loss_scaler = loss_scaler

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler is not None else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.loss_scale if self.loss_scaler is not None else loss

    def zero_grad(self):
        self.buffers.zero_grad()

    @abstractmethod
    def step(self, lr: float) -> StepOutcome:
        """Apply one update with learning rate `lr` from the finalized main grads."""

    @abstractmethod
    def state_dict(self) -> dict:
        """What this data-parallel rank saves."""

    @abstractmethod
    def load_state_dict(self, read_saved_shard: ShardReader, saved_data_parallel_size: int,
                        model_state: dict[str, torch.Tensor]):
        """Restore from a checkpoint saved by `saved_data_parallel_size` data-parallel ranks (module docstring);
        a ValueError says what does not fit."""

    @abstractmethod
    def load_named_state(self, state: NamedOptimizerState):
        """Restore master params, per-element states, scalar states and group settings from `state`, whose
        tensors have the shapes of this rank's parameters."""

    @abstractmethod
    def set_master_params(self, values: dict[str, torch.Tensor]):
        """Master params and model params take `values` (full tensors keyed by parameter name)."""

    def require_reduced_grads(self):
        if not self.buffers.grads_reduced:
            raise RuntimeError("optimizer.step() before the gradients were reduced: call finalize_model_grads() "
                               "(or finish_grad_sync() on the DataParallelBuffers) after the last micro-batch's "
                               "backward")

    def read_grad_norm(self, norm: torch.Tensor) -> tuple[float, bool]:
        """The global grad norm on the host (the step's one sync) and whether it is finite; an overflow or
        NaN tells the loss scaler, which then lowers its scale."""
        grad_norm = float(norm)
        finite = math.isfinite(grad_norm)
        if self.loss_scaler is not None:
            self.loss_scaler.update(found_overflow=not finite)
        return grad_norm, finite
