"""Megatron-style mixed precision: low-precision model, fp32 main grads, fp32 master params.

    model params (bf16/fp16 on GPU, fp32 on CPU)  --forward/backward-->  param.grad (model dtype)
    post-accumulate-grad hook:  param.main_grad (fp32) += param.grad;  param.grad = None
    step():  unscale (fp16) -> global norm -> skip on overflow (fp16) -> clip -> AdamW on fp32 master
             params whose .grad is the main grad -> copy master params back into the model params

Every main grad is a view into one contiguous fp32 buffer (`grad_buffer`), so zeroing is one fill and
a data-parallel reduction can work on whole buffers. With `grad_buffers` (parallel/data_parallel.py's
DataParallelBuffers, which owns the buffer, the hooks and the bucketed reduction) the optimizer uses
that buffer instead of its own. For an fp32 model the master params are the
model params themselves (nothing is copied). Usage:

    optimizer, description = build_optimizer(model, lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                                             weight_decay=0.1, clip_grad=1.0, loss_scaler=None)
    optimizer.zero_grad(); (optimizer.scale_loss(loss)).backward() per micro-batch; optimizer.step(lr)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from megatron_llama.optim.clip import clip_grads_, counts_in_grad_norm, global_grad_norm
from megatron_llama.optim.optimizer import build_adamw, weight_decay_groups
from megatron_llama.parallel import state as parallel_state
from megatron_llama.parallel.layers import accumulate_grad_into_main_grad


@dataclass
class StepOutcome:
    grad_norm: float  # before clipping; Inf/NaN when a gradient overflowed
    skipped: bool  # True when the update was not applied (fp16 overflow, or a non-finite norm)


class LossScaledOptimizer:
    """What every optimizer of ours shares: the loss scale (1.0 without a loss scaler) and loss scaling."""

    loss_scaler = None

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler is not None else 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.loss_scale if self.loss_scaler is not None else loss

    def read_grad_norm(self, norm: torch.Tensor) -> tuple[float, bool]:
        """The global grad norm on the host (the step's one sync) and whether it is finite; an overflow or
        NaN tells the loss scaler, which then lowers its scale."""
        grad_norm = float(norm)
        finite = math.isfinite(grad_norm)
        if self.loss_scaler is not None:
            self.loss_scaler.update(found_overflow=not finite)
        return grad_norm, finite


class MixedPrecisionOptimizer(LossScaledOptimizer):
    """Owns the fp32 main grads and master params of `model` and the inner optimizer over them."""

    def __init__(self, model: nn.Module, build: Callable[[list[dict]], torch.optim.Optimizer], *,
                 weight_decay: float, clip_grad: float, loss_scaler=None, norm_group=None,
                 tensor_parallel_rank: int = 0, grad_buffers=None):
        self.named_model_params = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        self.clip_grad = clip_grad
        self.loss_scaler = loss_scaler
        self.norm_group = norm_group
        self.tensor_parallel_rank = tensor_parallel_rank
        self.grad_buffers = grad_buffers
        self.master_params: dict[str, torch.Tensor] = {}
        self._hooks = []
        if grad_buffers is None:
            device = self.named_model_params[0][1].device
            total = sum(param.numel() for _, param in self.named_model_params)
            self.grad_buffer = torch.zeros(total, dtype=torch.float32, device=device)
            offset = 0
            for _, param in self.named_model_params:
                param.main_grad = self.grad_buffer[offset:offset + param.numel()].view_as(param)
                offset += param.numel()
                self._hooks.append(param.register_post_accumulate_grad_hook(accumulate_grad_into_main_grad))
        else:
            self.grad_buffer = grad_buffers.grad_buffer
        for name, param in self.named_model_params:
            if param.dtype == torch.float32:
                master = param  # an fp32 model is its own master copy
            else:
                master = nn.Parameter(param.detach().float().clone())
            self.master_params[name] = master
        master_named = [(name, self.master_params[name]) for name, _ in self.named_model_params]
        self.optimizer = build(weight_decay_groups(master_named, weight_decay))

    def zero_grad(self):
        if self.grad_buffers is not None:
            self.grad_buffers.zero_grad()
            return
        self.grad_buffer.zero_()
        for _, param in self.named_model_params:
            param.grad = None

    def grads_for_norm(self) -> list[torch.Tensor]:
        """Main grads this rank counts in the global norm (clip.counts_in_grad_norm: tensor-replicated params on tp
        rank 0 only, the last stage's tied embedding copy never)."""
        return [param.main_grad for _, param in self.named_model_params
                if counts_in_grad_norm(param, self.tensor_parallel_rank)]

    @torch.no_grad()
    def step(self, lr: float) -> StepOutcome:
        """Apply one update with learning rate `lr` from the accumulated main grads."""
        if self.loss_scaler is not None:
            self.grad_buffer.mul_(1.0 / self.loss_scaler.scale)
        norm = global_grad_norm(self.grads_for_norm(), self.norm_group)
        grad_norm, finite = self.read_grad_norm(norm)
        if not finite:
            return StepOutcome(grad_norm, skipped=True)
        if self.clip_grad > 0:
            clip_grads_([param.main_grad for _, param in self.named_model_params], self.clip_grad, norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for name, param in self.named_model_params:
            self.master_params[name].grad = param.main_grad
        self.optimizer.step()
        for name, param in self.named_model_params:
            master = self.master_params[name]
            master.grad = None
            if master is not param:
                param.copy_(master)
        return StepOutcome(grad_norm, skipped=False)

    def has_separate_master_params(self) -> bool:
        return any(self.master_params[name] is not param for name, param in self.named_model_params)

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict()}
        if self.has_separate_master_params():
            state["master_params"] = {name: master.detach() for name, master in self.master_params.items()}
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict, model_state: dict[str, torch.Tensor]):
        """Restore Adam states and master params (from the checkpoint's fp32 copies, else its model weights)."""
        self.set_master_params(state.get("master_params") or model_state)
        self.optimizer.load_state_dict(state["optimizer"])

    @torch.no_grad()
    def set_master_params(self, values: dict[str, torch.Tensor]):
        """Master params (and the model params, rounded to their dtype) take `values`, keyed by parameter name."""
        for name, param in self.named_model_params:
            master = self.master_params[name]
            master.copy_(values[name])
            if master is not param:
                param.copy_(master)


def build_optimizer(model: nn.Module, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                    clip_grad: float, loss_scaler=None, grad_buffers=None) -> tuple[MixedPrecisionOptimizer, str]:
    """AdamW (optim/optimizer.py) under mixed precision for `model`, and a log line naming the implementation.
    The gradient norm spans this rank's model-parallel group (parallel.state; none before it is initialised)."""
    device = next(model.parameters()).device
    descriptions = []

    def build_inner(groups: list[dict]) -> torch.optim.Optimizer:
        inner, description = build_adamw(groups, lr=lr, betas=betas, eps=eps, device=device)
        descriptions.append(description)
        return inner

    optimizer = MixedPrecisionOptimizer(model, build_inner, weight_decay=weight_decay, clip_grad=clip_grad,
                                        loss_scaler=loss_scaler, norm_group=parallel_state.get_model_parallel_group(),
                                        tensor_parallel_rank=parallel_state.get_tensor_model_parallel_rank(),
                                        grad_buffers=grad_buffers)
    return optimizer, descriptions[0]
