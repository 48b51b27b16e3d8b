"""The parallel layout: sizes, this rank's coordinates and its process groups, in one frozen object.

Rank order: tensor ranks vary fastest, then data, then pipeline (Megatron-LM's default order), so
the ranks of one tensor-parallel group sit on one node:

    global = tp_rank + dp_rank * tp + pp_rank * tp * dp
    dp     = world_size / (tp * pp)

Worked example: 16 GPUs, tp=2, pp=4, so dp=2:

    tensor          [0, 1] [2, 3] [4, 5] [6, 7] [8, 9] [10, 11] [12, 13] [14, 15]
    data            [0, 2] [1, 3] [4, 6] [5, 7] [8, 10] [9, 11] [12, 14] [13, 15]
    pipeline        [0, 4, 8, 12] [1, 5, 9, 13] [2, 6, 10, 14] [3, 7, 11, 15]
    model parallel  [0, 1, 4, 5, 8, 9, 12, 13] [2, 3, 6, 7, 10, 11, 14, 15]   (tp x pp, one per dp rank)
    embedding       [0, 12] [1, 13] [2, 14] [3, 15]        (first and last stage of each pipeline)

Rank 6 is tp_rank 0, dp_rank 1, pp_rank 1: 0 + 1*2 + 1*4 = 6.

`ParallelLayout` holds one rank's view of this: the sizes, its coordinates, its groups and their
global ranks; it checks itself when built. Building one with groups (every rank calls it, on the
default process group of a torchrun launch, started by world.start_default_group):

    layout = initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=4,
                                       sequence_parallel=True)   # builds the groups, installs the layout
    ...                                                          # build the model, train
    destroy_model_parallel()                                     # back to the single-process layout

    with parallel_layout(2, 4) as layout:                        # the same, undone on exit (tests)
        with use_layout(dataclasses.replace(layout, sequence_parallel=False)):   # same groups, SP off
            ...

The layout is handed down: the parallel layers, the model and its chunks take it when they are built
(`layout=`), the schedules, seeding and gradient sums when they run, and the mappings receive its
tensor group. Nothing reads hidden module state, except for one default: the installed layout,
`current_layout()`, the only state of this module. A layer built without `layout=` takes it (so a
test can build a model inside `use_layout(...)`). Until one is installed it is
`ParallelLayout.single_process()`: every size 1, every rank 0, every group None, so one plain
process runs the model with no collective issued.

Sequence parallelism (Korthikanti et al. 2022) is a field of the layout: it splits the activations
between layers along the sequence across the tensor group, so it needs tensor size > 1.
"""
from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from dataclasses import dataclass

import torch.distributed as dist

from megatron_llama.parallel import world


