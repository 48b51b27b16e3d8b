"""Which transformer blocks each pipeline stage holds, and the tied embedding shared by the first and last stage.

Stage split (`split_layers`): the blocks are divided evenly over the pipeline stages
(`--pipeline-model-parallel-size`), or, for uneven models, the first and/or last stage take
an explicit count (`--decoder-first-pipeline-num-layers`, `--decoder-last-pipeline-num-layers`)
and the middle stages share the rest evenly. The embedding lives on the first stage, the final
norm and output head on the last.

Virtual stages (`--num-layers-per-virtual-pipeline-stage L`, the interleaved schedule of
Narayanan et al. 2021, section 2.2): the model is cut into pp x v model chunks of L blocks
(v = layers per stage / L), dealt out round-robin, so chunk c on pipeline rank r is model chunk
c * pp + r. Worked example, 8 layers, pp=2, L=2 (v=2):

    model chunk   0: blocks 0-1   1: blocks 2-3   2: blocks 4-5   3: blocks 6-7
    rank 0        chunk 0 = model chunk 0 (embedding, blocks 0-1), chunk 1 = model chunk 2 (blocks 4-5)
    rank 1        chunk 0 = model chunk 1 (blocks 2-3), chunk 1 = model chunk 3 (blocks 6-7, norm, head)

Tied embedding: with `untie_embeddings_and_output_weights=False` and more than one stage, the
last stage builds its own `embedding.weight` for the output head. Its initial values equal the
first stage's (same parameter name, and parameters are drawn by name: layers.initialize_parameters);
`allreduce_tied_embedding_grads` sums the two copies' gradients over the embedding group after
backward, so both take identical optimizer steps and stay equal. The copy is marked
`param.is_tied_embedding_copy = True`: a global gradient norm must skip it (it would count the
shared weight twice), and a checkpoint merge may drop it (it equals the first stage's).

Usage:
    split = split_layers(config.num_layers, pp, layers_per_virtual_stage=args.num_layers_per_virtual_pipeline_stage)
    chunks = build_model_chunks(config, seed, split)   # this rank's model chunks, in schedule order
    ... run_schedule(chunks, ...) ...                  # parallel/pipeline.py
    allreduce_tied_embedding_grads(chunks)             # before the optimizer step

`StageModel(chunks)` presents a rank's chunks as one module for the data-parallel buffers, the
optimizer and checkpoints: its parameter and state-dict names are the chunks' own global names
(`layers.5.mlp.up.weight`, never `chunks.1.layers.5...`), unique because the chunks hold disjoint blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


from megatron_llama.parallel import comm, state


@dataclass(frozen=True)
class StageSplit:
    """The global block range [first, last) of every (pipeline rank, model chunk)."""

    num_layers: int
    pipeline_size: int
    ranges: tuple[tuple[tuple[int, int], ...], ...]  # ranges[pp_rank][chunk] = (first, last)

    @property
    def num_chunks(self) -> int:
        """Model chunks per rank (the virtual pipeline size; 1 without interleaving)."""
        return len(self.ranges[0])

    def layer_range(self, pipeline_rank: int, chunk: int = 0) -> tuple[int, int]:
        return self.ranges[pipeline_rank][chunk]

    def is_first(self, pipeline_rank: int, chunk: int) -> bool:
        """This (rank, chunk) embeds the tokens."""
        return pipeline_rank == 0 and chunk == 0

    def is_last(self, pipeline_rank: int, chunk: int) -> bool:
        """This (rank, chunk) applies the final norm and the output head."""
        return pipeline_rank == self.pipeline_size - 1 and chunk == self.num_chunks - 1

    def describe(self) -> str:
        """One line per rank, for the log: 'pp rank 1: blocks [2, 4) [6, 8)'."""
        return "\n".join(f"pp rank {rank}: blocks " + " ".join(f"[{first}, {last})" for first, last in chunks)
                         for rank, chunks in enumerate(self.ranges))


def split_layers(num_layers: int, pipeline_size: int, *, layers_per_virtual_stage: int | None = None,
                 first_stage_layers: int | None = None, last_stage_layers: int | None = None) -> StageSplit:
    """The stage split of the module docstring; ValueError names the flags and numbers to change."""
    if num_layers < 1 or pipeline_size < 1:
        raise ValueError(f"--num-layers ({num_layers}) and --pipeline-model-parallel-size ({pipeline_size}) "
                         f"must be positive")
    uneven = first_stage_layers is not None or last_stage_layers is not None
    if uneven and layers_per_virtual_stage is not None:
        raise ValueError("--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers cannot be "
                         "combined with --num-layers-per-virtual-pipeline-stage; drop one of them")
    if uneven:
        counts = _uneven_counts(num_layers, pipeline_size, first_stage_layers, last_stage_layers)
    else:
        if num_layers % pipeline_size:
            nearest = max(1, round(num_layers / pipeline_size)) * pipeline_size
            raise ValueError(f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size "
                             f"{pipeline_size}; use a multiple of {pipeline_size} (e.g. {nearest}), another "
                             f"pipeline size, or --decoder-first-pipeline-num-layers / "
                             f"--decoder-last-pipeline-num-layers")
        counts = [num_layers // pipeline_size] * pipeline_size
    if layers_per_virtual_stage is not None:
        return StageSplit(num_layers, pipeline_size,
                          _interleaved_ranges(num_layers, pipeline_size, layers_per_virtual_stage))
    starts = [sum(counts[:rank]) for rank in range(pipeline_size)]
    return StageSplit(num_layers, pipeline_size,
                      tuple(((start, start + count),) for start, count in zip(starts, counts)))


def _uneven_counts(num_layers: int, pipeline_size: int, first: int | None, last: int | None) -> list[int]:
    """Blocks per stage with explicit first/last counts; the middle stages split the rest evenly."""
    if pipeline_size < 2:
        raise ValueError("--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers need "
                         f"--pipeline-model-parallel-size of at least 2, got {pipeline_size}")
    for flag, count in (("--decoder-first-pipeline-num-layers", first), ("--decoder-last-pipeline-num-layers", last)):
        if count is not None and not 0 <= count <= num_layers:
            raise ValueError(f"{flag} {count} must lie between 0 and --num-layers {num_layers}")
    given = [count for count in (first, last) if count is not None]
    rest, others = num_layers - sum(given), pipeline_size - len(given)
    if rest < 0 or (others == 0 and rest) or (others and (rest % others or rest == 0)):
        raise ValueError(f"--num-layers {num_layers} minus the first/last stage layers ({first}, {last}) leaves "
                         f"{rest} layers for the other {others} stages; they must get an equal, positive number "
                         f"each, so choose first/last counts that leave a positive multiple of {max(others, 1)}")
    middle = rest // others if others else 0
    counts = [middle] * pipeline_size
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def _interleaved_ranges(num_layers: int, pipeline_size: int, per_chunk: int) -> tuple:
    per_stage = num_layers // pipeline_size
    if per_chunk < 1 or per_stage % per_chunk:
        raise ValueError(f"--num-layers-per-virtual-pipeline-stage {per_chunk} must divide the {per_stage} layers "
                         f"of each pipeline stage (--num-layers {num_layers} / --pipeline-model-parallel-size "
                         f"{pipeline_size}); use a divisor of {per_stage}")
    num_chunks = per_stage // per_chunk
    return tuple(tuple(((chunk * pipeline_size + rank) * per_chunk, (chunk * pipeline_size + rank + 1) * per_chunk)
                       for chunk in range(num_chunks))
                 for rank in range(pipeline_size))


def build_model_chunks(config, seed: int, split: StageSplit, *, pipeline_rank: int | None = None,
                       device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> list[nn.Module]:
    """This rank's model chunks, chunk 0 first (LlamaModel via build_model); marks a tied head's embedding copy."""
    from megatron_llama.model.llama import build_model  # the model imports parallel/, not the other way round
    rank = state.get_pipeline_model_parallel_rank() if pipeline_rank is None else pipeline_rank
    if split.pipeline_size != state.get_pipeline_model_parallel_world_size() and pipeline_rank is None:
        raise ValueError(f"the stage split is for {split.pipeline_size} pipeline stages but parallel.state has "
                         f"{state.get_pipeline_model_parallel_world_size()}; build both from the same "
                         f"--pipeline-model-parallel-size")
    chunks = []
    for chunk in range(split.num_chunks):
        model = build_model(config, seed, device=device, dtype=dtype, pre_process=split.is_first(rank, chunk),
                            post_process=split.is_last(rank, chunk), layer_range=split.layer_range(rank, chunk))
        if split.pipeline_size > 1 and split.is_last(rank, chunk) and hasattr(model, "embedding"):
            model.embedding.weight.is_tied_embedding_copy = True
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


def tied_embedding_weight(model_chunks: list[nn.Module]) -> nn.Parameter | None:
    """The embedding weight this rank shares with the other end of the pipeline, or None (untied, pp=1, middle)."""
    if state.get_pipeline_model_parallel_world_size() == 1:
        return None
    ends = []
    if state.is_pipeline_first_stage():
        ends.append(model_chunks[0])
    if state.is_pipeline_last_stage():
        ends.append(model_chunks[-1])
    for model in ends:
        if getattr(model, "tied_output", False) and hasattr(model, "embedding"):
            return model.embedding.weight
    return None


def allreduce_tied_embedding_grads(model_chunks: list[nn.Module]) -> None:
    """Sum the tied embedding's gradient over the first and last stage (after the schedule, before the step).

    Acts on `main_grad` where the parameter has one (mixed-precision optimizer), else on `.grad`.
    Every rank may call it; only the two ends of each pipeline communicate.
    """
    weight = tied_embedding_weight(model_chunks)
    if weight is None:
        return
    grad = getattr(weight, "main_grad", None)
    if grad is None:
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        grad = weight.grad
    comm.all_reduce(grad, state.get_embedding_group())


@torch.no_grad()
def sync_tied_embedding_weights(model_chunks: list[nn.Module]) -> None:
    """Give the last stage's copy the first stage's values (e.g. after loading weights saved without the copy).

    The copy is zeroed and the two are summed over the embedding group, which leaves the first stage's values.
    """
    weight = tied_embedding_weight(model_chunks)
    if weight is None:
        return
    if not state.is_pipeline_first_stage():
        weight.zero_()
    comm.all_reduce(weight.data, state.get_embedding_group())
