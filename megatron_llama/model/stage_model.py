"""One pipeline rank's share of the Llama: its model chunks, the chunks as one module, and their forward step.

The pipeline code (parallel/) knows neither the model nor its inputs; this module joins the two:

    split = split_layers(config.num_layers, pp)                  # parallel/stages.py: which blocks go where
    chunks = build_model_chunks(config, seed, split, layout)     # this rank's LlamaModel chunks, schedule order
    model = StageModel(chunks)                                   # one module for buffers, optimizer, checkpoints
    losses = run_schedule(model_chunks(model), micro_batches, loss_fn, layout=layout,
                          forward_step=llama_forward_step, **schedule_shapes(model_chunks(model), micro_batches))

`StageModel(chunks)` presents a rank's chunks as one module for the data-parallel buffers, the
optimizer and checkpoints: its parameter and state-dict names are the chunks' own global names
(`layers.5.mlp.up.weight`, never `chunks.1.layers.5...`), unique because the chunks hold disjoint blocks.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_llama.config import ModelConfig
from megatron_llama.model.llama import LlamaModel, build_model
from megatron_llama.parallel.stages import StageSplit, mark_tied_embedding
from megatron_llama.parallel.state import ParallelLayout


def build_model_chunks(config: ModelConfig, seed: int, split: StageSplit, layout: ParallelLayout, *,
                       device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> list[LlamaModel]:
    """The model chunks of `layout`'s pipeline rank, chunk 0 first (build_model, tensor-parallel as `layout`);
    marks a tied embedding's two ends for the pipeline. Another rank's chunks, in one process (tests, tools):
    pass its layout, ParallelLayout.for_rank(rank, world_size, tensor_size, pipeline_size), which has no groups.
    """
    rank = layout.pipeline_rank
    if split.pipeline_size != layout.pipeline_size:
        raise ValueError(f"the stage split is for {split.pipeline_size} pipeline stages but the layout has "
                         f"{layout.pipeline_size}; build both from the same --pipeline-model-parallel-size")
    chunks = []
    for chunk in range(split.num_chunks):
        first, last = split.is_first(rank, chunk), split.is_last(rank, chunk)
        model = build_model(config, seed, layout=layout, device=device, dtype=dtype, pre_process=first,
                            post_process=last, layer_range=split.layer_range(rank, chunk))
        if split.pipeline_size > 1 and model.tied_output and (first or last):
            mark_tied_embedding(model.embedding.weight, is_copy=not first)
        chunks.append(model)
    return chunks


class StageModel(nn.Module):
    """This rank's model chunks as one module whose names are the chunks' (global) names; not callable:
    parallel/pipeline.py runs the chunks one by one."""

    def __init__(self, chunks: list[nn.Module]):
        super().__init__()
        self.chunks = nn.ModuleList(chunks)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for chunk in self.chunks:
            yield from chunk.named_parameters(prefix, recurse, remove_duplicate)

    def state_dict(self, *args, **kwargs) -> dict:
        merged = {}
        for chunk in self.chunks:
            merged.update(chunk.state_dict(*args, **kwargs))
        return merged

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        for chunk in self.chunks:
            own = {name: state_dict[name] for name in chunk.state_dict() if name in state_dict}
            chunk.load_state_dict(own, strict=strict, assign=assign)

    def forward(self, *args, **kwargs):
        raise TypeError("a StageModel is not called: run its chunks through parallel.pipeline.run_schedule")


def model_chunks(model: nn.Module) -> list[nn.Module]:
    """The chunks of a StageModel, or [model] for a plain (whole or one-stage) model."""
    return list(model.chunks) if isinstance(model, StageModel) else [model]


def schedule_shapes(chunks: list[nn.Module], batches: list[dict]) -> dict:
    """run_schedule's size arguments for LlamaModel chunks: [b, s] of the micro-batches, the hidden size, and the
    dtype and device of the chunks' parameters."""
    micro_batch_size, seq_length = batches[0]["tokens"].shape
    first_param = next(chunks[0].parameters())
    return dict(num_micro_batches=len(batches), micro_batch_size=micro_batch_size, seq_length=seq_length,
                hidden_size=chunks[0].config.hidden_size, dtype=first_param.dtype, device=first_param.device)


def llama_forward_step(chunk: LlamaModel, input_tensor: torch.Tensor | None, micro_batch: dict | None) -> torch.Tensor:
    """run_schedule's forward step for LlamaModel chunks: token ids [b, s] on the first stage, the received hidden
    states [b, s, h] elsewhere; labels on the last stage, which returns the per-token loss [b, s]. A packed
    micro-batch's "position_ids" and "document_ids" [b, s] (data_loader.py) go to every stage's blocks."""
    inputs = micro_batch["tokens"] if input_tensor is None else input_tensor
    labels = micro_batch["labels"] if chunk.post_process else None
    packing = micro_batch or {}
    return chunk(inputs, labels, packing.get("position_ids"), packing.get("document_ids"))
