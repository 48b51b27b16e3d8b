"""Data parallelism gives the numbers of one process: dp=2 (and tp=2 x dp=2) against dp=1 on the same global batch.

One spawn of 2 gloo ranks trains three Adam steps for each variant (all-reduce or the distributed
optimizer's reduce-scatter, with and without overlap) with gradient accumulation over 2 micro-batches per rank; one spawn of 4 ranks does tp=2 x dp=2 with sequence
parallelism. The single-process reference is plain torch (tests/data_parallel_training.py).
"""
import pytest
import torch

from data_parallel_training import BUCKET_SIZE, MODEL, SEED, Layout, parallel_run, reference_run
from data_parallel_training import one_intra_op_thread  # noqa: F401 - a fixture, used below
from agreement import scaled_difference  # tests/ is on sys.path under pytest
from distributed import run_distributed
from megatron_llama.model.llama import build_model
from megatron_llama.parallel.data_parallel import DataParallelBuffers

STEPS = 3
# Agreement measured in fp32; each bound stands 3-10x above. dp=2: losses bitwise equal, so a bound of a few ulps
# (one ulp is about 1e-7 of a loss near 4.6); grad norms 3.8e-7 relative. tp=2 x dp=2 (tensor parallelism splits
# the matmul sums): losses 1.2e-7, grad norms 6.6e-7. Accumulated main grads against one backward of the whole
# batch: 2.4e-7 of each reference gradient's largest value.
DP2_LOSS_RTOL = 3e-7
DP2_NORM_RTOL = 2e-6
TP2_DP2_LOSS_RTOL = 1e-6
TP2_DP2_NORM_RTOL = 3e-6
ACCUMULATION_TOL = 1e-6
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
DP2_LAYOUTS = {
    "all-reduce": Layout(),
    "all-reduce, overlap": Layout(overlap_grad_reduce=True),
    "distributed optimizer": Layout(distributed_optimizer=True),
    "distributed optimizer, overlap grads and params": Layout(distributed_optimizer=True, overlap_grad_reduce=True,
                                                              overlap_param_gather=True),
}
TP2_DP2_LAYOUTS = {
    "tp2 sp, all-reduce, overlap": Layout(tensor_parallel=2, sequence_parallel=True, overlap_grad_reduce=True),
    "tp2 sp, distributed optimizer, overlap": Layout(tensor_parallel=2, sequence_parallel=True,
                                                     distributed_optimizer=True, overlap_grad_reduce=True,
                                                     overlap_param_gather=True),
}


def run_layouts(layouts: dict[str, Layout]) -> dict[str, dict]:
    return {name: parallel_run(layout, STEPS) for name, layout in layouts.items()}


@pytest.fixture(scope="module")
def reference():
    return reference_run(STEPS)


@pytest.fixture(scope="module")
def dp2():
    return run_distributed(run_layouts, world_size=2, args=(DP2_LAYOUTS,))


@pytest.fixture(scope="module")
def tp2_dp2():
    return run_distributed(run_layouts, world_size=4, args=(TP2_DP2_LAYOUTS,))


def relative_differences(values, reference_values) -> list[float]:
    return [abs(value - ref) / abs(ref) for value, ref in zip(values, reference_values, strict=True)]


@pytest.mark.parametrize("name", DP2_LAYOUTS)
def test_dp2_losses_and_grad_norms_equal_single_process(dp2, reference, name):
    for rank_record in dp2:
        assert max(relative_differences(rank_record[name]["losses"], reference["losses"])) <= DP2_LOSS_RTOL, name
        assert max(relative_differences(rank_record[name]["norms"], reference["norms"])) <= DP2_NORM_RTOL, name
    assert reference["losses"][-1] < reference["losses"][0]  # the reference learns: losses that could differ


@pytest.mark.parametrize("name", TP2_DP2_LAYOUTS)
def test_tp2_dp2_losses_and_grad_norms_equal_single_process(tp2_dp2, reference, name):
    for rank_record in tp2_dp2:
        assert max(relative_differences(rank_record[name]["losses"], reference["losses"])) <= TP2_DP2_LOSS_RTOL, name
        assert max(relative_differences(rank_record[name]["norms"], reference["norms"])) <= TP2_DP2_NORM_RTOL, name


def test_model_spans_several_buckets(dp2):
    assert dp2[0]["all-reduce"]["buckets"] >= 4


