"""The training loop: micro-batches -> forward/backward -> optimizer step -> log -> eval -> save.

One iteration is one optimizer update over a global batch of G sequences, made of
G / (micro_batch_size x dp) micro-batches whose gradients accumulate in fp32 main grads. The
loss is the mean over every token of the global batch: each micro-batch contributes
sum(per-token loss) / (G x seq_length), so accumulation gives the gradient of one big batch.
With SFT (--sft) labels outside the responses are -100 and contribute nothing; the divisor is then the
count of the other labels over the global batch (loss_token_count), so the loss is the mean over
response tokens: sum(loss x mask) / sum(mask). With DPO (--dpo) a sample is a preference pair and the loss is
dpo.DPOObjective's: the mean DPO loss over the global batch's pairs, against a frozen reference run in the same step.

Stops: after --train-iters; at --exit-interval or on SIGTERM with --exit-signal-handler (both save
first when --save is set); on a NaN/Inf loss or gradient norm, with TrainingDiverged naming the
iteration and nothing saved, so the last checkpoint stays as it was. (With fp16, an overflowing
step is skipped and the loss scale halved instead; only an overflow at the minimum loss scale
stops the run.)

Nothing non-finite is published: the loss and gradient norm are read on the host every step anyway (one sync)
and checked there; the updated parameters are checked before each save (check_parameters_finite: one finiteness
flag per tensor, one host sync, one all-reduce over every rank), not every step, because that reads every
weight once more. A parameter that became NaN/Inf in a step that is not saved makes the next step's loss
non-finite, which stops the run; the one moment it could slip through is a save, and that is where it is checked.

Parallel layouts (pretrain.py builds the process groups before the model). Each data-parallel rank
takes its own micro-batches of the global batch (data_loader.PretrainingSampler); the tensor and pipeline
ranks of one data-parallel rank read identical micro-batches. `model` is this rank's StageModel (its
pipeline chunks; model/stage_model.py) or a plain LlamaModel. One step:

    forward_backward     the micro-batches through parallel/pipeline.run_schedule (plain gradient
                         accumulation at pp=1, 1F1B or interleaved 1F1B otherwise); the data-parallel sync
                         of the DataParallelBuffers is off until the last backward, whose complete buckets
                         start reducing at once under --overlap-grad-reduce
    finalize_model_grads (parallel/grad_finalize.py) finish the data-parallel reduction (all-reduce, or
                         reduce-scatter for the distributed optimizer), sum sequence-parallel partial grads over
                         tensor ranks, sum the tied embedding's two copies over the first and last stage
    reduce_loss_across_ranks   the last stage's loss copied to every stage, then summed over data-parallel
                         ranks: the global-batch mean loss, equal on every rank (any rank may log it)
    optimizer.step       norm over the model-parallel group (every rank with the distributed optimizer; the
                         tied copy skipped), clip, AdamW (on this rank's shard, then all-gather)

Every rank's contribution is already divided by the GLOBAL token count, so the data-parallel
reductions are sums, not averages. A loop stop (SIGTERM) is agreed by all ranks before it is acted on.

Logging (every --log-interval iterations, metrics.py lists the fields): the interval's mean loss and throughput; each
rank's own forward-backward time per iteration reduced to its minimum and maximum over all ranks (one small
all-reduce at log time; profiling.ComputeTimer), so a slow GPU shows; with a blend, the samples each dataset gave in
the interval (from the blend's order: no communication); with --log-memory-to-tensorboard, memory statistics.
--profile traces the iterations it names (profiling.StepProfiler).

Entry point: python -m megatron_llama.pretrain (pretrain.py builds the pieces and calls `train`).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from megatron_llama.data_loader import PretrainingSampler, micro_batches
from megatron_llama.dpo import DPOObjective
from megatron_llama.metrics import (MetricsLogger, memory_statistics, model_flops_utilization, peak_memory_gib,
                                    perplexity)
from megatron_llama.model.stage_model import llama_forward_step, model_chunks, schedule_shapes
from megatron_llama.optim.base import StepOutcome, TrainingOptimizer
from megatron_llama.optim.grad_scaler import DynamicLossScaler
from megatron_llama.optim.lr_schedule import LearningRateSchedule
from megatron_llama.parallel import comm, state as parallel_state
from megatron_llama.parallel.cross_entropy import IGNORE_INDEX
from megatron_llama.parallel.data_parallel import DataParallelBuffers
from megatron_llama.parallel.grad_finalize import finalize_model_grads
from megatron_llama.parallel.pipeline import broadcast_from_last_stage, run_schedule
from megatron_llama.profiling import ComputeTimer, StepProfiler


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/Inf; the message names the iteration."""


