"""Process groups of the 4D layout (tensor, context, data, pipeline) and their getters.

Rank order: tensor ranks vary fastest, then context, then data, then pipeline (Megatron-LM's
default order), so the ranks of one tensor-parallel group sit on one node:

    global = tp_rank + cp_rank * tp + dp_rank * tp * cp + pp_rank * tp * cp * dp
    dp     = world_size / (tp * cp * pp)

Worked example: 16 GPUs, tp=2, pp=4 (cp=1, so dp=2):

    tensor          [0, 1] [2, 3] [4, 5] [6, 7] [8, 9] [10, 11] [12, 13] [14, 15]
    data            [0, 2] [1, 3] [4, 6] [5, 7] [8, 10] [9, 11] [12, 14] [13, 15]
    pipeline        [0, 4, 8, 12] [1, 5, 9, 13] [2, 6, 10, 14] [3, 7, 11, 15]
    model parallel  [0, 1, 4, 5, 8, 9, 12, 13] [2, 3, 6, 7, 10, 11, 14, 15]   (tp x pp, one per dp x cp)
    embedding       [0, 12] [1, 13] [2, 14] [3, 15]        (first and last stage of each pipeline)

Rank 6 is tp_rank 0, dp_rank 1, pp_rank 1: 0 + 1*2 + 1*4 = 6.

`compute_rank_groups(world_size, tp, pp, cp)` is the pure function behind the layout (no
processes needed); `initialize_model_parallel` builds the torch.distributed groups from it
on a started default process group (torchrun, then `torch.distributed.init_process_group`).
Before initialisation, or after `destroy_model_parallel`, every size getter answers 1,
every rank getter 0 and every group getter None, so one plain process runs the model
with no collective issued.

Sequence parallelism (Korthikanti et al. 2022) is a switch on the tensor group, kept here
so the parallel layers read it at construction: `initialize_model_parallel(...,
sequence_parallel=True)` or `set_sequence_parallel(True)` before the model is built.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class RankGroups:
    """Global rank lists of every group of one layout; each list of lists partitions the world."""

    tensor: list[list[int]]
    context: list[list[int]]
    data: list[list[int]]
    data_with_context: list[list[int]]  # dp x cp: the ranks that hold identical weights (gradient reduction)
    pipeline: list[list[int]]
    model: list[list[int]]  # tp x pp: the ranks that together hold one full copy of the weights
    embedding: list[list[int]]  # first and last stage of each pipeline (one rank when pp == 1)


def global_rank(tp_rank: int, cp_rank: int, dp_rank: int, pp_rank: int, tp: int, cp: int, dp: int) -> int:
    """The formula of this module's docstring."""
    return tp_rank + cp_rank * tp + dp_rank * tp * cp + pp_rank * tp * cp * dp


