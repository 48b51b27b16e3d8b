"""The distributed optimizer: 1/dp of the optimizer state per rank, and checkpoints that move between dp sizes.

A run at dp=2 (2 gloo ranks) takes four Adam steps and records its model and optimizer shards after
step two; runs at dp=1 (this process) and dp=4 (4 ranks) load those shards (resharded) and take steps
three and four. Step four's loss depends on the Adam states restored, so equal losses show the states
moved intact; a control resumed without them differs.
"""
import dataclasses

import pytest
import torch

from data_parallel_training import MODEL, SEED, Layout, parallel_run
from data_parallel_training import one_intra_op_thread  # noqa: F401 - a fixture, used below
from distributed import run_distributed  # tests/ is on sys.path under pytest
from megatron_llama.model.llama import build_model
from megatron_llama.model.stage_model import build_model_chunks
from megatron_llama.optim.builder import build_optimizer
from megatron_llama.optim.clip import counts_in_grad_norm
from megatron_llama.optim.distributed_optimizer import reshard_optimizer_state
from megatron_llama.parallel import state
from megatron_llama.parallel.data_parallel import DataParallelBuffers
from megatron_llama.parallel.grad_finalize import finalize_model_grads
from megatron_llama.parallel.stages import split_layers
from megatron_llama.parallel.state import ParallelLayout

STEPS, SAVED_AFTER = 4, 2
RESUMED_LOSS_RTOL = 3e-7  # measured 6.6e-8 (dp1) and 6.1e-8 (dp4): about one ulp of the loss
LAYOUT = Layout(distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True)
BYTES_PER_ELEMENT = 12  # fp32 master, exp_avg, exp_avg_sq
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def resume(checkpoint: tuple[dict, list[dict]], layout: Layout = LAYOUT) -> dict:
    return parallel_run(layout, STEPS, first_step=SAVED_AFTER, resume=checkpoint)


@pytest.fixture(scope="module")
def dp2():
    return run_distributed(parallel_run, world_size=2, args=(LAYOUT, STEPS), kwargs={"save_after": SAVED_AFTER})


@pytest.fixture(scope="module")
def checkpoint(dp2):
    """(full model state, optimizer shards of both dp ranks), as a checkpoint directory would hold them."""
    return dp2[0]["saved"][0], [record["saved"][1] for record in dp2]


@pytest.fixture(scope="module")
def dp1(checkpoint):
    return [resume(checkpoint)]


@pytest.fixture(scope="module")
def dp4(checkpoint):
    return run_distributed(resume, world_size=4, args=(checkpoint,))


def relative_difference(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference)


@pytest.mark.parametrize("resumed_at", ["dp1", "dp4"])
def test_state_saved_at_dp2_resumes_with_the_uninterrupted_losses(request, dp2, resumed_at):
    uninterrupted = dp2[0]["losses"][SAVED_AFTER:]
    for rank_record in request.getfixturevalue(resumed_at):
        assert len(rank_record["losses"]) == STEPS - SAVED_AFTER
        for loss, reference in zip(rank_record["losses"], uninterrupted):
            assert relative_difference(loss, reference) <= RESUMED_LOSS_RTOL, (resumed_at, rank_record["losses"],
                                                                               uninterrupted)


def test_resuming_without_the_adam_states_would_change_the_losses(dp2, checkpoint):
    model_state, shards = checkpoint
    masters_only = [dict(shard, tensors={"master": shard["tensors"]["master"]}, scalar_states={}) for shard in shards]
    control = resume((model_state, masters_only))
    assert relative_difference(control["losses"][-1], dp2[0]["losses"][-1]) > 1e-4


def test_optimizer_state_bytes_per_rank_fall_by_the_data_parallel_size(dp1, dp2, dp4):
    single = dp1[0]["optimizer_state_bytes"]
    assert single == BYTES_PER_ELEMENT * sum(param.numel() for param in build_model(MODEL, seed=SEED).parameters())
    buckets = dp1[0]["buckets"]
    for records in (dp2, dp4):
        per_rank = [record["optimizer_state_bytes"] for record in records]
        assert sum(per_rank) == single
        # each bucket's shard is ceil(bucket / dp) elements: at most one element per bucket above single / dp
        assert max(per_rank) <= single / len(records) + BYTES_PER_ELEMENT * buckets, per_rank


