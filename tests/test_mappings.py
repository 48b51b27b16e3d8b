"""Each mapping pair, forward and backward, equals the single-process computation it stands for.

Every rank builds the tensors of ALL ranks from one seed, so it can compute the expected
result locally: e.g. for copy_to_tensor_parallel_region the gradient of the input must be
the sum of the upstream gradients of all ranks.
"""
import pytest
import torch

from agreement import scaled_difference  # tests/ is on sys.path under pytest
from distributed import run_distributed
from megatron_llama.parallel import comm, mappings, state

B, S, H = 2, 8, 12
# Copies, scatters and gathers move values: bitwise equal, so they must be. A sum over ranks rounds in the
# collective's order: measured up to 9.7e-8 of the expected tensor's largest value; the bound stands 5x above.
REDUCTION_TOL = 5e-7


def _per_rank(generator, tp):
    return [torch.randn(B, S, H, generator=generator) for _ in range(tp)]


def _forward_backward(mapping, x, upstream, group):
    x = x.clone().requires_grad_()
    y = mapping(x, group)
    y.backward(upstream)
    return y.detach(), x.grad


def _check_every_mapping(tp):
    with state.parallel_layout(tp, 1) as layout:
        return _compare_every_mapping(tp, layout.tensor_rank, layout.tensor_group)


def _compare_every_mapping(tp, rank, group):
    generator = torch.Generator().manual_seed(7)
    inputs, upstreams = _per_rank(generator, tp), _per_rank(generator, tp)  # x_r and dL/dy_r of every rank
    shared_x, shared_grad = inputs[0], upstreams[0]
    total_x, total_grad = sum(inputs), sum(upstreams)
    results = {}

    def agrees(value, expected, reduced: bool) -> bool:
        return scaled_difference(value, expected) <= REDUCTION_TOL if reduced else torch.equal(value, expected)

    def check(name, mapping, x, upstream, expected_y, expected_grad, *, reduced_y=False, reduced_grad=False):
        y, grad = _forward_backward(mapping, x, upstream, group)
        results[name] = (agrees(y, expected_y, reduced_y), agrees(grad, expected_grad, reduced_grad))

    sequence = mappings.SEQUENCE_DIM
    check("copy (f)", mappings.copy_to_tensor_parallel_region, shared_x, upstreams[rank], shared_x, total_grad,
          reduced_grad=True)
    check("reduce (g)", mappings.reduce_from_tensor_parallel_region, inputs[rank], shared_grad, total_x, shared_grad,
          reduced_y=True)
    check("gather last", mappings.gather_from_tensor_parallel_region, shared_x.chunk(tp, -1)[rank], shared_grad,
          shared_x, shared_grad.chunk(tp, -1)[rank])
    check("gather sequence", mappings.gather_from_sequence_parallel_region, shared_x.chunk(tp, sequence)[rank],
          upstreams[rank], shared_x, total_grad.chunk(tp, sequence)[rank], reduced_grad=True)
    check("reduce-scatter sequence", mappings.reduce_scatter_to_sequence_parallel_region, inputs[rank],
          shared_grad.chunk(tp, sequence)[rank], total_x.chunk(tp, sequence)[rank], shared_grad, reduced_y=True)

    # the collectives of comm.py on a non-contiguous input along a middle dimension
    strided = inputs[rank].transpose(0, 2)  # [H, S, B], not contiguous
    gathered = comm.all_gather_along(strided, 1, group)
    results["all_gather_along strided"] = (torch.equal(gathered, torch.cat([x.transpose(0, 2) for x in inputs], 1)),)
    scattered = comm.reduce_scatter_along(strided, 1, group)
    expected = total_x.transpose(0, 2).chunk(tp, 1)[rank]
    results["reduce_scatter_along strided"] = (scaled_difference(scattered, expected) <= REDUCTION_TOL,)
    return results


@pytest.mark.parametrize("tp", [2, 4])
def test_every_mapping_pair_matches_single_process_math(tp):
    for rank, results in enumerate(run_distributed(_check_every_mapping, world_size=tp, args=(tp,))):
        for name, passed in results.items():
            assert all(passed), f"rank {rank}: {name} (forward ok, backward ok) = {passed}"


def test_without_process_groups_every_mapping_returns_its_input_itself():
    x = torch.randn(B, S, H)
    for mapping in (mappings.copy_to_tensor_parallel_region, mappings.reduce_from_tensor_parallel_region,
                    mappings.gather_from_tensor_parallel_region, mappings.gather_from_sequence_parallel_region,
                    mappings.reduce_scatter_to_sequence_parallel_region):
        assert mapping(x, None) is x
