"""Which transformer blocks each pipeline stage holds, and the tied embedding shared by the first and last stage.

Pure layout math and the tied embedding's communication; nothing here knows the model. Building a rank's
model chunks from a split is the model's job (model/stage_model.py).

Stage split (`split_layers`): the blocks are divided evenly over the pipeline stages
(`--pipeline-model-parallel-size`), or, for uneven models, the first and/or last stage take
an explicit count (`--decoder-first-pipeline-num-layers`, `--decoder-last-pipeline-num-layers`)
and the middle stages share the rest evenly. The embedding lives on the first stage, the final
norm and output head on the last: `is_first_chunk` / `is_last_chunk` say which (rank, chunk) that is.

Virtual stages (`--num-layers-per-virtual-pipeline-stage L`, the interleaved schedule of
Narayanan et al. 2021, section 2.2): the model is cut into pp x v model chunks of L blocks
(v = layers per stage / L), dealt out round-robin, so chunk c on pipeline rank r is model chunk
c * pp + r. Worked example, 8 layers, pp=2, L=2 (v=2):

    model chunk   0: blocks 0-1   1: blocks 2-3   2: blocks 4-5   3: blocks 6-7
    rank 0        chunk 0 = model chunk 0 (embedding, blocks 0-1), chunk 1 = model chunk 2 (blocks 4-5)
    rank 1        chunk 0 = model chunk 1 (blocks 2-3), chunk 1 = model chunk 3 (blocks 6-7, norm, head)

Tied embedding: with an output head tied to the input embedding and more than one stage, the
last stage holds its own copy of the embedding weight for the output head. Its initial values
equal the first stage's (same parameter name, and parameters are drawn by name:
layers.initialize_parameters). Whoever builds the chunks marks both ends' weights with
`mark_tied_embedding`; `allreduce_tied_embedding_grads` then sums the two copies' gradients over
the layout's embedding group after backward, so both take identical optimizer steps and stay equal. The
last stage's copy is marked `param.is_tied_embedding_copy = True`: a global gradient norm must skip
it (it would count the shared weight twice), and a checkpoint merge may drop it (it equals the first stage's).

Usage:
    split = split_layers(config.num_layers, pp, layers_per_virtual_stage=args.num_layers_per_virtual_pipeline_stage)
    chunks = build_model_chunks(config, seed, split, layout)   # model/stage_model.py: this rank's chunks, marked
    ... run_schedule(chunks, ..., layout=layout) ...           # parallel/pipeline.py
    allreduce_tied_embedding_grads(chunks, layout)             # before the optimizer step
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatron_llama.parallel import comm
from megatron_llama.parallel.state import ParallelLayout


def is_first_chunk(pipeline_rank: int, chunk: int) -> bool:
    """This (rank, chunk) holds the first blocks: it embeds the tokens and receives nothing."""
    return pipeline_rank == 0 and chunk == 0


def is_last_chunk(pipeline_rank: int, chunk: int, pipeline_size: int, num_chunks: int) -> bool:
    """This (rank, chunk) holds the last blocks: it applies the final norm and output head and computes the loss."""
    return pipeline_rank == pipeline_size - 1 and chunk == num_chunks - 1


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
        return is_first_chunk(pipeline_rank, chunk)

    def is_last(self, pipeline_rank: int, chunk: int) -> bool:
        return is_last_chunk(pipeline_rank, chunk, self.pipeline_size, self.num_chunks)

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


def mark_tied_embedding(weight: nn.Parameter, *, is_copy: bool) -> None:
    """Mark an embedding weight that the first and last stage share (module docstring: 'Tied embedding');
    is_copy on the last stage's copy."""
    weight.is_tied_embedding = True
    weight.is_tied_embedding_copy = is_copy


def tied_embedding_weight(modules: list[nn.Module]) -> nn.Parameter | None:
    """The marked embedding weight this rank shares with the other end of the pipeline, or None (untied, pp=1,
    middle stage). `modules`: the rank's chunks, or the one module that holds them all (a rank with pp > 1 holds
    one end of the pipeline at most, so at most one weight is marked)."""
    return next((param for module in modules for param in module.parameters()
                 if getattr(param, "is_tied_embedding", False)), None)


def allreduce_tied_embedding_grads(modules: list[nn.Module], layout: ParallelLayout) -> None:
    """Sum the tied embedding's gradient over the first and last stage of `layout` (after the schedule, before
    the step).

    Acts on `main_grad` where the parameter has one (mixed-precision optimizer), else on `.grad`.
    Every rank may call it; only the two ends of each pipeline communicate.
    """
    weight = tied_embedding_weight(modules)
    if weight is None:
        return
    grad = getattr(weight, "main_grad", None)
    if grad is None:
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        grad = weight.grad
    comm.all_reduce(grad, layout.embedding_group)


@torch.no_grad()
def sync_tied_embedding_weights(modules: list[nn.Module], layout: ParallelLayout) -> None:
    """Give the last stage's copy the first stage's values (e.g. after loading weights saved without the copy).

    The copy is zeroed and the two are summed over the embedding group, which leaves the first stage's values.
    """
    weight = tied_embedding_weight(modules)
    if weight is None:
        return
    if weight.is_tied_embedding_copy:
        weight.zero_()
    comm.all_reduce(weight.data, layout.embedding_group)
