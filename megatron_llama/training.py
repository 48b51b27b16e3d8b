"""The training loop: micro-batches -> forward/backward -> optimizer step -> log -> eval -> save.

One iteration is one optimizer update over a global batch of G samples, made of G / (micro_batch_size x dp)
micro-batches whose gradients accumulate in fp32 main grads. What the loss is belongs to the run's objective
(objectives/): it prepares the step's micro-batches, gives the schedule each micro-batch's share of the global-batch
loss (already divided by the global count, so accumulation gives the gradient of one big batch), adds its metrics to
the training record and evaluates. The loop knows no objective by name.

Stops: after --train-iters; at --exit-interval or on SIGTERM with --exit-signal-handler (both save
first when --save is set); on a NaN/Inf loss or gradient norm, or a finite divergence (loss or gradient
norm spikes against their running reference: divergence.DivergenceWatch), with TrainingDiverged naming the
iteration and nothing saved, so the last checkpoint stays as it was. (With fp16, an overflowing
step is skipped and the loss scale halved instead; only an overflow at the minimum loss scale
stops the run.)

Nothing non-finite is published: the loss and gradient norm are read on the host every step anyway (one sync)
and checked there; the updated parameters are checked before each save (check_parameters_finite: one finiteness
flag per tensor, one host sync, one all-reduce over every rank), not every step, because that reads every
weight once more. A parameter that became NaN/Inf in a step that is not saved makes the next step's loss
non-finite, which stops the run; the one moment it could slip through is a save, and that is where it is checked.
When to save, and how, is the checkpointer's (checkpoint/checkpointer.py): the loop asks it `is_due(iteration)`.

Parallel layouts (the entry point builds the process groups before the model). Each data-parallel rank
takes its own micro-batches of the global batch (data_loader.PretrainingSampler); the tensor and pipeline
ranks of one data-parallel rank read identical micro-batches. `run.model` is this rank's StageModel (its
pipeline chunks; model/stage_model.py). One step:

    forward_backward     the micro-batches through parallel/pipeline.run_schedule (plain gradient
                         accumulation at pp=1, 1F1B or interleaved 1F1B otherwise); the data-parallel sync
                         of the DataParallelBuffers is off until the last backward, whose complete buckets
                         start reducing at once under --overlap-grad-reduce
    finalize_model_grads (parallel/grad_finalize.py) finish the data-parallel reduction (all-reduce, or
                         reduce-scatter for the distributed optimizer), sum sequence-parallel partial grads over
                         tensor ranks, sum the tied embedding's two copies over the first and last stage
    reduce_loss_across_ranks   the last stage's loss copied to every stage, then summed over data-parallel
                         ranks: the global-batch loss, equal on every rank (any rank may log it)
    optimizer.step       norm over the model-parallel group (every rank with the distributed optimizer; the
                         tied copy skipped), clip, AdamW (on this rank's shard, then all-gather)

Every rank's contribution is already divided by the global count, so the data-parallel
reductions are sums, not averages. A loop stop (SIGTERM) is agreed by all ranks before it is acted on.

Logging (every --log-interval iterations, metrics.py lists the fields): the interval's mean loss and throughput; each
rank's own forward-backward time per iteration reduced to its minimum and maximum over all ranks (one small
all-reduce at log time; profiling.ComputeTimer), so a slow GPU shows; with a blend, the samples each dataset gave in
the interval (from the blend's order: no communication); with --log-memory-to-tensorboard, memory statistics.
--profile traces the iterations it names (profiling.StepProfiler).

    train(run, objective, config, layout, progress, datasets, logger, checkpointer=checkpointer)
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from megatron_llama.assembly import Run
from megatron_llama.config import RunConfig
from megatron_llama.data.datasets import Datasets
from megatron_llama.data_loader import PretrainingSampler, as_micro_batch, micro_batches
from megatron_llama.divergence import DivergenceWatch
from megatron_llama.metrics import MetricsLogger, memory_statistics, model_flops_utilization, peak_memory_gib
from megatron_llama.model.stage_model import llama_forward_step, model_chunks, schedule_shapes
from megatron_llama.objectives.base import Objective
from megatron_llama.optim.base import StepOutcome, TrainingOptimizer
from megatron_llama.optim.grad_scaler import DynamicLossScaler
from megatron_llama.parallel import comm, world
from megatron_llama.parallel.data_parallel import DataParallelBuffers
from megatron_llama.parallel.grad_finalize import finalize_model_grads
from megatron_llama.parallel.pipeline import broadcast_from_last_stage, run_schedule
from megatron_llama.parallel.state import ParallelLayout
from megatron_llama.profiling import ComputeTimer, StepProfiler


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/Inf or spiked (divergence.py); the message names the iteration."""