@dataclass
class TrainingProgress:
    iteration: int = 0  # optimizer updates done
    consumed_train_samples: int = 0
    skipped_iterations: int = 0  # fp16 overflow steps (counted, never silent)


@dataclass
class TrainingSetup:
    """Everything the loop needs besides the model, optimizer and data (filled from the arguments)."""

    train_iters: int
    global_batch_size: int
    micro_batch_size: int
    num_micro_batches: int
    seq_length: int
    flops_per_token: int
    device: torch.device
    buffers: DataParallelBuffers  # the fp32 main grads and their bucketed data-parallel sync
    log_interval: int  # the intervals: the run's LoggingConfig and CheckpointConfig, which hold their defaults
    eval_interval: int | None
    eval_iters: int
    save_interval: int | None
    exit_interval: int | None
    world_size: int = 1
    data_parallel_rank: int = 0
    data_parallel_size: int = 1
    save: Callable[[TrainingProgress], None] | None = None  # writes a checkpoint at this progress
    stop_requested: Callable[[], bool] | None = None  # e.g. a SIGTERM was received (agreed across ranks)
    count_loss_tokens: bool = False  # SFT: divide by the labels that are not IGNORE_INDEX, not by G x seq_length
    profiler: StepProfiler | None = None  # --profile: traces the iterations it names
    log_memory: bool = False  # --log-memory-to-tensorboard: memory statistics in every training record
    dpo: DPOObjective | None = None  # DPO: its loss over preference pairs instead of the per-token mean


def as_micro_batch(batch) -> dict:
    """A (tokens, labels) pair from the data loader -> the dict the pipeline schedule draws ("tokens", "labels")."""
    if isinstance(batch, dict):
        return batch
    tokens, labels = batch
    return {"tokens": tokens, "labels": labels}


def forward_backward(model: nn.Module, optimizer, batches: Iterable, tokens_in_global_batch: int,
                     buffers: DataParallelBuffers, loss_fn: Callable | None = None) -> torch.Tensor:
    """Accumulate the gradient of the global-batch mean loss over `batches` through the pipeline schedule
    (gradient accumulation alone at pp=1); returns this rank's share of the loss (0 off the last stage).
    The data-parallel gradient sync of `buffers` is off until the last backward (overlap starts there).
    `loss_fn(per_token_loss, micro_batch)` replaces the per-token mean (e.g. DPOObjective.loss_fn)."""
    chunks = model_chunks(model)
    batches = [as_micro_batch(batch) for batch in batches]
    buffers.disable_grad_sync()
    losses = run_schedule(chunks, batches, loss_fn or (lambda per_token_loss, _: per_token_loss.sum()
                                                       / tokens_in_global_batch),
                          forward_step=llama_forward_step, **schedule_shapes(chunks, batches),
                          scale_loss=optimizer.scale_loss, before_last_backward=buffers.enable_grad_sync)
    buffers.enable_grad_sync()
    if losses:
        return torch.stack(losses).sum()
    return torch.zeros((), dtype=torch.float32, device=next(chunks[0].parameters()).device)


def loss_token_count(batches: Iterable, device: torch.device) -> int:
    """Labels that are not IGNORE_INDEX in the global batch: this rank's micro-batches, summed over data-parallel
    ranks (every tensor and pipeline rank holds the labels, so each computes the same count)."""
    count = torch.zeros(1, dtype=torch.int64, device=device)
    for batch in batches:
        count += (as_micro_batch(batch)["labels"] != IGNORE_INDEX).sum().to(device)  # summed on the device: one sync
    comm.all_reduce(count, parallel_state.get_data_parallel_group())
    return int(count.item())


def reduce_loss_across_ranks(loss: torch.Tensor) -> torch.Tensor:
    """The last stage's loss copied to every stage, then the data-parallel shares summed (in place; returned)."""
    broadcast_from_last_stage(loss)
    return comm.all_reduce(loss, parallel_state.get_data_parallel_group())