@pytest.mark.parametrize("name", [name for name, layout in DP2_LAYOUTS.items() if layout.overlap_grad_reduce])
def test_overlap_starts_every_bucket_during_the_last_backward_only(dp2, name):
    buckets = list(range(dp2[0][name]["buckets"]))
    observed = dp2[0][name]["grad_reductions_in_flight"]  # after each micro-batch: 2 per step
    assert observed == [[], buckets] * STEPS


@pytest.mark.parametrize("name", [name for name, layout in DP2_LAYOUTS.items() if not layout.overlap_grad_reduce])
def test_without_overlap_nothing_is_reduced_before_finish_grad_sync(dp2, name):
    assert dp2[0][name]["grad_reductions_in_flight"] == [[], []] * STEPS


def test_overlapped_param_gathers_stay_in_flight_until_the_next_forward(dp2):
    record = dp2[0]["distributed optimizer, overlap grads and params"]
    assert record["param_gathers_in_flight"] == [list(range(record["buckets"]))] * STEPS
    assert dp2[0]["distributed optimizer"]["param_gathers_in_flight"] == [[]] * STEPS


def test_main_grads_are_views_into_one_buffer_in_backward_order():
    model = build_model(MODEL, seed=SEED)
    buffers = DataParallelBuffers(model, bucket_size=BUCKET_SIZE)
    names = [name for name, _ in model.named_parameters()]
    laid_out = [name for bucket in buffers.buckets for name in bucket.names]
    assert laid_out == names[::-1]
    for name, param in model.named_parameters():
        assert param.main_grad.untyped_storage().data_ptr() == buffers.grad_buffer.untyped_storage().data_ptr()
    sizes = [bucket.numel for bucket in buffers.buckets]
    assert all(size >= BUCKET_SIZE for size in sizes[:-1]) and sum(sizes) == buffers.grad_buffer.numel()


def test_accumulation_adds_micro_batch_gradients_and_frees_param_grad():
    model = build_model(MODEL, seed=SEED)
    buffers = DataParallelBuffers(model, bucket_size=BUCKET_SIZE)
    tokens = torch.randint(0, MODEL.vocab_size, (4, 9), generator=torch.Generator().manual_seed(0))
    expected = build_model(MODEL, seed=SEED)
    expected(tokens[:, :-1], tokens[:, 1:]).sum().backward()
    buffers.zero_grad()
    with buffers.no_sync():
        model(tokens[:2, :-1], tokens[:2, 1:]).sum().backward()
    model(tokens[2:, :-1], tokens[2:, 1:]).sum().backward()
    buffers.finish_grad_sync()
    for (name, param), reference in zip(model.named_parameters(), expected.parameters()):
        assert param.grad is None, name
        difference = scaled_difference(param.main_grad, reference.grad)
        assert difference <= ACCUMULATION_TOL, f"{name}: main grad differs by {difference:.2e} of its scale"


def test_a_gradient_after_its_bucket_started_asks_for_no_sync():
    model = build_model(MODEL, seed=SEED)
    buffers = DataParallelBuffers(model, bucket_size=BUCKET_SIZE, overlap_grad_reduce=True)
    tokens = torch.randint(0, MODEL.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    model(tokens[:, :-1], tokens[:, 1:]).sum().backward()
    with pytest.raises(RuntimeError, match="no_sync"):
        model(tokens[:, :-1], tokens[:, 1:]).sum().backward()


def test_bad_settings_name_the_flag():
    model = build_model(MODEL, seed=SEED)
    with pytest.raises(ValueError, match="--ddp-bucket-size"):
        DataParallelBuffers(model, bucket_size=0)
    with pytest.raises(ValueError, match="--use-distributed-optimizer"):
        DataParallelBuffers(model, overlap_param_gather=True)


def test_a_backward_after_finish_grad_sync_asks_for_zero_grad():
    model = build_model(MODEL, seed=SEED)
    buffers = DataParallelBuffers(model, bucket_size=BUCKET_SIZE)
    tokens = torch.randint(0, MODEL.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    model(tokens[:, :-1], tokens[:, 1:]).sum().backward()
    buffers.finish_grad_sync()
    with pytest.raises(RuntimeError, match="zero_grad"):
        model(tokens[:, :-1], tokens[:, 1:]).sum().backward()
