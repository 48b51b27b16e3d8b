"""Entry point of pretraining: arguments -> model -> optimizer -> checkpoint -> data -> training loop.

    python -m megatron_llama.pretrain --model-preset tiny --seq-length 128 --micro-batch-size 4 \\
        --global-batch-size 16 --train-iters 200 --lr 3e-4 --lr-warmup-iters 20 \\
        --data-path data/corpus_text_document --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model tokenizer.model --save ckpt --load ckpt --save-interval 100 --eval-interval 50

Several processes (one per GPU, or CPU processes on gloo) are launched by torchrun:

    torchrun --nproc_per_node 2 -m megatron_llama.pretrain --tensor-model-parallel-size 2 \\
        --sequence-parallel ...        # same flags; data-parallel size = processes / (tp x pp)

Order of start-up: the command line is parsed (arguments.py: no I/O) -> the tokenizer is opened (it gives the
vocabulary size) -> the frozen configuration resolved and checked (config_resolve.py) -> the --load checkpoint
found and checked against the run (nothing started yet) -> the default process group from
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK; cuda.set_device(LOCAL_RANK) first; nccl on GPU,
gloo on CPU) -> the tensor/data/pipeline groups (parallel.state; every group's collectives fail after
--distributed-timeout-minutes) -> seeds (parallel.random) -> model
-> optimizer -> checkpoint -> data -> training loop. Logs and metrics come from the rank that holds
the loss: tensor rank 0, data-parallel rank 0, last pipeline stage.

Any layout: torchrun --nproc_per_node 8 -m megatron_llama.pretrain --tensor-model-parallel-size 2 \\
    --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 --use-distributed-optimizer \\
    --overlap-grad-reduce --recompute-granularity full --recompute-method uniform ...   # data-parallel 2

`python -m megatron_llama.pretrain --help` lists every flag (arguments.py). `main(argv)` is callable in-process,
also inside an already started default process group (it then builds only the model-parallel groups).

Exit status, by class (the error is one line on stderr, naming the flag, file or iteration and what to do):
    0   training finished, or exited on request (--exit-interval, SIGTERM with --exit-signal-handler)
    1   training diverged: a NaN/Inf loss, gradient norm or updated parameter; nothing of it was published
    2   bad arguments, or a checkpoint that is missing, incomplete, corrupt (checksum), does not fit the run, or
        could not be saved (every rank stops; nothing of it is published)
    3   bad data: token files, SFT records, preference pairs or an index cache that cannot be used
        (data.errors.DataError)

DPO (--dpo --train-data-path prefs.jsonl --load sft_ckpt --finetune): the loaded weights become the policy and,
frozen, a second copy of this rank's chunks, the reference (megatron_llama/dpo.py); --global-batch-size and
--micro-batch-size count preference pairs. The reference's iteration folder is recorded in the run's configuration
(--dpo-reference), so a DPO run resumes (--load without --finetune) against the same reference.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from megatron_llama.async_save import AsyncCheckpointSaver
from megatron_llama.checkpoint_files import set_aside_unpublished, tracker_path
from megatron_llama.checkpointing import (CheckpointError, check_resumable, load_checkpoint, load_weights,
                                          open_checkpoint, save_checkpoint, snapshot_checkpoint)
from megatron_llama.config import RunConfig
from megatron_llama.config_checks import ArgumentsError
from megatron_llama.config_resolve import config_from_args
from megatron_llama.data.blended_dataset import build_train_valid_test_datasets, parse_data_path
from megatron_llama.data.chat_template import get_chat_template
from megatron_llama.data.dataset_tokenizer import check_dataset_tokenizer
from megatron_llama.data.errors import DataError
from megatron_llama.data.packing import EodDocuments
from megatron_llama.data.preference_dataset import PreferenceDataset
from megatron_llama.data.sft_dataset import build_sft_datasets, is_jsonl
from megatron_llama.data_loader import MockGPTDataset
from megatron_llama.dpo import DPOObjective, precompute_reference_logps
from megatron_llama.metrics import MetricsLogger
from megatron_llama.model.compile import compile_blocks
from megatron_llama.model.llama import LlamaModel
from megatron_llama.model.recompute import apply_recompute
from megatron_llama.model.stage_model import StageModel, build_model_chunks
from megatron_llama.optim.grad_scaler import ConstantLossScaler, DynamicLossScaler
from megatron_llama.optim.lr_schedule import LearningRateSchedule
from megatron_llama.optim.builder import build_optimizer
from megatron_llama.parallel import comm, state as parallel_state
from megatron_llama.parallel.data_parallel import DataParallelBuffers
from megatron_llama.parallel.layers import set_gradient_accumulation_fusion
from megatron_llama.parallel.pipeline import schedule_name
from megatron_llama.parallel.random import set_random_seeds
from megatron_llama.parallel.state import ParallelLayout
from megatron_llama.profiling import StepProfiler, trace_folder
from megatron_llama.training import TrainingDiverged, TrainingSetup, TrainingProgress, train

EXIT_DONE, EXIT_DIVERGED, EXIT_BAD_ARGUMENTS_OR_CHECKPOINT, EXIT_BAD_DATA = 0, 1, 2, 3  # the module docstring


def _rank() -> int:
    """This process's global rank, also before the default process group starts (torchrun's RANK)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def find_resume_checkpoint(config: RunConfig, notes: list[str]) -> str | None:
    """The iteration folder of --load this run starts from (checked against the run: checkpointing.check_resumable,
    whose warnings join `notes`), or None. A --load folder that is also the --save folder means "resume in place":
    the first rank sets aside the folders of unpublished iterations (an interrupted save; it prints what it moved),
    and without a published checkpoint the run starts at iteration 0."""
    load, save, step = config.checkpoint.load, config.checkpoint.save, config.checkpoint.ckpt_step
    if load is None:
        return None
    if save is not None and os.path.abspath(save) == os.path.abspath(load):
        if _rank() == 0:
            for line in set_aside_unpublished(load, keep=step):
                print(line, flush=True)
        if step is None and not os.path.isfile(tracker_path(load)):
            notes.append(f"no checkpoint published in {load} yet: starting from iteration 0")
            return None
    try:
        folder, saved, meta = open_checkpoint(load, step)
    except CheckpointError as error:
        raise CheckpointError(f"--load {load}: {error}") from None
    notes.extend(check_resumable(folder, saved, config, bool(meta.get("model_only"))))
    return folder