def train_step(model: nn.Module, optimizer: TrainingOptimizer, batches: Iterable, lr: float,
               tokens_in_global_batch: int, buffers: DataParallelBuffers,
               compute_timer: ComputeTimer | None = None, loss_fn: Callable | None = None) -> tuple[float, StepOutcome]:
    """One optimizer update: zero grads, accumulate over the micro-batches, finalize grads, step.
    Returns (global-batch mean loss, outcome), equal on every rank. `compute_timer` measures the forward and
    backward (not the wait for the other ranks' gradients that follows); `loss_fn`: forward_backward's."""
    optimizer.zero_grad()
    with compute_timer.measure() if compute_timer is not None else contextlib.nullcontext():
        loss = forward_backward(model, optimizer, batches, tokens_in_global_batch, buffers, loss_fn)
    finalize_model_grads(model, buffers)
    loss = reduce_loss_across_ranks(loss)
    outcome = optimizer.step(lr)
    return float(loss), outcome


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable) -> float:
    """Mean per-token loss over `batches` (each data-parallel rank's own), taken over all data-parallel ranks."""
    chunks = model_chunks(model)
    batches = [as_micro_batch(batch) for batch in batches]
    was_training = model.training
    model.eval()
    losses = run_schedule(chunks, batches, lambda per_token_loss, _: per_token_loss.double().sum(),
                          forward_step=llama_forward_step, **schedule_shapes(chunks, batches), forward_only=True)
    model.train(was_training)
    device = next(chunks[0].parameters()).device
    loss_sum = torch.stack(losses).sum() if losses else torch.zeros((), dtype=torch.float64, device=device)
    token_count = sum(int((batch["labels"] != IGNORE_INDEX).sum()) for batch in batches)
    totals = torch.stack([loss_sum, torch.tensor(float(token_count), dtype=torch.float64, device=device)])
    broadcast_from_last_stage(totals[:1])
    comm.all_reduce(totals, parallel_state.get_data_parallel_group())
    return float(totals[0] / totals[1])


def stop_agreed(requested: bool, device: torch.device) -> bool:
    """True on every rank when any rank asks to stop (a signal reaches each process at its own moment)."""
    return comm.any_rank_true(requested, dist.group.WORLD if dist.is_initialized() else None, device)


def eval_batches(dataset, setup: TrainingSetup) -> Iterator[dict[str, torch.Tensor]]:
    """The same --eval-iters global batches from the start of `dataset` at every evaluation (comparable curves)."""
    count = setup.eval_iters * setup.global_batch_size
    if len(dataset) < count:
        raise ValueError(f"the evaluation set holds {len(dataset)} samples, fewer than --eval-iters "
                         f"{setup.eval_iters} x global batch {setup.global_batch_size} = {count}")
    sampler = PretrainingSampler(count, 0, setup.micro_batch_size, setup.data_parallel_rank, setup.data_parallel_size)
    return micro_batches(dataset, sampler, setup.device)


def _diverged(loss: float, outcome: StepOutcome, optimizer: TrainingOptimizer) -> bool:
    finite = math.isfinite(loss) and math.isfinite(outcome.grad_norm)
    scaler = optimizer.loss_scaler
    if finite or scaler is None:
        return not finite
    # fp16: an overflow is skipped and the scale lowered; only one at the floor of a dynamic scaler is fatal.
    return isinstance(scaler, DynamicLossScaler) and scaler.scale <= scaler.min_scale and scaler.hysteresis_left <= 0


def _stopped_without_saving(last_saved: int | None) -> str:
    kept = (f"the last checkpoint is intact (iteration {last_saved})" if last_saved is not None
            else "no checkpoint of this run was published")
    return f"training stopped without saving, {kept} (lower --lr, raise --lr-warmup-iters or check the data)"


_NAME_CHARACTERS = 200  # room for any parameter name