def compute_rank_groups(world_size: int, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                        context_parallel_size: int = 1) -> RankGroups:
    """Every group of the layout, as lists of global ranks (pure: no processes needed)."""
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    if min(tp, pp, cp, world_size) < 1:
        raise ValueError(f"parallel sizes must be positive: world {world_size}, tp {tp}, pp {pp}, cp {cp}")
    dp, remainder = divmod(world_size, tp * pp * cp)
    if remainder:
        raise ValueError(f"world size {world_size} is not divisible by tensor ({tp}) x pipeline ({pp}) x context "
                         f"({cp}) = {tp * pp * cp}; launch a multiple of {tp * pp * cp} processes or change the "
                         f"parallel sizes")

    def groups_varying(*varying: str) -> list[list[int]]:
        """Ranks that agree on every coordinate except `varying`, one list per setting of the others."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for rank in range(world_size):
            coords = rank_coordinates(rank, tp, cp, dp)
            key = tuple(value for name, value in coords.items() if name not in varying)
            groups.setdefault(key, []).append(rank)
        return sorted(groups.values())

    pipelines = groups_varying("pp")
    embedding = [[ranks[0], ranks[-1]] if len(ranks) > 1 else [ranks[0]] for ranks in pipelines]
    return RankGroups(tensor=groups_varying("tp"), context=groups_varying("cp"), data=groups_varying("dp"),
                      data_with_context=groups_varying("cp", "dp"), pipeline=pipelines,
                      model=groups_varying("tp", "pp"), embedding=embedding)


def rank_coordinates(rank: int, tp: int, cp: int, dp: int) -> dict[str, int]:
    """Inverse of global_rank: {"tp": .., "cp": .., "dp": .., "pp": ..} of a global rank."""
    return {"tp": rank % tp, "cp": rank // tp % cp, "dp": rank // (tp * cp) % dp, "pp": rank // (tp * cp * dp)}


# ---- module state: set by initialize_model_parallel, cleared by destroy_model_parallel ----

_GROUPS: dict[str, object] = {}  # group name -> torch.distributed ProcessGroup of this rank
_RANKS: dict[str, list[int]] = {}  # group name -> global ranks of this rank's group
_VIRTUAL_PIPELINE_SIZE: int | None = None
_virtual_pipeline_rank: int | None = None
_sequence_parallel = False


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                              virtual_pipeline_model_parallel_size: int | None = None, context_parallel_size: int = 1,
                              *, sequence_parallel: bool = False) -> None:
    """Build every group of the layout on the started default process group (all ranks must call it)."""
    global _VIRTUAL_PIPELINE_SIZE, _virtual_pipeline_rank
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel needs torch.distributed.init_process_group() first "
                           "(launch with torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)")
    if _GROUPS:
        raise RuntimeError("model parallel groups already exist; call destroy_model_parallel() before building "
                           "another layout")
    if virtual_pipeline_model_parallel_size is not None and pipeline_model_parallel_size < 2:
        raise ValueError(f"a virtual pipeline size ({virtual_pipeline_model_parallel_size}) needs a pipeline size "
                         f"of at least 2, got {pipeline_model_parallel_size}; drop --num-layers-per-virtual-pipeline-stage")
    layout = compute_rank_groups(dist.get_world_size(), tensor_model_parallel_size, pipeline_model_parallel_size,
                                 context_parallel_size)
    rank = dist.get_rank()
    created: dict[tuple[int, ...], object] = {}  # equal rank lists share a group (data, data_with_context at cp=1)
    for name in ("tensor", "context", "data", "data_with_context", "pipeline", "model", "embedding"):
        for ranks in getattr(layout, name):
            if tuple(ranks) not in created:
                created[tuple(ranks)] = dist.new_group(ranks)  # every rank creates every group, in the same order
            if rank in ranks:
                _GROUPS[name], _RANKS[name] = created[tuple(ranks)], ranks
    _VIRTUAL_PIPELINE_SIZE = virtual_pipeline_model_parallel_size
    _virtual_pipeline_rank = 0 if virtual_pipeline_model_parallel_size is not None else None
    set_sequence_parallel(sequence_parallel)


def destroy_model_parallel() -> None:
    """Destroy every model-parallel group and reset the switches, so another layout can be built in this process."""
    global _VIRTUAL_PIPELINE_SIZE, _virtual_pipeline_rank
    if dist.is_initialized():
        for group in {id(group): group for group in _GROUPS.values()}.values():  # a group may serve two names
            dist.destroy_process_group(group)
    _GROUPS.clear()
    _RANKS.clear()
    _VIRTUAL_PIPELINE_SIZE = None
    _virtual_pipeline_rank = None
    set_sequence_parallel(False)


def model_parallel_is_initialized() -> bool:
    return bool(_GROUPS)


def set_sequence_parallel(enabled: bool) -> None:
    """Switch sequence parallelism for the parallel layers built from now on and allreduce_sequence_parallel_grads."""
    global _sequence_parallel
    _sequence_parallel = bool(enabled)


def get_sequence_parallel() -> bool:
    """True when sequence parallelism is on and there is more than one tensor rank to shard across."""
    return _sequence_parallel and get_tensor_model_parallel_world_size() > 1


def _size(name: str) -> int:
    return len(_RANKS[name]) if name in _RANKS else 1


def _rank(name: str) -> int:
    return _RANKS[name].index(dist.get_rank()) if name in _RANKS else 0


def get_tensor_model_parallel_group():
    return _GROUPS.get("tensor")


def get_tensor_model_parallel_world_size() -> int:
    return _size("tensor")


def get_tensor_model_parallel_rank() -> int:
    return _rank("tensor")


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of tensor rank 0 in this rank's tensor group (the one that reads data and broadcasts)."""
    return _RANKS["tensor"][0] if "tensor" in _RANKS else 0