def dpo_reference_folder(config: RunConfig, resume_from: str | None) -> str | None:
    """The iteration folder whose weights are a DPO run's frozen reference (None: the run's initial weights):
    --dpo-reference; else the folder --load --finetune (or a model-only checkpoint) starts from; else, resuming a
    DPO run, the reference its checkpoint records. CheckpointError when it cannot be known."""
    if config.data.dpo_reference is not None:
        reference = os.path.abspath(config.data.dpo_reference)
        if os.path.isfile(tracker_path(reference)):  # a run's folder: its published iteration
            reference = open_checkpoint(reference)[0]
        return reference
    if resume_from is None:
        return None
    _, saved, meta = open_checkpoint(config.checkpoint.load, config.checkpoint.ckpt_step)
    if config.checkpoint.finetune or meta.get("model_only"):
        return os.path.abspath(resume_from)
    if not saved.data.dpo:
        raise CheckpointError(f"--load {resume_from} is not a DPO run's checkpoint; add --finetune to start DPO from "
                              f"its weights (they become the frozen reference)")
    if saved.data.dpo_reference is None:
        raise CheckpointError(f"--load {resume_from} is a DPO run's checkpoint that records no reference (the run "
                              f"started from its initial weights); pass --dpo-reference ITER_DIR")
    return saved.data.dpo_reference