@dataclass
class TrainingProgress:
    iteration: int = 0  # optimizer updates done
    consumed_train_samples: int = 0
    skipped_iterations: int = 0  # fp16 overflow steps (counted, never silent)


def forward_backward(model: nn.Module, optimizer, batches: Iterable, buffers: DataParallelBuffers,
                     loss_fn: Callable[[torch.Tensor, dict], torch.Tensor], layout: ParallelLayout) -> torch.Tensor:
    """Accumulate the gradient of the loss `loss_fn(per_token_loss, micro_batch)` sums over `batches` through the
    pipeline schedule (gradient accumulation alone at pp=1); returns this rank's share of the loss (0 off the last
    stage). The data-parallel gradient sync of `buffers` is off until the last backward (overlap starts there)."""
    chunks = model_chunks(model)
    batches = [as_micro_batch(batch) for batch in batches]
    buffers.disable_grad_sync()
    losses = run_schedule(chunks, batches, loss_fn, layout=layout, forward_step=llama_forward_step,
                          **schedule_shapes(chunks, batches), scale_loss=optimizer.scale_loss,
                          before_last_backward=buffers.enable_grad_sync)
    buffers.enable_grad_sync()
    if losses:
        return torch.stack(losses).sum()
    return torch.zeros((), dtype=torch.float32, device=next(chunks[0].parameters()).device)


