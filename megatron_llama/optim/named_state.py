"""Optimizer state by parameter name: the form, independent of data parallelism and of the optimizer kind, that a
checkpoint's optimizer files take when a run resumes at another layout.

    state = named_optimizer_state(read_saved_shard, saved_data_parallel_size, saved_model_state)
        # state.tensors["master" | "exp_avg" | "exp_avg_sq"][name]: one tensor of the parameter's shape on the
        # saving tensor/pipeline rank; state.scalar_states: Adam's step; state.param_groups: the group settings
    optimizer.load_named_state(state)   # both optimizers of optim/base.py

It reads the files of either optimizer: MixedPrecisionOptimizer's (torch's state dict, whose groups list their
parameter names; fp32 masters saved apart only when the model is not fp32, else they are the weights) and
DistributedOptimizer's (flat shards of every data-parallel rank, cut back into whole parameters by
distributed_optimizer.reshard_optimizer_state). Because every per-element state has its parameter's shape,
checkpoint/loading.py merges and re-splits it over tensor and pipeline ranks exactly as it does the weights.
"""
from __future__ import annotations

import torch

from megatron_llama.optim.base import MASTER, NamedOptimizerState, ShardReader
from megatron_llama.optim.distributed_optimizer import STATE_FORMAT, is_per_element, reshard_optimizer_state


def named_optimizer_state(read_saved_shard: ShardReader, saved_data_parallel_size: int,
                          saved_model_state: dict[str, torch.Tensor]) -> NamedOptimizerState:
    """The optimizer state one tensor/pipeline rank saved, by parameter name (`saved_model_state`: that rank's
    model.pt, which gives the shapes and, for an fp32 model, the master values)."""
    first = read_saved_shard(0)
    if first.get("format") == STATE_FORMAT:
        return _from_distributed([first] + [read_saved_shard(rank) for rank in range(1, saved_data_parallel_size)],
                                 saved_model_state)
    if "optimizer" not in first:
        raise ValueError(f"optimizer state of format {first.get('format')!r} is neither a replicated optimizer's "
                         f"state nor a distributed-optimizer shard ({STATE_FORMAT})")
    return _from_replicated(first, saved_model_state)


def _from_replicated(saved: dict, saved_model_state: dict[str, torch.Tensor]) -> NamedOptimizerState:
    inner = saved["optimizer"]
    masters = saved.get("master_params") or saved_model_state
    tensors: dict[str, dict[str, torch.Tensor]] = {MASTER: {}}
    scalar_states: dict = {}
    for group in inner["param_groups"]:
        for position, name in zip(group["params"], group["names"]):
            tensors[MASTER][name] = masters[name].float()
            for key, value in inner["state"].get(position, {}).items():
                if is_per_element(value):
                    tensors.setdefault(key, {})[name] = value.float()
                else:  # equal for every parameter (Adam's step): kept once
                    scalar_states.setdefault(key, value.clone() if torch.is_tensor(value) else value)
    groups = [{key: value for key, value in group.items() if key not in ("params", "names")}
              for group in inner["param_groups"]]
    return NamedOptimizerState(tensors, scalar_states, groups)


def _from_distributed(saved: list[dict], saved_model_state: dict[str, torch.Tensor]) -> NamedOptimizerState:
    names = list(dict.fromkeys(name for shard in saved for name, _, _ in shard["pieces"]))
    shapes = {name: saved_model_state[name].shape for name in names}
    whole = reshard_optimizer_state(saved, [(name, 0, shapes[name].numel()) for name in names])
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, flat in whole["tensors"].items():
        # [sum of numels] -> one tensor per parameter, in its shape
        pieces = flat.split([shapes[name].numel() for name in names])
        tensors[key] = {name: piece.reshape(shapes[name]) for name, piece in zip(names, pieces)}
    return NamedOptimizerState(tensors, dict(whole["scalar_states"]), list(whole["param_groups"]))

