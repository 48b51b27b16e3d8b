"""The distributed optimizer: each data-parallel rank keeps fp32 master params and Adam states of its shard only.

ZeRO stage 1 (Rajbhandari et al. 2020), laid out as Megatron-LM's distributed optimizer. The
gradient buffer of parallel/data_parallel.py is cut into buckets padded to a multiple of dp; rank r
owns the contiguous shard r of every bucket. A parameter crossing a shard boundary is owned in
pieces (`ShardPiece`: parameter name and flat element range). One step:

    finalize_model_grads   reduce-scatter: rank r holds the reduced gradient of its shard of each bucket
    step(lr)               unscale (fp16) -> global norm over every rank's pieces -> skip on overflow -> clip
                           -> AdamW on the fp32 master pieces -> write them, in the model's dtype, into the
                           parameter shard -> all-gather each bucket (DataParallelBuffers.start_param_sync)

Optimizer memory per rank (12 bytes per parameter: master copy, exp_avg, exp_avg_sq) falls as 1/dp.

Checkpoints: `state_dict()` is this rank's shard: its pieces, their master values and per-element
states as flat fp32 tensors, the scalar states (step) and group settings. `load_state_dict(read_saved_shard,
saved_data_parallel_size, model_state)` (the interface of optim/base.py) reads the shards saved by ALL
data-parallel ranks of the run (any dp; memory-mapped, so each rank reads only what it copies) and keeps the
elements of its own pieces: a run saved at dp=a resumes at dp=b (`reshard_optimizer_state`).

Usage, through optim/builder.py:
    buffers = DataParallelBuffers(model, dp_group, bucket_size=..., use_distributed_optimizer=True)
    optimizer, description = build_optimizer(model, buffers, lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                                             weight_decay=0.1, clip_grad=1.0)
    optimizer.zero_grad(); backward per micro-batch; finalize_model_grads(model, buffers); optimizer.step(lr)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from megatron_llama.optim.base import (MASTER, NamedOptimizerState, ShardReader, StepOutcome, TrainingOptimizer,
                                       matching_group_settings)
from megatron_llama.optim.clip import clip_grads_, counts_in_grad_norm, global_grad_norm
from megatron_llama.optim.optimizer import excluded_from_weight_decay
from megatron_llama.parallel.data_parallel import DataParallelBuffers

STATE_FORMAT = "distributed-optimizer-shard/1"


@dataclass(frozen=True)
class ShardPiece:
    """Elements [param_start, param_end) of the flattened parameter `name`, at `bucket_start` in bucket `bucket`."""

    name: str
    param_start: int
    param_end: int
    bucket: int
    bucket_start: int

    @property
    def numel(self) -> int:
        return self.param_end - self.param_start


def shard_pieces(buffers: DataParallelBuffers, rank: int) -> list[ShardPiece]:
    """The pieces of parameters inside data-parallel rank `rank`'s shard of every bucket, in buffer order."""
    pieces = []
    for bucket in buffers.buckets:
        shard_start, shard_end = bucket.shard_range(rank, buffers.size)
        for name, param, start in zip(bucket.names, bucket.params, bucket.starts):
            low, high = max(start, shard_start), min(start + param.numel(), shard_end)
            if low < high:
                pieces.append(ShardPiece(name, low - start, high - start, bucket.index, low))
    return pieces


