"""Entry point of pretraining: arguments -> model -> optimizer -> checkpoint -> data -> training loop.

    python -m megatron_llama.pretrain --model-preset tiny --seq-length 128 --micro-batch-size 4 \\
        --global-batch-size 16 --train-iters 200 --lr 3e-4 --lr-warmup-iters 20 \\
        --data-path data/corpus_text_document --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model tokenizer.model --save ckpt --load ckpt --save-interval 100 --eval-interval 50

Several processes (one per GPU, or CPU processes on gloo) are launched by torchrun:

    torchrun --nproc_per_node 2 -m megatron_llama.pretrain --tensor-model-parallel-size 2 \\
        --sequence-parallel ...        # same flags; data-parallel size = processes / (tp x pp)

Order of start-up, the only thing this module does: the command line is parsed (arguments.py: no I/O) -> the
tokenizer is opened (it gives the vocabulary size) -> the frozen configuration resolved and checked
(config_resolve.py) -> the --load checkpoint found and checked against the run (checkpoint/; nothing started yet) -> the default process group from torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK; cuda.set_device(LOCAL_RANK) first; nccl on GPU, gloo on CPU; parallel/world.py) ->
the tensor/data/pipeline groups (parallel.state; every group's collectives fail after
--distributed-timeout-minutes) -> the run: seeds, model, buffers, optimizer, schedule (assembly.py) -> resume
(checkpoint.Checkpointer) -> data (data/datasets.py) -> the objective (objectives/) -> the training loop
(training.py). Logs and metrics come from the rank that holds the loss: tensor rank 0, data-parallel rank 0, last
pipeline stage.

Any layout: torchrun --nproc_per_node 8 -m megatron_llama.pretrain --tensor-model-parallel-size 2 \\
    --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 --use-distributed-optimizer \\
    --overlap-grad-reduce --recompute-granularity full --recompute-method uniform ...   # data-parallel 2

`python -m megatron_llama.pretrain --help` lists every flag (arguments.py). `main(argv)` is callable in-process,
also inside an already started default process group (it then builds only the model-parallel groups).

Exit status, by class (the error is one line on stderr, naming the flag, file or iteration and what to do):
    0   training finished, or exited on request (--exit-interval, SIGTERM with --exit-signal-handler)
    1   training diverged: a NaN/Inf loss, gradient norm or updated parameter, or loss / gradient-norm spikes
        (divergence.py); nothing of it was published
    2   bad arguments (an output path that cannot be written included), or a checkpoint that is missing, incomplete, corrupt (checksum), does not fit the run, or
        could not be saved (every rank stops; nothing of it is published)
    3   bad data: token files, SFT records, preference pairs or an index cache that cannot be used
        (data.errors.DataError)

DPO (--dpo --train-data-path prefs.jsonl --load sft_ckpt --finetune): the loaded weights become the policy and,
frozen, a second copy of this rank's chunks, the reference (objectives/dpo.py); --global-batch-size and
--micro-batch-size count preference pairs. The reference's iteration folder is recorded in the run's configuration
(--dpo-reference), so a DPO run resumes (--load without --finetune) against the same reference.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import sys

import torch

from megatron_llama.assembly import build_run, describe_run, run_device
from megatron_llama.checkpoint import CheckpointError, Checkpointer, dpo_reference_folder, find_resume_checkpoint
from megatron_llama.config import RunConfig
from megatron_llama.config_checks import ArgumentsError
from megatron_llama.config_resolve import config_from_args
from megatron_llama.data.datasets import build_datasets
from megatron_llama.data.errors import DataError
from megatron_llama.metrics import MetricsLogger
from megatron_llama.objectives.build import build_objective
from megatron_llama.parallel import state as parallel_state, world
from megatron_llama.parallel.state import ParallelLayout
from megatron_llama.profiling import StepProfiler, trace_folder
from megatron_llama.training import TrainingDiverged, TrainingProgress, train

EXIT_DONE, EXIT_DIVERGED, EXIT_BAD_ARGUMENTS_OR_CHECKPOINT, EXIT_BAD_DATA = 0, 1, 2, 3  # the module docstring


def initialize_distributed(config: RunConfig) -> tuple[ParallelLayout, bool]:
    """Start the default process group (unless one exists or the run is one process) and build the
    model-parallel groups on it: the run's layout, and True when the default group was started here."""
    if config.training.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before any NCCL call: each rank on its GPU
    timeout = datetime.timedelta(minutes=config.parallel.distributed_timeout_minutes)
    started = world.start_default_group(config.training.device, timeout, config.parallel.world_size)
    if not world.is_distributed():
        return parallel_state.current_layout(), started
    return parallel_state.initialize_model_parallel(config.parallel.tensor_model_parallel_size,
                                                    config.parallel.pipeline_model_parallel_size,
                                                    sequence_parallel=config.parallel.sequence_parallel,
                                                    timeout=timeout), started


