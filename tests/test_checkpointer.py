"""The Checkpointer on its own, in one process: its save policy, a resume of nothing, a save it resumes from (every
random stream included), and a non-finite state it refuses to publish."""
import dataclasses
import random

import numpy
import pytest
import torch

from megatron_llama.checkpoint import CheckpointError, Checkpointer, find_resume_checkpoint, read_tracker
from megatron_llama.config import CheckpointConfig, ModelConfig, RunConfig
from megatron_llama.model.llama import build_model
from megatron_llama.optim.builder import build_optimizer
from megatron_llama.optim.lr_schedule import LearningRateSchedule
from megatron_llama.parallel.data_parallel import DataParallelBuffers
from megatron_llama.parallel.state import ParallelLayout

MODEL = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    vocab_size=100, make_vocab_size_divisible_by=64)


def checkpointer_for(checkpoint: CheckpointConfig, seed: int, log=print) -> Checkpointer:
    """A Checkpointer over a freshly built model (weights drawn from `seed`) and its optimizer."""
    model = build_model(MODEL, seed=seed)
    optimizer, _ = build_optimizer(model, DataParallelBuffers(model), ParallelLayout.single_process(), lr=1e-3,
                                   betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, clip_grad=0.0)
    config = RunConfig(model=MODEL, checkpoint=checkpoint)
    return Checkpointer(config, ParallelLayout.single_process(), model, optimizer,
                        LearningRateSchedule(max_lr=1e-3, min_lr=0.0, warmup_iters=0, decay_iters=10), log)


def test_is_due_follows_the_save_interval_and_is_never_due_without_save(tmp_path):
    every_three = checkpointer_for(CheckpointConfig(save=str(tmp_path), save_interval=3), seed=1)
    assert every_three.enabled
    assert [iteration for iteration in range(1, 10) if every_three.is_due(iteration)] == [3, 6, 9]
    without_interval = checkpointer_for(CheckpointConfig(save=str(tmp_path)), seed=1)
    assert without_interval.enabled and not any(without_interval.is_due(iteration) for iteration in range(1, 10))
    without_save = checkpointer_for(CheckpointConfig(save_interval=3), seed=1)
    assert not without_save.enabled and not without_save.is_due(3)


def test_resuming_from_nothing_starts_at_iteration_zero(tmp_path):
    assert checkpointer_for(CheckpointConfig(save=str(tmp_path)), seed=1).resume(None) == (0, 0)


def test_a_saved_iteration_resumes_with_its_sample_count_and_weights(tmp_path):
    lines = []
    saving = checkpointer_for(CheckpointConfig(save=str(tmp_path)), seed=1, log=lines.append)
    saving.save(4, 32)
    saving.close()
    assert read_tracker(str(tmp_path)) == 4 and lines[-1].startswith("saved checkpoint of iteration 4")
    resume = CheckpointConfig(save=str(tmp_path), load=str(tmp_path))
    resume_from = find_resume_checkpoint(RunConfig(model=MODEL, checkpoint=resume), [])
    resuming = checkpointer_for(resume, seed=2, log=lines.append)
    assert resuming.resume(resume_from) == (4, 32)
    assert lines[-1].startswith(f"resumed from {resume_from}: iteration 4, 32 samples consumed")
    saved, resumed = saving.model.state_dict(), resuming.model.state_dict()
    assert all(torch.equal(saved[name], resumed[name]) for name in saved)


def test_an_async_save_is_published_by_close(tmp_path):
    checkpoint = CheckpointConfig(save=str(tmp_path), async_save=True)
    lines = []
    checkpointer = checkpointer_for(checkpoint, seed=1, log=lines.append)
    checkpointer.save(2, 16)
    assert "in the background" in lines[-1]
    checkpointer.close()
    assert read_tracker(str(tmp_path)) == 2
    resume = dataclasses.replace(checkpoint, load=str(tmp_path))
    resume_from = find_resume_checkpoint(RunConfig(model=MODEL, checkpoint=resume), [])
    assert checkpointer_for(resume, seed=2).resume(resume_from) == (2, 16)


def next_draws() -> tuple:
    """The next values of every random stream a rank draws from (CUDA's too where present)."""
    draws = (torch.rand(5).tolist(), numpy.random.rand(5).tolist(), numpy.random.randn(1).tolist(),
             [random.random() for _ in range(5)], random.gauss(0.0, 1.0))
    if torch.cuda.is_available():
        draws += (torch.rand(5, device="cuda").tolist(),)
    return draws


def test_resume_restores_every_random_stream_to_where_the_save_left_it(tmp_path):
    torch.manual_seed(11), numpy.random.seed(12), random.seed(13)
    numpy.random.randn(3), random.gauss(0.0, 1.0)  # leave a cached Gaussian in both, part of their state
    saving = checkpointer_for(CheckpointConfig(save=str(tmp_path)), seed=1)
    saving.save(3, 24)
    saving.close()
    uninterrupted = next_draws()
    torch.manual_seed(99), numpy.random.seed(98), random.seed(97)  # a new process starts from other states
    resume = CheckpointConfig(save=str(tmp_path), load=str(tmp_path))
    resuming = checkpointer_for(resume, seed=2)
    assert resuming.resume(find_resume_checkpoint(RunConfig(model=MODEL, checkpoint=resume), [])) == (3, 24)
    resuming.close()
    assert next_draws() == uninterrupted


def test_a_non_finite_optimizer_state_is_never_published(tmp_path):
    checkpointer = checkpointer_for(CheckpointConfig(save=str(tmp_path)), seed=1)
    checkpointer.save(1, 8)
    master = checkpointer.optimizer.master_params["layers.0.mlp.up.weight"]
    second_moment = torch.zeros_like(master)
    second_moment.view(-1)[0] = float("inf")  # the weights stay finite; Adam's state does not
    checkpointer.optimizer.optimizer.state[master] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(master),
                                                      "exp_avg_sq": second_moment}
    with pytest.raises(CheckpointError) as error:
        checkpointer.save(2, 16)
    assert "could not write the files of iteration 2" in str(error.value)
    assert "optim_dp_000.pt" in str(error.value) and "holds 1 NaN/Inf values" in str(error.value)
    assert "the previous checkpoint stays the latest" in str(error.value)
    assert read_tracker(str(tmp_path)) == 1
