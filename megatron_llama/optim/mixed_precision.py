"""Megatron-style mixed precision, replicated: every data-parallel rank keeps the fp32 master params of the
whole model and applies the same update.

    model params (bf16/fp16 on GPU, fp32 on CPU)  --forward/backward-->  param.grad (model dtype)
    DataParallelBuffers' hook:  param.main_grad (fp32) += param.grad;  param.grad = None
    finalize_model_grads:       main grads all-reduced over data-parallel ranks (dp=1: nothing to reduce), ...
    step():  unscale (fp16) -> global norm -> skip on overflow (fp16) -> clip -> AdamW on fp32 master
             params whose .grad is the main grad -> copy master params back into the model params

The main grads are views into the fp32 buffer of parallel/data_parallel.py's DataParallelBuffers (built
without use_distributed_optimizer), which owns them at every data-parallel size; this optimizer only reads
them, and unscales them with one multiply of that buffer. For an fp32 model the master params are the model
params themselves (nothing is copied). Usage, through optim/builder.py:

    buffers = DataParallelBuffers(model, data_parallel_group)
    optimizer, description = build_optimizer(model, buffers, lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                                             weight_decay=0.1, clip_grad=1.0, loss_scaler=None)
    optimizer.zero_grad(); optimizer.scale_loss(loss).backward() per micro-batch;
    finalize_model_grads(model, buffers); optimizer.step(lr)

A checkpoint holds the same state on every data-parallel rank: `load_state_dict` reads one saved rank's file.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from megatron_llama.optim.base import (MASTER, NamedOptimizerState, ShardReader, StepOutcome, TrainingOptimizer,
                                       matching_group_settings)
from megatron_llama.optim.clip import clip_grads_, counts_in_grad_norm, global_grad_norm
from megatron_llama.optim.optimizer import weight_decay_groups
from megatron_llama.parallel.data_parallel import DataParallelBuffers


class MixedPrecisionOptimizer(TrainingOptimizer):
    """The fp32 master params of `model` and the inner optimizer over them, fed by the main grads of `buffers`."""

    def __init__(self, model: nn.Module, buffers: DataParallelBuffers,
                 build: Callable[[list[dict]], torch.optim.Optimizer], *, weight_decay: float, clip_grad: float,
                 loss_scaler=None, norm_group=None, tensor_parallel_rank: int = 0):
        if buffers.use_distributed_optimizer:
            raise ValueError("the replicated optimizer needs DataParallelBuffers(..., use_distributed_optimizer="
                             "False): it updates whole parameters from all-reduced gradients")
        super().__init__(buffers, loss_scaler)
        self.named_model_params = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        self.clip_grad = clip_grad
        self.norm_group = norm_group
        self.tensor_parallel_rank = tensor_parallel_rank
        self.master_params: dict[str, torch.Tensor] = {}
        for name, param in self.named_model_params:
            if param.dtype == torch.float32:
                master = param  # an fp32 model is its own master copy
            else:
                master = nn.Parameter(param.detach().float().clone())
            self.master_params[name] = master
        master_named = [(name, self.master_params[name]) for name, _ in self.named_model_params]
        self.optimizer = build(weight_decay_groups(master_named, weight_decay))

    def grads_for_norm(self) -> list[torch.Tensor]:
        """Main grads this rank counts in the global norm (clip.counts_in_grad_norm: tensor-replicated params on tp
        rank 0 only, the last stage's tied embedding copy never)."""
        return [param.main_grad for _, param in self.named_model_params
                if counts_in_grad_norm(param, self.tensor_parallel_rank)]

    @torch.no_grad()
    def step(self, lr: float) -> StepOutcome:
        """Apply one update with learning rate `lr` from the finalized main grads."""
        self.require_reduced_grads()
        if self.loss_scaler is not None:
            self.buffers.grad_buffer.mul_(1.0 / self.loss_scaler.scale)
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
    def load_state_dict(self, read_saved_shard: ShardReader, saved_data_parallel_size: int,
                        model_state: dict[str, torch.Tensor]):
        """Restore Adam states and master params (from the checkpoint's fp32 copies, else `model_state`). Every
        saved rank holds the same state: this rank's own file when the data-parallel size is unchanged, else rank
        0's."""
        same_size = saved_data_parallel_size == self.buffers.size
        saved = read_saved_shard(self.buffers.rank if same_size else 0)
        if "optimizer" not in saved:
            raise ValueError(f"the optimizer state of format {saved.get('format')!r} was saved with "
                             f"--use-distributed-optimizer; resume with --use-distributed-optimizer")
        self.set_master_params(saved.get("master_params") or model_state)
        # A copy: the saved file may be memory-mapped, and the run must not keep states backed by it.
        self.optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))

    @torch.no_grad()
    def load_named_state(self, state: NamedOptimizerState):
        """Restore from whole parameters' states (optim/base.py), packed as torch's state dict of our groups."""
        inner_state, groups, position = {}, [], 0
        for group in self.optimizer.param_groups:
            positions = list(range(position, position + len(group["params"])))
            for index, name in zip(positions, group["names"]):
                per_element = {key: values[name].clone() for key, values in state.tensors.items()
                               if key != MASTER and name in values}
                if per_element:
                    per_element.update({key: value.clone() if torch.is_tensor(value) else value
                                        for key, value in state.scalar_states.items()})
                    inner_state[index] = per_element
            settings = {key: value for key, value in group.items() if key != "params"}
            settings.update(matching_group_settings(state.param_groups, group["weight_decay"]))
            groups.append({**settings, "params": positions})
            position += len(positions)
        self.set_master_params(state.tensors[MASTER])
        self.optimizer.load_state_dict({"state": inner_state, "param_groups": groups})

    @torch.no_grad()
    def set_master_params(self, values: dict[str, torch.Tensor]):
        """Master params (and the model params, rounded to their dtype) take `values`, keyed by parameter name."""
        for name, param in self.named_model_params:
            master = self.master_params[name]
            master.copy_(values[name])
            if master is not param:
                param.copy_(master)
