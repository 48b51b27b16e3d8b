"""A trainer's data-parallel step in miniature, shared by test_data_parallel.py and test_distributed_optimizer.py.

`reference_run` trains the tiny model in one process with plain torch (backward on the global batch,
clip_grad_norm_, AdamW): the numbers every layout must reproduce. `parallel_run` trains the same model
on the calling gloo rank with the trainer's assembly (assembly.build_run: DataParallelBuffers and the optimizer
that optim/builder.py picks for them, distributed or replicated) and finalize_model_grads, with gradient accumulation over
micro-batches (no_sync on all but the last), and records what the tests inspect (losses, norms,
collectives in flight, optimizer bytes, checkpoints).
"""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from megatron_llama.assembly import build_run
from megatron_llama.config import ModelConfig, ParallelConfig, RunConfig, TrainingConfig
from megatron_llama.model.llama import build_model
from megatron_llama.optim.optimizer import weight_decay_groups
from megatron_llama.parallel import comm, state
from megatron_llama.parallel.grad_finalize import finalize_model_grads
from megatron_llama.parallel.state import ParallelLayout

SEED = 1234
MODEL = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    vocab_size=100, make_vocab_size_divisible_by=16, max_position_embeddings=16,
                    attention_backend="eager")
GLOBAL_BATCH, MICRO_BATCH, SEQ = 8, 2, 8
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 1e-2, (0.9, 0.95), 1e-8, 0.1, 0.5
BUCKET_SIZE = 3000  # elements: the tiny model (about 18k parameters) spans several buckets


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """In-process tests run with one intra-op thread, as the gloo ranks do: with two threads on a shared
    2-core machine, tiny matmuls spend up to 100x longer waiting for each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def global_batches(steps: int) -> list[torch.Tensor]:
    """The same random global batch every step, so the loss falls visibly within three steps."""
    batch = torch.randint(0, MODEL.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(SEED))
    return [batch] * steps


def reference_run(steps: int) -> dict:
    """One process, plain torch: the global-batch mean loss and the gradient norm before clipping, per step."""
    model = build_model(MODEL, seed=SEED)
    optimizer = torch.optim.AdamW(weight_decay_groups(list(model.named_parameters()), WEIGHT_DECAY), lr=LR,
                                  betas=BETAS, eps=EPS)
    losses, norms = [], []
    for batch in global_batches(steps):
        optimizer.zero_grad()
        loss = model(batch[:, :-1], batch[:, 1:]).mean()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        losses.append(loss.item())
        optimizer.step()
    return {"losses": losses, "norms": norms}


@dataclasses.dataclass
class Layout:
    tensor_parallel: int = 1
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    sequence_parallel: bool = False
    fused_cross_entropy: bool = False


def parallel_run(layout: Layout, steps: int, **options) -> dict:
    """_run_on_this_rank inside the layout's process groups (in a gloo process), or as the single process."""
    if not torch.distributed.is_initialized():
        return _run_on_this_rank(layout, ParallelLayout.single_process(), steps, **options)
    with state.parallel_layout(layout.tensor_parallel, sequence_parallel=layout.sequence_parallel) as ranks:
        return _run_on_this_rank(layout, ranks, steps, **options)


def run_config(layout: Layout, ranks: ParallelLayout) -> RunConfig:
    """The trainer's configuration of `layout` with this file's model and optimizer settings."""
    return RunConfig(
        model=MODEL,
        parallel=ParallelConfig(tensor_model_parallel_size=ranks.tensor_size, data_parallel_size=ranks.data_size,
                                sequence_parallel=ranks.sequence_parallel, ddp_bucket_size=BUCKET_SIZE,
                                overlap_grad_reduce=layout.overlap_grad_reduce,
                                use_distributed_optimizer=layout.distributed_optimizer,
                                overlap_param_gather=layout.overlap_param_gather),
        training=TrainingConfig(micro_batch_size=MICRO_BATCH, global_batch_size=GLOBAL_BATCH, seq_length=SEQ, lr=LR,
                                adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_eps=EPS, weight_decay=WEIGHT_DECAY,
                                clip_grad=CLIP, seed=SEED, cross_entropy_loss_fusion=layout.fused_cross_entropy))


def _run_on_this_rank(layout: Layout, ranks: ParallelLayout, steps: int, *, first_step: int = 0,
                      save_after: int | None = None, resume: tuple[dict, list[dict]] | None = None) -> dict:
    """Steps first_step .. steps-1 of the global batches on this rank, the model, buffers and optimizer built by
    the trainer's assembly (assembly.build_run); `resume` = (full model state, optimizer shards of every saved
    data-parallel rank); `save_after` = step count at which to record both."""
    dp_group, dp, dp_rank = ranks.data_group, ranks.data_size, ranks.data_rank
    run = build_run(run_config(layout, ranks), ranks, torch.device("cpu"))
    model, buffers, optimizer = run.model, run.buffers, run.optimizer
    chunk = model.chunks[0]  # one pipeline stage: the whole model
    if resume is not None:
        model_state, saved_shards = resume
        model.load_state_dict(model_state)
        optimizer.load_state_dict(lambda data_rank: saved_shards[data_rank], len(saved_shards), model_state)
    record = {"losses": [], "norms": [], "grad_reductions_in_flight": [], "param_gathers_in_flight": [],
              "buckets": len(buffers.buckets)}
    for step, batch in enumerate(global_batches(steps)[first_step:], start=first_step):
        micro_batches = batch.chunk(dp)[dp_rank].split(MICRO_BATCH)  # this rank's sequences
        buffers.zero_grad()
        loss_sum = torch.zeros(())
        denominator = GLOBAL_BATCH * SEQ  # every rank divides by the global batch's tokens: the ranks' grads add up
        for index, micro in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with contextlib.nullcontext() if last else buffers.no_sync():
                per_token_loss = chunk(micro[:, :-1], micro[:, 1:])
                (per_token_loss.sum() / denominator).backward()
            record["grad_reductions_in_flight"].append(buffers.grad_reductions_in_flight())
            loss_sum += per_token_loss.detach().sum()
        finalize_model_grads(model, buffers, ranks)
        record["losses"].append(float(comm.all_reduce(loss_sum, dp_group)) / (GLOBAL_BATCH * SEQ))
        outcome = optimizer.step(LR)
        record["norms"].append(outcome.grad_norm)
        if layout.distributed_optimizer:
            record["param_gathers_in_flight"].append(buffers.param_gathers_in_flight())
        if save_after == step + 1:
            buffers.finish_param_sync()  # the model's parameters must be complete before they are saved
            record["saved"] = ({name: value.clone() for name, value in model.state_dict().items()},
                               optimizer.state_dict())
    if layout.distributed_optimizer:
        record["optimizer_state_bytes"] = optimizer.optimizer_state_bytes()
    return record
