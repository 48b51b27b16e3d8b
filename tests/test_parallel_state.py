"""Process-group layout: the pure rank math, and the groups torch.distributed really builds."""
import itertools

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed  # tests/ is on sys.path under pytest
from megatron_llama.parallel import state
from megatron_llama.parallel.state import compute_rank_groups, global_rank, rank_coordinates

LAYOUTS = [(1, 1, 1, 1), (8, 2, 2, 1), (8, 1, 8, 1), (8, 8, 1, 1), (12, 2, 3, 1), (16, 2, 2, 2), (24, 4, 3, 2)]


def test_worked_example_of_the_docstring_16_ranks_tp2_pp4():
    groups = compute_rank_groups(16, 2, 4)
    assert groups.tensor == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert groups.data == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert groups.pipeline == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert groups.model == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]
    assert groups.embedding == [[0, 12], [1, 13], [2, 14], [3, 15]]
    assert groups.context == [[rank] for rank in range(16)]
    assert global_rank(tp_rank=0, cp_rank=0, dp_rank=1, pp_rank=1, tp=2, cp=1, dp=2) == 6


@pytest.mark.parametrize("world, tp, pp, cp", LAYOUTS)
def test_each_kind_of_group_partitions_the_world_and_varies_only_its_own_coordinate(world, tp, pp, cp):
    dp = world // (tp * pp * cp)
    groups = compute_rank_groups(world, tp, pp, cp)
    varying = {"tensor": {"tp"}, "context": {"cp"}, "data": {"dp"}, "data_with_context": {"cp", "dp"},
               "pipeline": {"pp"}, "model": {"tp", "pp"}}
    sizes = {"tp": tp, "cp": cp, "dp": dp, "pp": pp}
    for name, coordinates in varying.items():
        lists = getattr(groups, name)
        assert sorted(itertools.chain(*lists)) == list(range(world)), name
        for ranks in lists:
            assert len(ranks) == len(set(ranks)) == int(torch.tensor([sizes[c] for c in coordinates]).prod())
            coords = [rank_coordinates(rank, tp, cp, dp) for rank in ranks]
            for fixed in set(sizes) - coordinates:
                assert len({c[fixed] for c in coords}) == 1, (name, fixed, ranks)
    for ranks in groups.tensor:  # tensor ranks are neighbours (one node)
        assert ranks == list(range(ranks[0], ranks[0] + tp))
    for pipeline, embedding in zip(groups.pipeline, groups.embedding):
        assert embedding == ([pipeline[0], pipeline[-1]] if pp > 1 else [pipeline[0]])


@pytest.mark.parametrize("world, tp, pp, cp", LAYOUTS)
def test_global_rank_formula_inverts_rank_coordinates(world, tp, pp, cp):
    dp = world // (tp * pp * cp)
    for rank in range(world):
        c = rank_coordinates(rank, tp, cp, dp)
        assert c["pp"] < pp
        assert global_rank(c["tp"], c["cp"], c["dp"], c["pp"], tp, cp, dp) == rank


def test_world_size_not_divisible_by_the_parallel_sizes_names_the_numbers():
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tensor \(4\) x pipeline \(1\)"):
        compute_rank_groups(6, 4, 1)


def test_without_initialisation_every_getter_answers_one_process():
    assert not dist.is_initialized() and not state.model_parallel_is_initialized()
    for size in (state.get_tensor_model_parallel_world_size, state.get_pipeline_model_parallel_world_size,
                 state.get_data_parallel_world_size, state.get_context_parallel_world_size,
                 state.get_model_parallel_world_size):
        assert size() == 1
    for rank in (state.get_tensor_model_parallel_rank, state.get_pipeline_model_parallel_rank,
                 state.get_data_parallel_rank, state.get_context_parallel_rank):
        assert rank() == 0
    assert state.get_tensor_model_parallel_group() is None and state.get_embedding_group() is None
    assert state.is_pipeline_first_stage() and state.is_pipeline_last_stage()
    state.set_sequence_parallel(True)
    assert not state.get_sequence_parallel()  # nothing to shard across with one tensor rank
    state.set_sequence_parallel(False)


def _check_layouts_in_one_process_group():
    """Build several layouts in turn on 4 ranks; report what the getters and an all-reduce per group say."""
    rank = dist.get_rank()
    report = []
    for tp, pp, virtual in [(2, 2, None), (4, 1, None), (1, 4, None), (1, 2, 2)]:
        state.initialize_model_parallel(tp, pp, virtual)
        summed = {}
        for name, getter in [("tensor", state.get_tensor_model_parallel_group), ("data", state.get_data_parallel_group),
                             ("pipeline", state.get_pipeline_model_parallel_group),
                             ("model", state.get_model_parallel_group), ("embedding", state.get_embedding_group)]:
            if name == "embedding" and not state.is_rank_in_embedding_group(ignore_virtual=True):
                continue
            value = torch.tensor([float(2**rank)])  # a sum of distinct powers of two names its members
            dist.all_reduce(value, group=getter())
            summed[name] = sorted(r for r in range(4) if int(value.item()) >> r & 1)
        report.append(dict(
            layout=(tp, pp, virtual), summed=summed,
            sizes=(state.get_tensor_model_parallel_world_size(), state.get_pipeline_model_parallel_world_size(),
                   state.get_data_parallel_world_size(), state.get_model_parallel_world_size()),
            ranks=(state.get_tensor_model_parallel_rank(), state.get_pipeline_model_parallel_rank(),
                   state.get_data_parallel_rank()),
            stages=(state.is_pipeline_first_stage(), state.is_pipeline_last_stage()),
            neighbours=(state.get_pipeline_model_parallel_prev_rank(), state.get_pipeline_model_parallel_next_rank()),
            tensor_src=state.get_tensor_model_parallel_src_rank()))
        if virtual:
            state.set_virtual_pipeline_model_parallel_rank(virtual - 1)
            report[-1]["stages_last_chunk"] = (state.is_pipeline_first_stage(), state.is_pipeline_last_stage())
        state.destroy_model_parallel()
    return report


def test_four_processes_build_each_layout_and_collectives_reach_exactly_the_listed_ranks():
    reports = run_distributed(_check_layouts_in_one_process_group, world_size=4)
    for rank, report in enumerate(reports):
        for entry in report:
            tp, pp, virtual = entry["layout"]
            groups = compute_rank_groups(4, tp, pp)
            mine = {name: next(g for g in getattr(groups, name) if rank in g)
                    for name in ("tensor", "data", "pipeline", "model", "embedding")
                    if any(rank in g for g in getattr(groups, name))}
            assert entry["summed"] == {name: ranks for name, ranks in mine.items() if name in entry["summed"]}
            assert set(entry["summed"]) >= {"tensor", "data", "pipeline", "model"}
            dp = 4 // (tp * pp)
            assert entry["sizes"] == (tp, pp, dp, tp * pp)
            coords = rank_coordinates(rank, tp, 1, dp)
            assert entry["ranks"] == (coords["tp"], coords["pp"], coords["dp"])
            pipeline = mine["pipeline"]
            assert entry["neighbours"] == (pipeline[(coords["pp"] - 1) % pp], pipeline[(coords["pp"] + 1) % pp])
            assert entry["tensor_src"] == mine["tensor"][0]
            first, last = coords["pp"] == 0, coords["pp"] == pp - 1
            if virtual:  # chunk 0 of virtual 2: never the last stage; chunk 1: never the first
                assert entry["stages"] == (first, False)
                assert entry["stages_last_chunk"] == (False, last)
            else:
                assert entry["stages"] == (first, last)