def reduce_loss_across_ranks(loss: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """The last stage's loss copied to every stage, then the data-parallel shares summed (in place; returned)."""
    broadcast_from_last_stage(loss, layout)
    return comm.all_reduce(loss, layout.data_group)


def train_step(model: nn.Module, optimizer: TrainingOptimizer, batches: Iterable, lr: float,
               buffers: DataParallelBuffers, loss_fn: Callable[[torch.Tensor, dict], torch.Tensor],
               layout: ParallelLayout, compute_timer: ComputeTimer | None = None) -> tuple[float, StepOutcome]:
    """One optimizer update: zero grads, accumulate over the micro-batches, finalize grads, step.
    Returns (global-batch loss, outcome), equal on every rank. `compute_timer` measures the forward and
    backward (not the wait for the other ranks' gradients that follows); `loss_fn`: forward_backward's."""
    optimizer.zero_grad()
    with compute_timer.measure() if compute_timer is not None else contextlib.nullcontext():
        loss = forward_backward(model, optimizer, batches, buffers, loss_fn, layout)
    finalize_model_grads(model, buffers, layout)
    loss = reduce_loss_across_ranks(loss, layout)
    outcome = optimizer.step(lr)
    return float(loss), outcome


def stop_agreed(requested: bool, device: torch.device) -> bool:
    """True on every rank when any rank asks to stop (a signal reaches each process at its own moment)."""
    return comm.any_rank_true(requested, world.world_group(), device)


def eval_batches(dataset, config: RunConfig, layout: ParallelLayout,
                 device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """The same --eval-iters global batches from the start of `dataset` at every evaluation (comparable curves)."""
    eval_iters, global_batch = config.logging.eval_iters, config.training.global_batch_size
    count = eval_iters * global_batch
    if len(dataset) < count:
        raise ValueError(f"the evaluation set holds {len(dataset)} samples, fewer than --eval-iters "
                         f"{eval_iters} x global batch {global_batch} = {count}")
    sampler = PretrainingSampler(count, 0, config.training.micro_batch_size, layout.data_rank, layout.data_size)
    return micro_batches(dataset, sampler, device)


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
    rank, group = world.world_rank(), world.world_group()
    size = comm.group_size(group)
    # the largest of (size - rank) over the ranks holding one is the first of them; 0 when none does
    first = torch.tensor([size - rank if bad else 0], dtype=torch.int64, device=device)
    comm.all_reduce_max(first, group)
    if int(first.item()) == 0:
        return
    first_rank = size - int(first.item())
    name = torch.zeros(_NAME_CHARACTERS, dtype=torch.int64, device=device)
    if rank == first_rank:
        codes = [ord(character) for character in bad[0][:_NAME_CHARACTERS]]
        name[:len(codes)] = torch.tensor(codes, dtype=torch.int64)
    comm.all_reduce(name, group)
    shown = "".join(chr(code) for code in name.tolist() if code)
    raise TrainingDiverged(f"iteration {iteration}: parameter {shown} (rank {first_rank}) holds NaN/Inf after "
                           f"the update, though the loss and gradient norm were finite; "
                           f"{_stopped_without_saving(last_saved)}")


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


def train(run: Run, objective: Objective, config: RunConfig, layout: ParallelLayout, progress: TrainingProgress,
          datasets: Datasets, logger: MetricsLogger, *, checkpointer=None,
          stop_requested: Callable[[], bool] | None = None, profiler: StepProfiler | None = None) -> str:
    """Run iterations progress.iteration + 1 .. --train-iters; returns why it stopped. `checkpointer`: the run's
    checkpoint/checkpointer.Checkpointer (None: nothing is saved); `stop_requested`: e.g. a SIGTERM was received."""
    model, optimizer, device = run.model, run.optimizer, run.device
    training, logging = config.training, config.logging
    model.train()
    sampler = PretrainingSampler(len(datasets.train), progress.consumed_train_samples, training.micro_batch_size,
                                 layout.data_rank, layout.data_size)
    batches = micro_batches(datasets.train, sampler, device)
    meter = _IntervalMeter(progress.consumed_train_samples, device)
    saving = checkpointer is not None and checkpointer.enabled
    last_saved = progress.iteration if progress.iteration > 0 else None  # a resumed iteration is already on disk
    last_evaluated = None
    watch = DivergenceWatch(training)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def save():
        run.buffers.finish_param_sync()  # the distributed optimizer's updated parameters may still be gathering
        spiked = watch.spiked_before_save(progress.iteration)
        if spiked is not None:
            raise TrainingDiverged(f"{spiked}; {_stopped_without_saving(last_saved)}")
        check_parameters_finite(model, progress.iteration, device, last_saved)
        checkpointer.save(progress.iteration, progress.consumed_train_samples)

    reason = "finished"
    while progress.iteration < training.train_iters:
        iteration = progress.iteration + 1
        lr = run.lr_schedule.lr_at(iteration)
        step_batches = objective.prepare([next(batches) for _ in range(config.num_micro_batches)])
        if profiler is not None:
            profiler.step_begins(iteration)
        loss, outcome = train_step(model, optimizer, step_batches, lr, run.buffers, objective.loss_fn, layout,
                                   meter.compute_timer)
        if _diverged(loss, outcome, optimizer):
            raise TrainingDiverged(f"iteration {iteration}: loss {loss} / gradient norm {outcome.grad_norm} is not "
                                   f"finite; {_stopped_without_saving(last_saved)}")
        if not outcome.skipped:
            spike = watch.observe(iteration, loss, outcome.grad_norm)
            if spike is not None and spike.stop:
                raise TrainingDiverged(f"{spike.message}; {_stopped_without_saving(last_saved)}")
            if spike is not None:
                logger.print(f"warning: {spike.message}")
        progress.iteration = iteration
        progress.consumed_train_samples += training.global_batch_size
        progress.skipped_iterations += int(outcome.skipped)
        meter.add(loss, outcome.skipped)
        if iteration % logging.log_interval == 0:
            _log_train(logger, progress, config, meter, lr, outcome, optimizer, datasets.train, device,
                       objective.metrics(device))
            meter.reset(progress.consumed_train_samples)
        if (_due(iteration, logging.eval_interval) and logging.eval_iters > 0
                and datasets.valid is not None):
            since = time.perf_counter()
            _log_eval(logger, "valid", iteration, objective.evaluate(
                model, list(eval_batches(datasets.valid, config, layout, device)), device))
            last_evaluated = iteration
            meter.exclude(since)
        if saving and checkpointer.is_due(iteration):
            since = time.perf_counter()
            save()
            last_saved = iteration
            meter.exclude(since)
        if _due(iteration, config.checkpoint.exit_interval):
            reason = f"--exit-interval {config.checkpoint.exit_interval} reached"
            break
        if stop_requested is not None and stop_agreed(stop_requested(), device):
            reason = "exit signal received"
            break
    if profiler is not None:
        profiler.finish()
    if reason == "finished" and logging.eval_iters > 0:
        for kind, dataset in (("valid", datasets.valid), ("test", datasets.test)):
            if dataset is not None and not (kind == "valid" and last_evaluated == progress.iteration):
                _log_eval(logger, kind, progress.iteration, objective.evaluate(
                    model, list(eval_batches(dataset, config, layout, device)), device))
    if saving and last_saved != progress.iteration:
        save()
    logger.print(f"training stopped at iteration {progress.iteration}: {reason}")
    return reason


def _due(iteration: int, interval: int | None) -> bool:
    return bool(interval) and iteration % interval == 0


def rank_step_time_range(seconds_per_iteration: float, device: torch.device) -> dict:
    """The least and the most of every rank's `seconds_per_iteration` (one all-reduce over all ranks; call on every
    rank)."""
    both = torch.tensor([seconds_per_iteration, -seconds_per_iteration], dtype=torch.float64, device=device)
    comm.all_reduce_max(both, world.world_group())
    return {"rank_step_time_min_s": -float(both[1]), "rank_step_time_max_s": float(both[0])}


def _log_train(logger: MetricsLogger, progress: TrainingProgress, config: RunConfig, meter: _IntervalMeter,
               lr: float, outcome: StepOutcome, optimizer: TrainingOptimizer, train_dataset, device: torch.device,
               extra: dict):
    """The interval's training record (with the objective's `extra` fields); every rank calls
    it (the step-time range is reduced over all ranks)."""
    training = config.training
    elapsed = time.perf_counter() - meter.started
    iterations = max(meter.iterations, 1)
    step_time = elapsed / iterations
    tokens_per_s_per_gpu = (training.global_batch_size * training.seq_length / step_time
                            / config.parallel.world_size)
    record = {
        "kind": "train", "iteration": progress.iteration, "consumed_samples": progress.consumed_train_samples,
        "loss": meter.loss_sum / meter.applied if meter.applied else None, "lr": lr, "grad_norm": outcome.grad_norm,
        "loss_scale": optimizer.loss_scale, "skipped_iterations": progress.skipped_iterations,
        "step_time_s": step_time, "tokens_per_s_per_gpu": tokens_per_s_per_gpu,
        "mfu": model_flops_utilization(config.model.flops_per_token(training.seq_length), tokens_per_s_per_gpu),
        "peak_mem_gib": peak_memory_gib(device),
        **rank_step_time_range(meter.compute_timer.take() / iterations, device), **extra,
    }
    if hasattr(train_dataset, "samples_per_dataset"):  # a blend of several datasets
        record["samples_per_dataset"] = train_dataset.samples_per_dataset(meter.first_sample,
                                                                          progress.consumed_train_samples)
    if config.logging.log_memory_to_tensorboard:
        record.update(memory_statistics(device))
    logger.log(record)


def _log_eval(logger: MetricsLogger, kind: str, iteration: int, values: dict[str, float]):
    logger.log({"kind": kind, "iteration": iteration, **values})