def build_datasets(config: RunConfig, tokenizer, log):
    """(train, valid, test) datasets holding at least the samples this run asks of each; `log` prints a line."""
    training, data = config.training, config.data
    train_samples = training.train_iters * training.global_batch_size
    eval_samples = config.logging.eval_iters * training.global_batch_size
    if data.dpo:
        template = get_chat_template(data.chat_template)
        train = PreferenceDataset(data.train_data_path[0], tokenizer, template, training.seq_length, train_samples,
                                  training.seed)
        log(train.describe())
        valid = None
        if data.valid_data_path and eval_samples:
            valid = PreferenceDataset(data.valid_data_path[0], tokenizer, template, training.seq_length, eval_samples,
                                      training.seed)
            log(valid.describe())
        return train, valid, None
    if data.sft:
        sft_paths = [data.train_data_path[0], *(data.valid_data_path or [])[:1]]
        check_dataset_tokenizer([path for path in sft_paths if not is_jsonl(path)], data.tokenizer_hash,
                                data.tokenizer_model)
        return build_sft_datasets(data.train_data_path[0], data.valid_data_path[0] if data.valid_data_path else None,
                                  tokenizer, training.seq_length, (train_samples, eval_samples), training.seed, log,
                                  chat_template=data.chat_template, packing=data.sft_packing)
    if data.mock_data:
        vocab = config.model.vocab_size
        return (MockGPTDataset(train_samples, training.seq_length, vocab, training.seed),
                MockGPTDataset(eval_samples, training.seq_length, vocab, training.seed + 1) if eval_samples else None,
                None)
    given = [paths for paths in (data.data_path, data.train_data_path, data.valid_data_path, data.test_data_path)
             if paths]
    check_dataset_tokenizer([prefix for paths in given for prefix in parse_data_path(paths)[0]],
                            data.tokenizer_hash, data.tokenizer_model)
    datasets = build_train_valid_test_datasets(
        data_path=data.data_path or None, split=data.split, seq_length=training.seq_length, seed=training.seed,
        num_samples=(train_samples, eval_samples, eval_samples), cache_path=data.data_cache_path,
        train_data_path=data.train_data_path, valid_data_path=data.valid_data_path,
        test_data_path=data.test_data_path, vocab_size=config.model.vocab_size)
    if not (data.reset_position_ids or data.reset_attention_mask or data.eod_mask_loss):
        return datasets
    return tuple(None if dataset is None else EodDocuments(dataset, tokenizer.eod, data.reset_position_ids,
                                                           data.reset_attention_mask, data.eod_mask_loss)
                 for dataset in datasets)


def build_loss_scaler(config: RunConfig):
    training = config.training
    if training.precision != "fp16":
        return None
    if training.loss_scale is not None:
        return ConstantLossScaler(training.loss_scale)
    return DynamicLossScaler(initial_scale=training.initial_loss_scale, min_scale=training.min_loss_scale,
                             growth_interval=training.loss_scale_window, hysteresis=training.hysteresis)