@torch.no_grad()
def check_parameters_finite(model: nn.Module, iteration: int, device: torch.device, last_saved: int | None):
    """TrainingDiverged on every rank, naming a NaN/Inf parameter, when any rank's updated parameters hold one.
    The first rank holding one sends the name (as character codes in an all-reduced tensor: every rank needs it,
    only the logging rank prints)."""
    named = list(model.named_parameters())
    finite = torch.stack([torch.isfinite(param).all() for _, param in named]).tolist() if named else []
    bad = [name for (name, _), ok in zip(named, finite) if not ok]
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.group.WORLD if dist.is_initialized() else None
    first = torch.tensor([rank if bad else comm.group_size(world)], dtype=torch.int64, device=device)
    comm.all_reduce(first, world, op=dist.ReduceOp.MIN)
    if int(first.item()) == comm.group_size(world):
        return
    name = torch.zeros(_NAME_CHARACTERS, dtype=torch.int64, device=device)
    if rank == int(first.item()):
        codes = [ord(character) for character in bad[0][:_NAME_CHARACTERS]]
        name[:len(codes)] = torch.tensor(codes, dtype=torch.int64)
    comm.all_reduce(name, world)
    shown = "".join(chr(code) for code in name.tolist() if code)
    raise TrainingDiverged(f"iteration {iteration}: parameter {shown} (rank {int(first.item())}) holds NaN/Inf after "
                           f"the update, though the loss and gradient norm were finite; "
                           f"{_stopped_without_saving(last_saved)}")


def _save_if_finite(model: nn.Module, setup: TrainingSetup, progress: TrainingProgress, last_saved: int | None):
    setup.buffers.finish_param_sync()  # the distributed optimizer's updated parameters may still be gathering
    check_parameters_finite(model, progress.iteration, setup.device, last_saved)
    setup.save(progress)


class _IntervalMeter:
    """Loss, training wall time and this rank's compute time accumulated between two log lines (evaluation and
    saving excluded), from the sample `first_sample` of the training order on."""

    def __init__(self, first_sample: int, device: torch.device):
        self.compute_timer = ComputeTimer(device)
        self.reset(first_sample)

    def reset(self, first_sample: int):
        self.loss_sum, self.iterations, self.applied, self.started = 0.0, 0, 0, time.perf_counter()
        self.first_sample = first_sample

    def add(self, loss: float, skipped: bool):
        self.iterations += 1
        if not skipped:
            self.loss_sum += loss
            self.applied += 1

    def exclude(self, since: float):
        """Keep the time from `since` until now out of the training throughput."""
        self.started += time.perf_counter() - since


def train(model: nn.Module, optimizer: TrainingOptimizer, lr_schedule: LearningRateSchedule,
          progress: TrainingProgress,
          setup: TrainingSetup, train_dataset, logger: MetricsLogger, valid_dataset=None, test_dataset=None) -> str:
    """Run iterations progress.iteration + 1 .. setup.train_iters; returns why it stopped."""
    model.train()
    sampler = PretrainingSampler(len(train_dataset), progress.consumed_train_samples, setup.micro_batch_size,
                                 setup.data_parallel_rank, setup.data_parallel_size)
    batches = micro_batches(train_dataset, sampler, setup.device)
    tokens_in_global_batch = setup.global_batch_size * setup.seq_length
    meter = _IntervalMeter(progress.consumed_train_samples, setup.device)
    last_saved = progress.iteration if progress.iteration > 0 else None  # a resumed iteration is already on disk
    last_evaluated = None
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    reason = "finished"
    while progress.iteration < setup.train_iters:
        iteration = progress.iteration + 1
        step_batches = [next(batches) for _ in range(setup.num_micro_batches)]
        lr = lr_schedule.lr_at(iteration)
        if setup.count_loss_tokens:
            tokens_in_global_batch = loss_token_count(step_batches, setup.device)
        if setup.profiler is not None:
            setup.profiler.step_begins(iteration)
        if setup.dpo is not None:
            step_batches = setup.dpo.with_reference(step_batches)
        loss, outcome = train_step(model, optimizer, step_batches, lr, tokens_in_global_batch, setup.buffers,
                                   meter.compute_timer, setup.dpo.loss_fn if setup.dpo is not None else None)
        if _diverged(loss, outcome, optimizer):
            raise TrainingDiverged(f"iteration {iteration}: loss {loss} / gradient norm {outcome.grad_norm} is not "
                                   f"finite; {_stopped_without_saving(last_saved)}")
        progress.iteration = iteration
        progress.consumed_train_samples += setup.global_batch_size
        progress.skipped_iterations += int(outcome.skipped)
        meter.add(loss, outcome.skipped)
        if iteration % setup.log_interval == 0:
            _log_train(logger, progress, setup, meter, lr, outcome, optimizer, train_dataset,
                       setup.dpo.metrics(setup.device) if setup.dpo is not None else {})
            meter.reset(progress.consumed_train_samples)
        if _due(iteration, setup.eval_interval) and setup.eval_iters > 0 and valid_dataset is not None:
            since = time.perf_counter()
            _log_eval(logger, "valid", iteration, _evaluation(model, valid_dataset, setup))
            last_evaluated = iteration
            meter.exclude(since)
        if setup.save is not None and _due(iteration, setup.save_interval):
            since = time.perf_counter()
            _save_if_finite(model, setup, progress, last_saved)
            last_saved = iteration
            meter.exclude(since)
        if _due(iteration, setup.exit_interval):
            reason = f"--exit-interval {setup.exit_interval} reached"
            break
        if setup.stop_requested is not None and stop_agreed(setup.stop_requested(), setup.device):
            reason = "exit signal received"
            break
    if setup.profiler is not None:
        setup.profiler.finish()
    if reason == "finished" and setup.eval_iters > 0:
        for kind, dataset in (("valid", valid_dataset), ("test", test_dataset)):
            if dataset is not None and not (kind == "valid" and last_evaluated == progress.iteration):
                _log_eval(logger, kind, progress.iteration, _evaluation(model, dataset, setup))
    if setup.save is not None and last_saved != progress.iteration:
        _save_if_finite(model, setup, progress, last_saved)
    logger.print(f"training stopped at iteration {progress.iteration}: {reason}")
    return reason