def global_rank(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    """The formula of this module's docstring."""
    return tp_rank + dp_rank * tp + pp_rank * tp * dp


def rank_coordinates(rank: int, tp: int, dp: int) -> dict[str, int]:
    """Inverse of global_rank: {"tp": .., "dp": .., "pp": ..} of a global rank."""
    return {"tp": rank % tp, "dp": rank // tp % dp, "pp": rank // (tp * dp)}


def data_parallel_size(world_size: int, tensor_model_parallel_size: int, pipeline_model_parallel_size: int) -> int:
    """world_size / (tp x pp); ValueError naming the numbers when the sizes do not fit the world."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    if min(tp, pp, world_size) < 1:
        raise ValueError(f"parallel sizes must be positive: world {world_size}, tensor {tp}, pipeline {pp}")
    dp, remainder = divmod(world_size, tp * pp)
    if remainder:
        raise ValueError(f"world size {world_size} is not divisible by tensor ({tp}) x pipeline ({pp}) = {tp * pp}; "
                         f"launch a multiple of {tp * pp} processes or change the parallel sizes")
    return dp


@dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """One rank's place in the layout of the module docstring, and its process groups.

    Built by initialize_model_parallel (with groups), `for_rank` (rank math only) or `single_process`.
    A group is None where this process has none: without torch.distributed, or (embedding) on a middle stage.
    """

    tensor_size: int
    pipeline_size: int
    data_size: int
    world_size: int
    rank: int  # global rank of this process
    tensor_rank: int
    pipeline_rank: int
    data_rank: int
    sequence_parallel: bool = False  # activations between layers are sequence shards [b, s / tp, h]
    tensor_group: dist.ProcessGroup | None = None
    data_group: dist.ProcessGroup | None = None  # ranks that hold the same weight shards (gradient reduction)
    pipeline_group: dist.ProcessGroup | None = None
    model_group: dist.ProcessGroup | None = None  # tp x pp: one full copy of the weights (gradient norm)
    embedding_group: dist.ProcessGroup | None = None  # first and last stage: the tied embedding's gradient

    def __post_init__(self):
        sizes = {"tensor": self.tensor_size, "pipeline": self.pipeline_size, "data": self.data_size,
                 "world": self.world_size}
        if min(sizes.values()) < 1:
            raise ValueError(f"parallel sizes must be positive, got {sizes}")
        if self.tensor_size * self.pipeline_size * self.data_size != self.world_size:
            raise ValueError(f"tensor {self.tensor_size} x pipeline {self.pipeline_size} x data {self.data_size} = "
                             f"{self.tensor_size * self.pipeline_size * self.data_size} is not the world size "
                             f"{self.world_size}; the data-parallel size must be world / (tensor x pipeline)")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside the world of {self.world_size} processes")
        expected = rank_coordinates(self.rank, self.tensor_size, self.data_size)
        given = {"tp": self.tensor_rank, "dp": self.data_rank, "pp": self.pipeline_rank}
        if given != expected:
            raise ValueError(f"rank {self.rank} at tensor {self.tensor_size}, data {self.data_size} has the "
                             f"coordinates {expected} (global = tp_rank + dp_rank * tp + pp_rank * tp * dp), not "
                             f"{given}; build the layout with ParallelLayout.for_rank")
        if self.sequence_parallel and self.tensor_size == 1:
            raise ValueError("sequence parallelism splits the sequence across tensor ranks and needs a tensor size "
                             "above 1; build the layout with sequence_parallel=False")

    @classmethod
    def for_rank(cls, rank: int, world_size: int, tensor_size: int = 1, pipeline_size: int = 1, *,
                 sequence_parallel: bool = False, **groups: dist.ProcessGroup | None) -> ParallelLayout:
        """The layout of global `rank` (its coordinates by the formula); groups by field name, e.g. tensor_group=."""
        data_size = data_parallel_size(world_size, tensor_size, pipeline_size)
        coordinates = rank_coordinates(rank, tensor_size, data_size)
        return cls(tensor_size=tensor_size, pipeline_size=pipeline_size, data_size=data_size, world_size=world_size,
                   rank=rank, tensor_rank=coordinates["tp"], pipeline_rank=coordinates["pp"],
                   data_rank=coordinates["dp"], sequence_parallel=sequence_parallel, **groups)

    @classmethod
    def single_process(cls) -> ParallelLayout:
        """One process, no torch.distributed: every size 1, every rank 0, every group None."""
        return cls.for_rank(0, 1)

    def _global(self, tp_rank: int | None = None, dp_rank: int | None = None, pp_rank: int | None = None) -> int:
        """Global rank of the coordinates given, this rank's for the others."""
        return global_rank(self.tensor_rank if tp_rank is None else tp_rank,
                           self.data_rank if dp_rank is None else dp_rank,
                           self.pipeline_rank if pp_rank is None else pp_rank, self.tensor_size, self.data_size)

    @property
    def tensor_ranks(self) -> list[int]:
        """Global ranks of this rank's tensor group; the first is the one that reads data and broadcasts."""
        return [self._global(tp_rank=tp_rank) for tp_rank in range(self.tensor_size)]

    @property
    def data_ranks(self) -> list[int]:
        return [self._global(dp_rank=dp_rank) for dp_rank in range(self.data_size)]

    @property
    def pipeline_ranks(self) -> list[int]:
        """Global ranks of this rank's pipeline, first stage first."""
        return [self._global(pp_rank=pp_rank) for pp_rank in range(self.pipeline_size)]

    @property
    def model_ranks(self) -> list[int]:
        return [self._global(tp_rank=tp_rank, pp_rank=pp_rank)
                for pp_rank in range(self.pipeline_size) for tp_rank in range(self.tensor_size)]

    @property
    def embedding_ranks(self) -> list[int]:
        """First and last stage of this rank's pipeline (one rank when there is one stage)."""
        pipeline = self.pipeline_ranks
        return [pipeline[0], pipeline[-1]] if len(pipeline) > 1 else pipeline

    @property
    def is_first_stage(self) -> bool:
        """This rank runs the first pipeline stage (it holds the embedding)."""
        return self.pipeline_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """This rank runs the last pipeline stage (it holds the output head and computes the loss)."""
        return self.pipeline_rank == self.pipeline_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """The one rank that writes logs and metrics: tensor rank 0, data rank 0, last stage (it holds the loss)."""
        return self.tensor_rank == 0 and self.data_rank == 0 and self.is_last_stage

    @property
    def next_pipeline_rank(self) -> int:
        """Global rank of the next stage (wrapping around from the last stage to the first)."""
        return self._global(pp_rank=(self.pipeline_rank + 1) % self.pipeline_size)

    @property
    def prev_pipeline_rank(self) -> int:
        """Global rank of the previous stage (wrapping around from the first stage to the last)."""
        return self._global(pp_rank=(self.pipeline_rank - 1) % self.pipeline_size)


GROUP_KINDS = ("tensor", "data", "pipeline", "model", "embedding")


def compute_rank_groups(world_size: int, tensor_model_parallel_size: int,
                        pipeline_model_parallel_size: int) -> dict[str, list[list[int]]]:
    """Every group of the layout by kind (GROUP_KINDS), as sorted lists of global ranks (pure: no processes).

    Each kind but "embedding" partitions the world; "embedding" holds each pipeline's first and last stage.
    """
    groups: dict[str, set[tuple[int, ...]]] = {kind: set() for kind in GROUP_KINDS}
    for rank in range(world_size):
        layout = ParallelLayout.for_rank(rank, world_size, tensor_model_parallel_size, pipeline_model_parallel_size)
        for kind in GROUP_KINDS:
            groups[kind].add(tuple(getattr(layout, f"{kind}_ranks")))
    return {kind: [list(ranks) for ranks in sorted(lists)] for kind, lists in groups.items()}


_current = ParallelLayout.single_process()  # the module's only state: see current_layout


def current_layout() -> ParallelLayout:
    """The installed layout: from initialize_model_parallel or use_layout, else the single-process one."""
    return _current


@contextlib.contextmanager
def use_layout(layout: ParallelLayout) -> Iterator[ParallelLayout]:
    """Install `layout` inside the block and the previous one again after it."""
    global _current
    previous, _current = _current, layout
    try:
        yield layout
    finally:
        _current = previous


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1, *,
                              sequence_parallel: bool = False, timeout: datetime.timedelta | None = None
                              ) -> ParallelLayout:
    """Build every group of the layout on the started default process group (all ranks must call it), install
    the layout and return it. Sequence parallelism has no effect at tensor size 1 (the layout then has it off).
    `timeout`: how long a collective of these groups waits before failing (None: torch's default for the backend;
    a subgroup does not inherit the default group's)."""
    global _current
    if not world.is_distributed():
        raise RuntimeError("initialize_model_parallel needs torch.distributed.init_process_group() first "
                           "(launch with torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)")
    if _current.tensor_group is not None:
        raise RuntimeError("model parallel groups already exist; call destroy_model_parallel() before building "
                           "another layout")
    world_size, rank = world.world_size(), world.world_rank()
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    created: dict[tuple[int, ...], dist.ProcessGroup] = {}  # equal rank lists share a group (tensor and model at pp 1)
    mine: dict[str, dist.ProcessGroup] = {}
    for kind, rank_lists in compute_rank_groups(world_size, tp, pp).items():
        for ranks in rank_lists:
            if tuple(ranks) not in created:
                created[tuple(ranks)] = dist.new_group(ranks, timeout=timeout)  # every rank creates every group, in the same order
            if rank in ranks:
                mine[f"{kind}_group"] = created[tuple(ranks)]
    _current = ParallelLayout.for_rank(rank, world_size, tp, pp, sequence_parallel=sequence_parallel and tp > 1,
                                       **mine)
    return _current


def destroy_model_parallel() -> None:
    """Destroy the installed layout's groups and install the single-process layout, so another can be built."""
    global _current
    if world.is_distributed():
        groups = [getattr(_current, f"{kind}_group") for kind in GROUP_KINDS]
        for group in {id(group): group for group in groups if group is not None}.values():  # one may serve two kinds
            dist.destroy_process_group(group)
    _current = ParallelLayout.single_process()


@contextlib.contextmanager
def parallel_layout(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1, *,
                    sequence_parallel: bool = False) -> Iterator[ParallelLayout]:
    """initialize_model_parallel for the block, destroy_model_parallel after it."""
    try:
        yield initialize_model_parallel(tensor_model_parallel_size, pipeline_model_parallel_size,
                                        sequence_parallel=sequence_parallel)
    finally:
        destroy_model_parallel()