def initialize_distributed(config: RunConfig) -> tuple[ParallelLayout, bool]:
    """Start the default process group (unless one exists or the run is one process) and build the
    model-parallel groups on it: the run's layout, and True when the default group was started here."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = config.training.device
    if device == "cuda":
        torch.cuda.set_device(local_rank)  # before any NCCL call, so each rank's communicator is on its GPU
    started = False
    timeout = datetime.timedelta(minutes=config.parallel.distributed_timeout_minutes)
    if config.parallel.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timeout)
        started = True
    if not dist.is_initialized():
        return parallel_state.current_layout(), started
    return parallel_state.initialize_model_parallel(config.parallel.tensor_model_parallel_size,
                                                    config.parallel.pipeline_model_parallel_size,
                                                    sequence_parallel=config.parallel.sequence_parallel,
                                                    timeout=timeout), started


def shutdown_distributed(started: bool):
    parallel_state.destroy_model_parallel()
    if started and dist.is_initialized():
        dist.destroy_process_group()


def full_parameter_count(config) -> int:
    """Parameters of the whole model, whatever this rank holds: every stage built on the meta device (no memory),
    tensor-parallel layers knowing their full shape."""
    with torch.device("meta"):
        whole = LlamaModel(config)
    return sum(math.prod(getattr(param, "full_shape", param.shape)) for param in whole.parameters())


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


def build_stage_model(config: RunConfig, device: torch.device):
    """This rank's model chunks (the configuration's stage split), with activation recompute applied to each, as one
    StageModel; and the split. Order: parallel layers (built sharded) -> recompute (wraps block forwards) ->
    compiled elementwise regions (model/compile.py), the fused output head + cross entropy
    (parallel/fused_cross_entropy.py) and gradient-accumulation fusion (parallel/layers.py), as the configuration
    says (on CUDA by default) -> data-parallel buffers and optimizer (they take the parameters as they finally
    are)."""
    training = config.training
    split = config.stage_split()
    chunks = build_model_chunks(config.model, training.seed, split, device=device, dtype=training.params_dtype)
    for chunk in chunks:
        apply_recompute(chunk, training.recompute_granularity, training.recompute_method,
                        training.recompute_num_layers)
        compile_blocks(chunk, training.compile_blocks)
        chunk.fuse_cross_entropy = training.cross_entropy_loss_fusion
        set_gradient_accumulation_fusion(chunk, training.gradient_accumulation_fusion)
    return StageModel(chunks), split


def build_optimizer_and_buffers(config: RunConfig, model: StageModel):
    """The data-parallel gradient buffers and the optimizer over them (distributed or replicated); a log line."""
    parallel, training = config.parallel, config.training
    names = {name for name, _ in model.named_parameters()}
    tied_split = (not config.model.untie_embeddings_and_output_weights and parallel.pipeline_model_parallel_size > 1
                  and parallel.use_distributed_optimizer and "embedding.weight" in names)
    buffers = DataParallelBuffers(model, parallel_state.get_data_parallel_group(),
                                  bucket_size=parallel.ddp_bucket_size, overlap_grad_reduce=parallel.overlap_grad_reduce,
                                  use_distributed_optimizer=parallel.use_distributed_optimizer,
                                  overlap_param_gather=parallel.overlap_param_gather, reduction="sum",
                                  separate_bucket_names=["embedding.weight"] if tied_split else [])
    settings = dict(lr=training.lr, betas=(training.adam_beta1, training.adam_beta2), eps=training.adam_eps,
                    weight_decay=training.weight_decay, clip_grad=training.clip_grad,
                    loss_scaler=build_loss_scaler(config))
    optimizer, description = build_optimizer(model, buffers, **settings)
    return optimizer, buffers, (f"{description}; {len(buffers.buckets)} gradient bucket(s)"
                                f"{', overlapped reduction' if parallel.overlap_grad_reduce else ''}")


def run(config: RunConfig, layout: ParallelLayout, notes: list[str], tokenizer, resume_from: str | None,
        logger: MetricsLogger) -> int:
    """Build the model, optimizer and data of `config` on this rank's `layout`, resume, and train."""
    training, checkpoint, logging = config.training, config.checkpoint, config.logging
    device = torch.device("cuda", torch.cuda.current_device()) if training.device == "cuda" else torch.device("cpu")
    for note in notes:
        logger.print(note)
    logger.print(f"layout: {config.parallel.world_size} processes = tensor {layout.tensor_size} x pipeline "
                 f"{layout.pipeline_size} x data {layout.data_size}"
                 f"{', sequence parallel' if layout.sequence_parallel else ''}")
    set_random_seeds(training.seed)
    model_config = config.model
    model, split = build_stage_model(config, device)
    if layout.pipeline_size > 1:
        logger.print(f"pipeline: {schedule_name(split.pipeline_size, split.num_chunks)}, "
                     f"{config.num_micro_batches} micro-batches per step\n{split.describe()}")
    logger.print(f"model: {full_parameter_count(model_config):,} parameters "
                 f"({sum(param.numel() for param in model.parameters()):,} on this rank), {model_config.num_layers} "
                 f"layers, hidden {model_config.hidden_size}, vocabulary {model_config.vocab_size} padded to "
                 f"{model_config.padded_vocab_size(layout.tensor_size)}, {training.precision} weights on {device}, "
                 f"attention {model_config.attention_backend}")
    optimizer, buffers, description = build_optimizer_and_buffers(config, model)
    logger.print(description)
    lr_schedule = LearningRateSchedule(max_lr=training.lr, min_lr=training.min_lr,
                                       warmup_iters=training.lr_warmup_iters, decay_iters=training.lr_decay_iters,
                                       decay_style=training.lr_decay_style, warmup_init=training.lr_warmup_init)
    progress = TrainingProgress()
    if resume_from is not None:
        resumed, message = load_checkpoint(checkpoint.load, model=model, optimizer=optimizer, config=config,
                                           layout=layout)
        progress = TrainingProgress(resumed.iteration, resumed.consumed_train_samples)
        if resumed.loss_scaler is not None and optimizer.loss_scaler is not None:
            optimizer.loss_scaler.load_state_dict(resumed.loss_scaler)
        logger.print(message)
    train_dataset, valid_dataset, test_dataset = build_datasets(config, tokenizer, logger.print)
    dpo = None
    if config.data.dpo:
        config = dataclasses.replace(config, data=dataclasses.replace(
            config.data, dpo_reference=dpo_reference_folder(config, resume_from)))  # recorded in its checkpoints
        reference, _ = build_stage_model(config, device)
        if config.data.dpo_reference in (None, resume_from and os.path.abspath(resume_from)):
            reference.load_state_dict(model.state_dict())  # the policy holds those weights now: no second read
        else:
            load_weights(config.data.dpo_reference, reference, config, layout)
        logger.print(f"DPO: {config.data.dpo_loss} loss, beta {config.data.dpo_beta}, reference policy: "
                     f"{config.data.dpo_reference or 'the initial weights'}, frozen")
        if config.data.dpo_precompute_reference:
            started = time.perf_counter()
            for dataset in (train_dataset, valid_dataset):
                if dataset is not None:
                    dataset.reference_logps = precompute_reference_logps(reference, dataset,
                                                                         training.micro_batch_size, device)
            reference = None  # its log-probabilities are all the run needs of it
            logger.print(f"DPO: the reference's log-probabilities of every pair computed in "
                         f"{time.perf_counter() - started:.1f} s; the reference model is freed")
        dpo = DPOObjective(reference, config.data.dpo_beta, config.data.dpo_loss, training.global_batch_size)

    # Saves end with every rank's agreement (comm.all_ranks_true) on a gloo group of their own, which the
    # training thread's collectives never share (--async-save runs it on a background thread).
    agree = None
    if checkpoint.save and config.parallel.world_size > 1:
        agree = functools.partial(comm.all_ranks_true, group=dist.new_group(backend="gloo"))
    saver = AsyncCheckpointSaver(agree) if checkpoint.async_save and checkpoint.save else None

    def save(current: TrainingProgress):
        """Save `current`; the log line gives the seconds the training loop stood still for it."""
        started = time.perf_counter()  # training._save_if_finite has already waited for the parameters' gather
        state = dict(model=model, optimizer=optimizer, consumed_train_samples=current.consumed_train_samples,
                     lr_schedule_state=lr_schedule.state_dict(),
                     loss_scaler_state=optimizer.loss_scaler.state_dict() if optimizer.loss_scaler else None,
                     layout=layout)
        if saver is not None:
            saver.save(checkpoint.save, lambda: snapshot_checkpoint(current.iteration, copy=True, **state), config,
                       layout)
            logger.print(f"saving checkpoint of iteration {current.iteration} to {checkpoint.save} in the background "
                         f"(training stalled {time.perf_counter() - started:.2f} s)")
            return
        save_checkpoint(checkpoint.save, current.iteration, config=config, agree=agree, **state)
        logger.print(f"saved checkpoint of iteration {current.iteration} to {checkpoint.save} "
                     f"(training stalled {time.perf_counter() - started:.2f} s)")

    stop_flag = SignalFlag(checkpoint.exit_signal_handler, logger)
    profiler = (StepProfiler(trace_folder(logging.tensorboard_dir, logging.metrics_path), logging.profile_step_start,
                             logging.profile_step_end, _rank(), device, enabled=_rank() in logging.profile_ranks)
                if logging.profile else None)
    setup = TrainingSetup(
        train_iters=training.train_iters, global_batch_size=training.global_batch_size,
        micro_batch_size=training.micro_batch_size, num_micro_batches=config.num_micro_batches,
        seq_length=training.seq_length, flops_per_token=model_config.flops_per_token(training.seq_length),
        device=device, log_interval=logging.log_interval, eval_interval=logging.eval_interval,
        eval_iters=logging.eval_iters, save_interval=checkpoint.save_interval, exit_interval=checkpoint.exit_interval,
        world_size=config.parallel.world_size, data_parallel_rank=layout.data_rank,
        data_parallel_size=layout.data_size, buffers=buffers, save=save if checkpoint.save else None,
        stop_requested=stop_flag if checkpoint.exit_signal_handler else None,
        count_loss_tokens=config.data.sft or config.data.eod_mask_loss, profiler=profiler,
        log_memory=logging.log_memory_to_tensorboard, dpo=dpo)
    try:
        train(model, optimizer, lr_schedule, progress, setup, train_dataset, logger, valid_dataset, test_dataset)
    finally:
        stop_flag.restore()
        if saver is not None:
            saver.wait()  # the last save is written and published before the process ends
    return EXIT_DONE


def _print_on_first_rank(message: str):
    """Every rank fails alike before the layout starts; one message is enough."""
    if _rank() == 0:
        print(f"error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run pretraining with command-line `argv`; returns the process exit status."""
    try:
        config, notes, tokenizer = config_from_args(argv)
        resume_from = find_resume_checkpoint(config, notes)
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
        where = f"rank {dist.get_rank()}: " if dist.is_initialized() and dist.get_world_size() > 1 else ""
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
