"""The parallel layout: the pure rank math, the object's self-checks, and the groups torch.distributed builds."""
import dataclasses
import itertools
import math

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed  # tests/ is on sys.path under pytest
from megatron_llama.parallel import state
from megatron_llama.parallel.state import ParallelLayout, compute_rank_groups, global_rank, rank_coordinates

LAYOUTS = [(1, 1, 1), (8, 2, 2), (8, 1, 8), (8, 8, 1), (12, 2, 3), (16, 2, 4), (24, 4, 3)]  # (world, tp, pp)


def test_worked_example_of_the_docstring_16_ranks_tp2_pp4():
    groups = compute_rank_groups(16, 2, 4)
    assert groups["tensor"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert groups["data"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert groups["pipeline"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert groups["model"] == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]
    assert groups["embedding"] == [[0, 12], [1, 13], [2, 14], [3, 15]]
    assert global_rank(tp_rank=0, dp_rank=1, pp_rank=1, tp=2, dp=2) == 6
    rank6 = ParallelLayout.for_rank(6, 16, tensor_size=2, pipeline_size=4)
    assert (rank6.tensor_rank, rank6.data_rank, rank6.pipeline_rank, rank6.data_size) == (0, 1, 1, 2)
    assert (rank6.tensor_ranks, rank6.data_ranks, rank6.pipeline_ranks) == ([6, 7], [4, 6], [2, 6, 10, 14])
    assert (rank6.model_ranks, rank6.embedding_ranks) == ([2, 3, 6, 7, 10, 11, 14, 15], [2, 14])
    assert (rank6.prev_pipeline_rank, rank6.next_pipeline_rank) == (2, 10)
    assert not rank6.is_first_stage and not rank6.is_last_stage and not rank6.is_logging_rank


@pytest.mark.parametrize("world, tp, pp", LAYOUTS)
def test_each_kind_of_group_partitions_the_world_and_varies_only_its_own_coordinate(world, tp, pp):
    dp = world // (tp * pp)
    groups = compute_rank_groups(world, tp, pp)
    varying = {"tensor": {"tp"}, "data": {"dp"}, "pipeline": {"pp"}, "model": {"tp", "pp"}}
    sizes = {"tp": tp, "dp": dp, "pp": pp}
    for name, coordinates in varying.items():
        lists = groups[name]
        assert sorted(itertools.chain(*lists)) == list(range(world)), name
        for ranks in lists:
            assert len(ranks) == len(set(ranks)) == math.prod(sizes[c] for c in coordinates)
            coords = [rank_coordinates(rank, tp, dp) for rank in ranks]
            for fixed in set(sizes) - coordinates:
                assert len({c[fixed] for c in coords}) == 1, (name, fixed, ranks)
    for ranks in groups["tensor"]:  # tensor ranks are neighbours (one node)
        assert ranks == list(range(ranks[0], ranks[0] + tp))
    for pipeline, embedding in zip(groups["pipeline"], groups["embedding"]):
        assert embedding == ([pipeline[0], pipeline[-1]] if pp > 1 else [pipeline[0]])


@pytest.mark.parametrize("world, tp, pp", LAYOUTS)
def test_global_rank_formula_inverts_rank_coordinates(world, tp, pp):
    dp = world // (tp * pp)
    for rank in range(world):
        c = rank_coordinates(rank, tp, dp)
        assert c["pp"] < pp
        assert global_rank(c["tp"], c["dp"], c["pp"], tp, dp) == rank


@pytest.mark.parametrize("world, tp, pp", LAYOUTS)
def test_exactly_one_logging_rank_and_one_first_and_last_stage_per_pipeline(world, tp, pp):
    layouts = [ParallelLayout.for_rank(rank, world, tp, pp) for rank in range(world)]
    assert [layout.rank for layout in layouts if layout.is_logging_rank] == [world - tp * (world // (tp * pp))]
    for pipeline in compute_rank_groups(world, tp, pp)["pipeline"]:
        assert [rank for rank in pipeline if layouts[rank].is_first_stage] == [pipeline[0]]
        assert [rank for rank in pipeline if layouts[rank].is_last_stage] == [pipeline[-1]]


def test_world_size_not_divisible_by_the_parallel_sizes_names_the_numbers():
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tensor \(4\) x pipeline \(1\)"):
        compute_rank_groups(6, 4, 1)
    with pytest.raises(ValueError, match=r"world size 6 is not divisible"):
        ParallelLayout.for_rank(0, 6, tensor_size=4)


@pytest.mark.parametrize("changes, message", [
    (dict(tensor_size=0, world_size=0), r"parallel sizes must be positive"),
    (dict(data_size=3), r"tensor 2 x pipeline 2 x data 3 = 12 is not the world size 8"),
    (dict(rank=8), r"rank 8 is outside the world of 8 processes"),
    (dict(tensor_rank=0), r"rank 5 .* has the coordinates \{'tp': 1, 'dp': 0, 'pp': 1\}"),
    (dict(pipeline_rank=0), r"not \{'tp': 1, 'dp': 0, 'pp': 0\}"),
    (dict(tensor_size=1, pipeline_size=4, tensor_rank=0, data_rank=1, pipeline_rank=2),
     r"sequence parallelism .* needs a tensor size above 1"),
])
def test_a_layout_that_contradicts_itself_is_refused_with_what_to_change(changes, message):
    layout = ParallelLayout.for_rank(5, 8, tensor_size=2, pipeline_size=2, sequence_parallel=True)
    assert (layout.tensor_rank, layout.data_rank, layout.pipeline_rank) == (1, 0, 1)
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(layout, **changes)


def test_the_layout_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ParallelLayout.single_process().tensor_size = 2


def test_without_initialisation_the_single_process_layout_is_current_with_no_groups():
    assert not dist.is_initialized()
    layout = state.current_layout()
    assert layout == ParallelLayout.single_process()
    assert (layout.world_size, layout.tensor_ranks, layout.pipeline_ranks, layout.embedding_ranks) == (1, [0], [0], [0])
    assert layout.is_first_stage and layout.is_last_stage and layout.is_logging_rank
    assert (layout.tensor_size, layout.pipeline_size, layout.data_size) == (1, 1, 1)
    assert (layout.tensor_rank, layout.pipeline_rank, layout.data_rank) == (0, 0, 0)
    assert (layout.next_pipeline_rank, layout.prev_pipeline_rank) == (0, 0)
    assert all(getattr(layout, f"{kind}_group") is None for kind in state.GROUP_KINDS)
    assert not layout.sequence_parallel


def test_use_layout_installs_a_layout_for_its_block_and_restores_the_previous_one_even_after_an_error():
    outer = ParallelLayout.for_rank(3, 4, tensor_size=2, sequence_parallel=True)
    inner = dataclasses.replace(outer, sequence_parallel=False)
    with state.use_layout(outer):
        assert state.current_layout() is outer
        with pytest.raises(KeyError), state.use_layout(inner):
            assert state.current_layout() is inner
            raise KeyError("inside")
        assert state.current_layout() is outer
    assert state.current_layout() == ParallelLayout.single_process()


def test_initialize_without_a_default_process_group_says_how_to_start_one():
    with pytest.raises(RuntimeError, match=r"needs torch.distributed.init_process_group\(\) first"):
        state.initialize_model_parallel(1, 1)
    assert state.current_layout() == ParallelLayout.single_process()


def _check_layouts_in_one_process_group():
    """Build several layouts in turn on 4 ranks; report what each layout says and an all-reduce per group reached."""
    rank = dist.get_rank()
    report = []
    for tp, pp, sequence_parallel in [(2, 2, True), (4, 1, False), (1, 4, True)]:
        with state.parallel_layout(tp, pp, sequence_parallel=sequence_parallel) as layout:
            summed = {}
            for name in state.GROUP_KINDS:
                group = getattr(layout, f"{name}_group")
                if group is None:
                    continue
                value = torch.tensor([float(2**rank)])  # a sum of distinct powers of two names its members
                dist.all_reduce(value, group=group)
                summed[name] = sorted(r for r in range(4) if int(value.item()) >> r & 1)
            try:
                state.initialize_model_parallel(tp, pp)
                second_build = None
            except RuntimeError as error:
                second_build = str(error)
            report.append(dict(
                layout=(tp, pp, sequence_parallel), summed=summed, installed=state.current_layout() is layout,
                sizes=(layout.tensor_size, layout.pipeline_size, layout.data_size, layout.world_size),
                ranks=(layout.rank, layout.tensor_rank, layout.pipeline_rank, layout.data_rank),
                rank_lists={name: getattr(layout, f"{name}_ranks") for name in state.GROUP_KINDS},
                sequence_parallel=(layout.sequence_parallel, state.current_layout().sequence_parallel),
                stages=(layout.is_first_stage, layout.is_last_stage, layout.is_logging_rank),
                neighbours=(layout.prev_pipeline_rank, layout.next_pipeline_rank),
                second_build=second_build))
        report[-1]["restored"] = state.current_layout() == ParallelLayout.single_process()
    return report


def test_four_processes_build_each_layout_and_collectives_reach_exactly_the_listed_ranks():
    reports = run_distributed(_check_layouts_in_one_process_group, world_size=4)
    for rank, report in enumerate(reports):
        for entry in report:
            tp, pp, sequence_parallel = entry["layout"]
            dp = 4 // (tp * pp)
            mine = {name: next(g for g in groups if rank in g)
                    for name, groups in compute_rank_groups(4, tp, pp).items() if any(rank in g for g in groups)}
            coords = rank_coordinates(rank, tp, dp)
            pipeline = mine["pipeline"]
            first, last = coords["pp"] == 0, coords["pp"] == pp - 1
            expected_rank_lists = dict(mine, embedding=[pipeline[0], pipeline[-1]] if pp > 1 else pipeline)
            assert entry["installed"] and entry["restored"]
            assert entry["summed"] == mine  # every group this rank belongs to, reaching exactly its ranks
            assert entry["rank_lists"] == expected_rank_lists
            assert entry["sizes"] == (tp, pp, dp, 4)
            assert entry["ranks"] == (rank, coords["tp"], coords["pp"], coords["dp"])
            assert entry["sequence_parallel"] == (sequence_parallel and tp > 1,) * 2  # no effect at tensor size 1
            assert entry["stages"] == (first, last, last and coords["tp"] == 0 and coords["dp"] == 0)
            assert entry["neighbours"] == (pipeline[(coords["pp"] - 1) % pp], pipeline[(coords["pp"] + 1) % pp])
            assert "call destroy_model_parallel() before building another layout" in entry["second_build"]