def _due(iteration: int, interval: int | None) -> bool:
    return bool(interval) and iteration % interval == 0


def rank_step_time_range(seconds_per_iteration: float, device: torch.device) -> dict:
    """The least and the most of every rank's `seconds_per_iteration` (one all-reduce over all ranks; call on every
    rank)."""
    both = torch.tensor([seconds_per_iteration, -seconds_per_iteration], dtype=torch.float64, device=device)
    if dist.is_initialized():
        comm.all_reduce(both, dist.group.WORLD, op=dist.ReduceOp.MAX)
    return {"rank_step_time_min_s": -float(both[1]), "rank_step_time_max_s": float(both[0])}


def _log_train(logger: MetricsLogger, progress: TrainingProgress, setup: TrainingSetup, meter: _IntervalMeter, lr: float,
               outcome: StepOutcome, optimizer: TrainingOptimizer, train_dataset, extra: dict):
    """The interval's training record (with `extra` fields, e.g. DPO's rewards); every rank calls it (the step-time
    range is reduced over all ranks)."""
    elapsed = time.perf_counter() - meter.started
    iterations = max(meter.iterations, 1)
    step_time = elapsed / iterations
    tokens_per_s_per_gpu = setup.global_batch_size * setup.seq_length / step_time / setup.world_size
    record = {
        "kind": "train", "iteration": progress.iteration, "consumed_samples": progress.consumed_train_samples,
        "loss": meter.loss_sum / meter.applied if meter.applied else None, "lr": lr, "grad_norm": outcome.grad_norm,
        "loss_scale": optimizer.loss_scale, "skipped_iterations": progress.skipped_iterations,
        "step_time_s": step_time, "tokens_per_s_per_gpu": tokens_per_s_per_gpu,
        "mfu": model_flops_utilization(setup.flops_per_token, tokens_per_s_per_gpu),
        "peak_mem_gib": peak_memory_gib(setup.device),
        **rank_step_time_range(meter.compute_timer.take() / iterations, setup.device), **extra,
    }
    if hasattr(train_dataset, "samples_per_dataset"):  # a blend of several datasets
        record["samples_per_dataset"] = train_dataset.samples_per_dataset(meter.first_sample,
                                                                          progress.consumed_train_samples)
    if setup.log_memory:
        record.update(memory_statistics(setup.device))
    logger.log(record)


def _evaluation(model: nn.Module, dataset, setup: TrainingSetup) -> dict[str, float]:
    """The evaluation record's values on --eval-iters global batches of `dataset`: the loss and its perplexity, or
    with DPO the DPO loss and the reward metrics (dpo.DPOObjective.evaluate)."""
    batches = list(eval_batches(dataset, setup))
    if setup.dpo is not None:
        return setup.dpo.evaluate(model, batches, setup.device)
    loss = evaluate(model, batches)
    return {"loss": loss, "perplexity": perplexity(loss)}


def _log_eval(logger: MetricsLogger, kind: str, iteration: int, values: dict[str, float]):
    logger.log({"kind": kind, "iteration": iteration, **values})