def get_context_parallel_group():
    return _GROUPS.get("context")


def get_context_parallel_world_size() -> int:
    return _size("context")


def get_context_parallel_rank() -> int:
    return _rank("context")


def get_data_parallel_group(with_context_parallel: bool = False):
    """Ranks holding the same weight shards; with_context_parallel adds the context ranks (gradient reduction)."""
    return _GROUPS.get("data_with_context" if with_context_parallel else "data")


def get_data_parallel_world_size(with_context_parallel: bool = False) -> int:
    return _size("data_with_context" if with_context_parallel else "data")


def get_data_parallel_rank(with_context_parallel: bool = False) -> int:
    return _rank("data_with_context" if with_context_parallel else "data")


def get_pipeline_model_parallel_group():
    return _GROUPS.get("pipeline")


def get_pipeline_model_parallel_world_size() -> int:
    return _size("pipeline")


def get_pipeline_model_parallel_rank() -> int:
    return _rank("pipeline")


def get_pipeline_model_parallel_ranks() -> list[int]:
    """Global ranks of this rank's pipeline, first stage first."""
    return list(_RANKS.get("pipeline", [dist.get_rank() if dist.is_initialized() else 0]))


def get_pipeline_model_parallel_next_rank() -> int:
    """Global rank of the next stage (wrapping around from the last stage to the first)."""
    ranks = get_pipeline_model_parallel_ranks()
    return ranks[(get_pipeline_model_parallel_rank() + 1) % len(ranks)]


def get_pipeline_model_parallel_prev_rank() -> int:
    """Global rank of the previous stage (wrapping around from the first stage to the last)."""
    ranks = get_pipeline_model_parallel_ranks()
    return ranks[(get_pipeline_model_parallel_rank() - 1) % len(ranks)]


def get_virtual_pipeline_model_parallel_world_size() -> int | None:
    return _VIRTUAL_PIPELINE_SIZE


def get_virtual_pipeline_model_parallel_rank() -> int | None:
    return _virtual_pipeline_rank


def set_virtual_pipeline_model_parallel_rank(rank: int | None) -> None:
    """The interleaved schedule sets which model chunk runs next; stage tests then consult it."""
    global _virtual_pipeline_rank
    _virtual_pipeline_rank = rank


def is_pipeline_first_stage(ignore_virtual: bool = False) -> bool:
    """True on the stage that holds the embedding (and, interleaved, while running the first model chunk)."""
    if not ignore_virtual and _VIRTUAL_PIPELINE_SIZE is not None and _virtual_pipeline_rank != 0:
        return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual: bool = False) -> bool:
    """True on the stage that holds the output head (and, interleaved, while running the last model chunk)."""
    last_chunk = _VIRTUAL_PIPELINE_SIZE is None or _virtual_pipeline_rank == _VIRTUAL_PIPELINE_SIZE - 1
    if not ignore_virtual and not last_chunk:
        return False
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def get_model_parallel_group():
    """tp x pp ranks that together hold one full copy of the weights (gradient norm, overflow checks)."""
    return _GROUPS.get("model")


def get_model_parallel_world_size() -> int:
    return _size("model")


def get_embedding_group():
    """First and last pipeline stage: they all-reduce the gradient of a tied input/output embedding."""
    return _GROUPS.get("embedding")


def is_rank_in_embedding_group(ignore_virtual: bool = False) -> bool:
    return is_pipeline_first_stage(ignore_virtual) or is_pipeline_last_stage(ignore_virtual)
