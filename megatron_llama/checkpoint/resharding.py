"""Resharding: checkpoint content between two parallel layouts. Which parameters each (tp, pp) rank holds, which
dimension tensor parallelism slices, and the full tensors merged from shards or split into them.

Tensor-parallel shards of a parameter are slices along its `tensor_parallel_dim` (set by parallel/layers.py),
learnt by building the model on the meta device; pipeline stages hold the blocks of the stage split
(RunConfig.stage_split). The embedding and output head carry vocabulary padding that depends on tp
(ModelConfig.padded_vocab_size): merged tensors have the tp=1 padding, and a split accepts any number of rows
>= vocab_size. The package uses this to write model-only checkpoints (saving.py), to read them back whole
(reading.py), and to resume a full checkpoint at another layout (loading.py; optimizer states are split like their
parameters):

    full = merge_shards(config, {(tp_rank, pp_rank): shard, ...}, tensor_parallel_size)
    shards = split_state_dict(config, full, tensor_parallel_size, pipeline_parallel_size, split)
    mine = resplit(saved_run_config, run_config, layout, shards_as_saved)
"""
from __future__ import annotations

import torch

from megatron_llama.checkpoint.files import CheckpointError
from megatron_llama.config import ModelConfig, RunConfig
from megatron_llama.model.llama import LlamaModel
from megatron_llama.parallel.stages import split_layers
from megatron_llama.parallel.state import ParallelLayout

VOCAB_PARAMETERS = ("embedding.weight", "output.weight")


def _meta_model(config: ModelConfig, **stage):
    with torch.device("meta"):
        return LlamaModel(config, **stage)


def tensor_parallel_dims(config: ModelConfig) -> dict[str, int | None]:
    """Parameter name -> the dimension tensor parallelism splits (None: replicated)."""
    model = _meta_model(config)
    dims = {name: getattr(param, "tensor_parallel_dim", None) for name, param in model.named_parameters()}
    for name, buffer in model.named_buffers():
        dims.setdefault(name, None)
    return dims


def stage_parameter_names(config: ModelConfig, split) -> list[set[str]]:
    """For each pipeline rank, the state-dict names its chunks hold together (`split`: parallel/stages.StageSplit,
    so uneven and interleaved splits give the trainer's shards; the last stage's tied embedding copy included)."""
    names = []
    for rank in range(split.pipeline_size):
        held = set()
        for chunk in range(split.num_chunks):
            model = _meta_model(config, pre_process=split.is_first(rank, chunk),
                                post_process=split.is_last(rank, chunk),
                                layer_range=split.layer_range(rank, chunk))
            held |= set(model.state_dict().keys())
        names.append(held)
    return names


def resize_vocab_rows(tensor: torch.Tensor, rows: int, vocab_size: int, name: str) -> torch.Tensor:
    """Drop or add vocabulary-padding rows (zeros) so the tensor has `rows` rows; real vocabulary rows are kept."""
    if tensor.shape[0] < vocab_size:
        raise CheckpointError(f"{name} has {tensor.shape[0]} rows but the vocabulary has {vocab_size} entries")
    if tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] > rows:
        return tensor[:rows].clone()
    padding = tensor.new_zeros((rows - tensor.shape[0],) + tuple(tensor.shape[1:]))
    return torch.cat([tensor, padding], dim=0)


def split_state_dict(config: ModelConfig, state_dict: dict, tensor_parallel_size: int,
                     pipeline_parallel_size: int, split=None,
                     only: tuple[int, int] | None = None) -> dict[tuple[int, int], dict]:
    """A full state dict -> {(tp_rank, pp_rank): shard state dict}, or only the shard `only` (tp_rank, pp_rank);
    `split` (a StageSplit) defaults to the even split of the blocks over `pipeline_parallel_size` stages."""
    try:
        config.check(tensor_parallel_size, "tensor-parallel size")
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    padded = config.padded_vocab_size(tensor_parallel_size)
    full = {name: (resize_vocab_rows(value, padded, config.vocab_size, name) if name in VOCAB_PARAMETERS else value)
            for name, value in state_dict.items()}
    if tensor_parallel_size == 1 and pipeline_parallel_size == 1:
        return {(0, 0): full}
    dims = tensor_parallel_dims(config) if tensor_parallel_size > 1 else {}
    if split is None and pipeline_parallel_size > 1:
        try:
            split = split_layers(config.num_layers, pipeline_parallel_size)
        except ValueError as error:
            raise CheckpointError(str(error)) from None
    stages = stage_parameter_names(config, split) if pipeline_parallel_size > 1 else [set(full)]
    shards = {}
    for pipeline_rank, names in enumerate(stages):
        absent = sorted(names - set(full))
        if absent:
            raise CheckpointError(f"the state dict lacks {', '.join(absent[:4])} needed by pipeline stage "
                                  f"{pipeline_rank}")
        for tensor_rank in range(tensor_parallel_size):
            if only is not None and only != (tensor_rank, pipeline_rank):
                continue
            shard = {}
            for name in sorted(names):
                value = full[name]
                dim = dims.get(name) if tensor_parallel_size > 1 else None
                if dim is not None:
                    if value.shape[dim] % tensor_parallel_size:
                        raise CheckpointError(f"{name} has {value.shape[dim]} entries along dimension {dim}, "
                                              f"not divisible by tensor-parallel size {tensor_parallel_size}")
                    value = value.chunk(tensor_parallel_size, dim=dim)[tensor_rank]
                shard[name] = value.contiguous().clone()  # a clone, so the file holds only the slice
            shards[(tensor_rank, pipeline_rank)] = shard
    return shards


def merge_shards(config: ModelConfig, shards: dict[tuple[int, int], dict], tensor_parallel_size: int) -> dict:
    """{(tp_rank, pp_rank): shard} -> the full state dict (tp slices concatenated, pp stages joined by key)."""
    dims = tensor_parallel_dims(config) if tensor_parallel_size > 1 else {}
    pipeline_ranks = sorted({pipeline_rank for _, pipeline_rank in shards})
    full = {}
    for pipeline_rank in pipeline_ranks:
        for name in shards[(0, pipeline_rank)]:
            if name in full:  # a parameter held by two stages (e.g. a tied embedding on the last stage)
                continue
            dim = dims.get(name) if tensor_parallel_size > 1 else None
            pieces = [shards[(tensor_rank, pipeline_rank)][name] for tensor_rank in range(tensor_parallel_size)]
            full[name] = pieces[0] if dim is None else torch.cat(pieces, dim=dim)
    padded = config.padded_vocab_size(1)
    for name in VOCAB_PARAMETERS:
        if name in full:
            full[name] = resize_vocab_rows(full[name], padded, config.vocab_size, name)
    return full


def same_model_split(saved: RunConfig, run: RunConfig) -> bool:
    """Whether every rank of `run` holds exactly the parameters (and slices) the same rank of `saved` held."""
    sizes = [(config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size)
             for config in (saved, run)]
    return sizes[0] == sizes[1] and saved.stage_split().ranges == run.stage_split().ranges


def resplit(saved: RunConfig, run: RunConfig, layout: ParallelLayout, shards: dict[tuple[int, int], dict]) -> dict:
    """This rank's part of the per-parameter tensors `shards` ({(tp, pp) rank: {name: slice}} as `saved` split
    them): merged into whole parameters, then split as `run` splits them."""
    full = merge_shards(saved.model, shards, saved.parallel.tensor_model_parallel_size)
    position = (layout.tensor_rank, layout.pipeline_rank)
    return split_state_dict(run.model, full, layout.tensor_size, layout.pipeline_size, run.stage_split(),
                            only=position)[position]