def test_resharding_without_every_shard_names_the_missing_ranks(checkpoint):
    model_state, shards = checkpoint
    every_element = [(name, 0, value.numel()) for name, value in model_state.items()]
    with pytest.raises(ValueError, match=r"data-parallel ranks \[0\] of 2.*every data-parallel rank"):
        reshard_optimizer_state(shards[:1], every_element)
    with pytest.raises(ValueError, match="--use-distributed-optimizer"):
        reshard_optimizer_state([{"optimizer": {}, "master_params": {}}], every_element)


def test_bf16_model_gets_its_update_rounded_from_fp32_masters():
    model = build_model(MODEL, seed=SEED, dtype=torch.bfloat16)
    buffers = DataParallelBuffers(model, bucket_size=3000, use_distributed_optimizer=True)
    optimizer, description = build_optimizer(model, buffers, state.current_layout(),
                                             lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                             clip_grad=1.0)
    assert "distributed optimizer" in description
    tokens = torch.randint(0, MODEL.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    optimizer.zero_grad()
    model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
    finalize_model_grads(model, buffers, state.current_layout())
    assert not optimizer.step(1e-2).skipped
    params = dict(model.named_parameters())
    masters_differ = False
    for piece, master in zip(optimizer.pieces, optimizer.master_pieces):
        assert master.dtype == torch.float32
        param = params[piece.name].detach().reshape(-1)[piece.param_start:piece.param_end]
        assert torch.equal(param, master.to(torch.bfloat16)), piece.name
        masters_differ |= not torch.equal(param.float(), master)
    assert masters_differ  # the masters keep what bf16 rounds away


def test_grad_norm_counts_replicated_and_tied_parameters_once():
    tied = dataclasses.replace(MODEL, untie_embeddings_and_output_weights=False)
    split = split_layers(tied.num_layers, 2)
    layouts = [ParallelLayout.for_rank(rank, 2, pipeline_size=2) for rank in (0, 1)]  # each stage's, no groups
    (first_stage,), (last_stage,) = (build_model_chunks(tied, SEED, split, layout) for layout in layouts)
    assert counts_in_grad_norm(first_stage.embedding.weight, 0)
    assert not counts_in_grad_norm(last_stage.embedding.weight, 0)  # the tied head's copy of the same weight
    norm = last_stage.final_norm.weight  # replicated on every tensor rank
    assert counts_in_grad_norm(norm, 0) and not counts_in_grad_norm(norm, 1)
    assert counts_in_grad_norm(last_stage.layers["1"].mlp.up.weight, 1)  # split across tensor ranks


def test_step_before_the_gradients_are_reduced_asks_for_finalize_model_grads():
    model = build_model(MODEL, seed=SEED)
    buffers = DataParallelBuffers(model, bucket_size=3000, use_distributed_optimizer=True)
    optimizer, _ = build_optimizer(model, buffers, state.current_layout(),
                                   lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                   clip_grad=1.0)
    optimizer.zero_grad()
    with pytest.raises(RuntimeError, match="finalize_model_grads"):
        optimizer.step(1e-2)


def test_shards_survive_torch_save_and_a_weights_only_mmap_load(checkpoint, tmp_path):
    model_state, shards = checkpoint
    for rank, shard in enumerate(shards):
        torch.save(shard, tmp_path / f"optim_dp_{rank:03d}.pt")
    loaded = [torch.load(tmp_path / f"optim_dp_{rank:03d}.pt", mmap=True, weights_only=True) for rank in range(2)]
    every_element = [(name, 0, value.numel()) for name, value in model_state.items()]
    from_files = reshard_optimizer_state(loaded, every_element)
    from_memory = reshard_optimizer_state(shards, every_element)
    assert from_files["tensors"].keys() == {"master", "exp_avg", "exp_avg_sq"}
    for key, values in from_memory["tensors"].items():
        assert torch.equal(from_files["tensors"][key], values), key