class DistributedOptimizer(TrainingOptimizer):
    """The optimizer interface of optim/base.py over this data-parallel rank's shard of the parameters."""

    def __init__(self, model: nn.Module, buffers: DataParallelBuffers,
                 build: Callable[[list[dict]], torch.optim.Optimizer], *, weight_decay: float, clip_grad: float,
                 loss_scaler=None, norm_group=None, tensor_parallel_rank: int = 0):
        if not buffers.use_distributed_optimizer:
            raise ValueError("the distributed optimizer needs DataParallelBuffers(..., use_distributed_optimizer="
                             "True): its gradients must be reduce-scattered and its parameters gathered")
        super().__init__(buffers, loss_scaler)
        self.clip_grad = clip_grad
        self.norm_group = norm_group
        params_by_name = dict(model.named_parameters())
        self.params_by_name = {name: params_by_name[name] for bucket in buffers.buckets for name in bucket.names}
        self.pieces = shard_pieces(buffers, buffers.rank)
        # One fp32 master tensor per bucket shard, laid out like the shard (padding stays zero), so writing the
        # update back into the parameter shard is one copy per bucket. An fp32 model's shard is its own master.
        self.master_shards = [buffers.param_shard(bucket).float() for bucket in buffers.buckets]
        self.master_pieces: list[torch.Tensor] = []
        self.grad_pieces: list[torch.Tensor] = []
        for piece in self.pieces:
            bucket = buffers.buckets[piece.bucket]
            offset = piece.bucket_start - bucket.shard_range(buffers.rank, buffers.size)[0]
            self.master_pieces.append(self.master_shards[piece.bucket][offset:offset + piece.numel])
            self.grad_pieces.append(bucket.grad_data[piece.bucket_start:piece.bucket_start + piece.numel])
        self.norm_grads = [grad for piece, grad in zip(self.pieces, self.grad_pieces)
                           if counts_in_grad_norm(self.params_by_name[piece.name], tensor_parallel_rank)]
        self.optimizer = build(self._param_groups(weight_decay))

    def _param_groups(self, weight_decay: float) -> list[dict]:
        """[decayed, undecayed] groups of master pieces; decay follows the whole parameter's shape (optimizer.py)."""
        groups = []
        for decay, wanted in ((weight_decay, False), (0.0, True)):
            members = [(piece.name, master) for piece, master in zip(self.pieces, self.master_pieces)
                       if excluded_from_weight_decay(piece.name, self.params_by_name[piece.name]) == wanted]
            if members:
                groups.append({"params": [master for _, master in members], "names": [name for name, _ in members],
                               "weight_decay": decay})
        return groups

    @torch.no_grad()
    def step(self, lr: float) -> StepOutcome:
        """Update this rank's shard from the reduced gradients (after finalize_model_grads), then gather the
        params."""
        self.require_reduced_grads()
        self.buffers.finish_param_sync()  # the parameter shards are about to be overwritten
        if self.loss_scaler is not None and self.grad_pieces:
            torch._foreach_mul_(self.grad_pieces, 1.0 / self.loss_scaler.scale)
        zero = torch.zeros(1, device=self.buffers.grad_buffer.device)
        norm = global_grad_norm(self.norm_grads or [zero], self.norm_group)
        grad_norm, finite = self.read_grad_norm(norm)
        if not finite:
            return StepOutcome(grad_norm, skipped=True)
        if self.clip_grad > 0 and self.grad_pieces:
            clip_grads_(self.grad_pieces, self.clip_grad, norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for master, grad in zip(self.master_pieces, self.grad_pieces):
            master.grad = grad
        self.optimizer.step()
        for master in self.master_pieces:
            master.grad = None
        self._publish_master_params()
        return StepOutcome(grad_norm, skipped=False)

    def _publish_master_params(self):
        """Master shards -> parameter shards (rounded to the model's dtype) -> all-gathered into every rank."""
        for bucket, master in zip(self.buffers.buckets, self.master_shards):
            self.buffers.param_shard(bucket).copy_(master)
        self.buffers.start_param_sync()

    def optimizer_state_bytes(self) -> int:
        """Bytes this rank holds for the optimizer: master pieces and every per-element state (exp_avg, ...)."""
        total = sum(master.numel() * master.element_size() for master in self.master_pieces)
        for master in self.master_pieces:
            for value in self.optimizer.state.get(master, {}).values():
                if is_per_element(value):
                    total += value.numel() * value.element_size()
        return total

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """This rank's shard (see the module docstring); every tensor is a flat fp32 copy on the CPU."""
        element_states: dict[str, list[torch.Tensor]] = {MASTER: [torch.zeros(0)]}
        scalar_states: dict[str, torch.Tensor] = {}
        for master in self.master_pieces:
            element_states[MASTER].append(master.detach().cpu())
            for key, value in self.optimizer.state.get(master, {}).items():
                if is_per_element(value):
                    element_states.setdefault(key, [torch.zeros(0)]).append(value.detach().reshape(-1).cpu())
                else:  # per-piece scalars (Adam's step) are equal on every piece: kept once
                    scalar_states[key] = value.detach().cpu().clone() if torch.is_tensor(value) else value
        flat = {key: torch.cat(values).float() for key, values in element_states.items()}
        groups = [{key: value for key, value in group.items() if key not in ("params", "names")}
                  for group in self.optimizer.param_groups]
        return {"format": STATE_FORMAT, "data_parallel_rank": self.buffers.rank,
                "data_parallel_size": self.buffers.size,
                "pieces": [(piece.name, piece.param_start, piece.param_end) for piece in self.pieces],
                "tensors": flat, "scalar_states": scalar_states, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, read_saved_shard: ShardReader, saved_data_parallel_size: int,
                        model_state: dict[str, torch.Tensor]):
        """Restore from the shards of every data-parallel rank of the saved run (any dp; resharded here). The
        master values come from the shards; `model_state` is not needed."""
        saved = [read_saved_shard(rank) for rank in range(saved_data_parallel_size)]
        mine = reshard_optimizer_state(saved, [(piece.name, piece.param_start, piece.param_end)
                                               for piece in self.pieces])
        start_of = dict(zip(map(id, self.master_pieces), _offsets([piece.numel for piece in self.pieces])))
        # torch numbers the parameters of a state dict across its groups in order; its loader then casts every
        # state to its parameter's device and dtype policy.
        ordered = [master for group in self.optimizer.param_groups for master in group["params"]]
        inner_state = {}
        for position, master in enumerate(ordered):
            start = start_of[id(master)]
            master.copy_(mine["tensors"][MASTER][start:start + master.numel()])
            piece_state = {key: values[start:start + master.numel()].clone()
                           for key, values in mine["tensors"].items() if key != MASTER}
            if piece_state:
                piece_state.update({key: value.clone() if torch.is_tensor(value) else value
                                    for key, value in mine["scalar_states"].items()})
                inner_state[position] = piece_state
        groups, position = [], 0
        for group in self.optimizer.param_groups:
            settings = {key: value for key, value in group.items() if key != "params"}
            settings.update(matching_group_settings(mine["param_groups"], group["weight_decay"]))
            groups.append({**settings, "params": list(range(position, position + len(group["params"])))})
            position += len(group["params"])
        self.optimizer.load_state_dict({"state": inner_state, "param_groups": groups})
        self._publish_master_params()

    def load_named_state(self, state: NamedOptimizerState):
        """Restore from whole parameters' states (optim/base.py): they form one saved shard holding every
        parameter, from which load_state_dict cuts this rank's pieces."""
        names = list(self.params_by_name)
        whole_shard = {"format": STATE_FORMAT, "data_parallel_rank": 0, "data_parallel_size": 1,
                       "pieces": [(name, 0, self.params_by_name[name].numel()) for name in names],
                       "tensors": {key: torch.cat([values[name].reshape(-1).float() for name in names])
                                   for key, values in state.tensors.items()},
                       "scalar_states": state.scalar_states, "param_groups": state.param_groups}
        self.load_state_dict(lambda rank: whole_shard, 1, {})

    @torch.no_grad()
    def set_master_params(self, values: dict[str, torch.Tensor]):
        """Master pieces and model params take `values` (full tensors keyed by name, e.g. a model-only checkpoint)."""
        self.buffers.finish_param_sync()
        for piece, master in zip(self.pieces, self.master_pieces):
            master.copy_(values[piece.name].reshape(-1)[piece.param_start:piece.param_end])
        for name, param in self.params_by_name.items():
            param.copy_(values[name])


def is_per_element(value) -> bool:
    """A state with one value per element of its (one-dimensional) piece, like exp_avg; Adam's step is 0-dim."""
    return torch.is_tensor(value) and value.dim() > 0


def _offsets(sizes: list[int]) -> list[int]:
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += size
    return offsets


def reshard_optimizer_state(saved: list[dict], pieces: list[tuple[str, int, int]]) -> dict:
    """The shard state of `pieces` [(name, start, end) of flattened parameters] cut from the shards `saved` by the
    data-parallel ranks of an earlier run, whatever its data-parallel size or bucket layout."""
    if not saved:
        raise ValueError("no optimizer shards given; pass the optim_dp_*.pt states of every data-parallel rank")
    for shard in saved:
        if shard.get("format") != STATE_FORMAT:
            raise ValueError(f"optimizer shard of format {shard.get('format')!r} is not a distributed-optimizer "
                             f"shard ({STATE_FORMAT}); it was saved without --use-distributed-optimizer")
    keys = set().union(*(shard["tensors"] for shard in saved))
    holders: dict[str, list[tuple[int, int, dict, int]]] = {}
    for shard in saved:
        if shard["pieces"] and set(shard["tensors"]) != keys:
            raise ValueError(f"optimizer shards disagree on their states: {sorted(keys)} vs "
                             f"{sorted(shard['tensors'])}")
        offset = 0
        for name, start, end in shard["pieces"]:
            holders.setdefault(name, []).append((start, end, shard, offset))
            offset += end - start
    total = sum(end - start for _, start, end in pieces)
    out = {key: torch.zeros(total, dtype=torch.float32) for key in keys}
    offset = 0
    for name, start, end in pieces:
        covered = 0
        for saved_start, saved_end, shard, saved_offset in holders.get(name, []):
            low, high = max(start, saved_start), min(end, saved_end)
            if low >= high:
                continue
            source = slice(saved_offset + low - saved_start, saved_offset + high - saved_start)
            for key in keys:
                out[key][offset + low - start:offset + high - start].copy_(shard["tensors"][key][source])
            covered += high - low
        if covered != end - start:
            ranks = sorted(shard["data_parallel_rank"] for shard in saved)
            raise ValueError(f"optimizer state of {name} elements [{start}, {end}) is not fully in the given shards "
                             f"(data-parallel ranks {ranks} of {saved[0]['data_parallel_size']}); load the "
                             f"optim_dp_*.pt files of every data-parallel rank of this model-parallel rank")
        offset += end - start
    scalar_states: dict = {}
    for shard in saved:
        for key, value in shard["scalar_states"].items():
            scalar_states.setdefault(key, value)
    return {"format": STATE_FORMAT, "tensors": out, "scalar_states": scalar_states,
            "param_groups": saved[0]["param_groups"], "pieces": pieces}