def shutdown_distributed(started: bool):
    parallel_state.destroy_model_parallel()
    world.stop_default_group(started)


class SignalFlag:
    """Records SIGTERM (with --exit-signal-handler) so the loop can save and exit after the current iteration."""

    def __init__(self, enabled: bool, logger: MetricsLogger):
        self.received = False
        self.previous = None
        self.logger = logger
        if enabled:
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True
        self.logger.print("SIGTERM received: saving a checkpoint after this iteration, then exiting")

    def __call__(self) -> bool:
        return self.received

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def run(config: RunConfig, layout: ParallelLayout, notes: list[str], tokenizer, resume_from: str | None,
        logger: MetricsLogger) -> int:
    """Build the run of `config` on this rank's `layout`, resume it, and train."""
    device = run_device(config.training)
    for note in notes:
        logger.print(note)
    pieces = build_run(config, layout, device)
    for line in describe_run(pieces, config, layout):
        logger.print(line)
    checkpointer = Checkpointer(config, layout, pieces.model, pieces.optimizer, pieces.lr_schedule, logger.print)
    progress = TrainingProgress(*checkpointer.resume(resume_from))
    datasets = build_datasets(config, tokenizer, logger.print)
    objective = build_objective(config, pieces, layout, datasets, resume_from, logger.print)
    logging = config.logging
    stop_flag = SignalFlag(config.checkpoint.exit_signal_handler, logger)
    profiler = (StepProfiler(trace_folder(logging.tensorboard_dir, logging.metrics_path), logging.profile_step_start,
                             logging.profile_step_end, layout.rank, device, enabled=layout.rank in logging.profile_ranks)
                if logging.profile else None)
    try:
        train(pieces, objective, config, layout, progress, datasets, logger, checkpointer=checkpointer,
              stop_requested=stop_flag if config.checkpoint.exit_signal_handler else None, profiler=profiler)
    finally:
        stop_flag.restore()
        checkpointer.close()  # the last save is written and published before the process ends
    return EXIT_DONE


def _print_on_first_rank(message: str):
    """Every rank fails alike before the layout starts; one message is enough."""
    if world.world_rank() == 0:
        print(f"error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run pretraining with command-line `argv`; returns the process exit status."""
    try:
        config, notes, tokenizer = config_from_args(argv)
        resume_from = find_resume_checkpoint(config, notes)
        if config.data.dpo:
            # recorded in every checkpoint's config.json, so that a resumed DPO run keeps its reference
            config = dataclasses.replace(config, data=dataclasses.replace(
                config.data, dpo_reference=dpo_reference_folder(config, resume_from)))
    except (ArgumentsError, CheckpointError) as error:
        _print_on_first_rank(str(error))
        return EXIT_BAD_ARGUMENTS_OR_CHECKPOINT
    layout, started = initialize_distributed(config)
    logger = MetricsLogger(jsonl_path=config.logging.metrics_path, tensorboard_dir=config.logging.tensorboard_dir,
                           enabled=layout.is_logging_rank)
    try:
        return run(config, layout, notes, tokenizer, resume_from, logger)
    except TrainingDiverged as error:
        if logger.enabled:  # the loss and gradient norm are agreed by every rank
            print(f"error: training diverged at {error}", file=sys.stderr)
        return EXIT_DIVERGED
    except CheckpointError as error:
        where = f"rank {layout.rank}: " if layout.world_size > 1 else ""
        print(f"error: {where}{error}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS_OR_CHECKPOINT
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_DATA
    finally:
        logger.close()
        shutdown_distributed(started)


if __name__ == "__main__":
    sys.exit(main())
