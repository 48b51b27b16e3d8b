"""Entry point of pretraining: arguments -> model -> optimizer -> checkpoint -> data -> training loop.

    python -m megatron_llama.pretrain --model-preset tiny --seq-length 128 --micro-batch-size 4 \\
        --global-batch-size 16 --train-iters 200 --lr 3e-4 --lr-warmup-iters 20 \\
        --data-path data/corpus_text_document --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model tokenizer.model --save ckpt --load ckpt --save-interval 100 --eval-interval 50

Several processes (one per GPU, or CPU processes on gloo) are launched by torchrun:

    torchrun --nproc_per_node 2 -m megatron_llama.pretrain --tensor-model-parallel-size 2 \\
        --sequence-parallel ...        # same flags; data-parallel size = processes / (tp x pp)

Order of start-up: arguments are checked (nothing started yet) -> the default process group from
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK; cuda.set_device(LOCAL_RANK) first; nccl on GPU,
gloo on CPU) -> the tensor/data/pipeline groups (parallel.state) -> seeds (parallel.random) -> model
-> optimizer -> checkpoint -> data -> training loop. Logs and metrics come from the rank that holds
the loss: tensor rank 0, data-parallel rank 0, last pipeline stage.

Any layout: torchrun --nproc_per_node 8 -m megatron_llama.pretrain --tensor-model-parallel-size 2 \\
    --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 --use-distributed-optimizer \\
    --overlap-grad-reduce --recompute-granularity full --recompute-method uniform ...   # data-parallel 2

`python -m megatron_llama.pretrain --help` lists every flag (arguments.py). Exit status: 0 when
training finished or exited on request (--exit-interval, SIGTERM with --exit-signal-handler), 1 when
it diverged (NaN/Inf), 2 for bad arguments or a bad checkpoint. `main(argv)` is callable in-process,
also inside an already started default process group (it then builds only the model-parallel groups).
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys

import torch
import torch.distributed as dist

from megatron_llama.arguments import ArgumentsError, parse_args, stage_split
from megatron_llama.checkpointing import CheckpointError, ParallelRanks, load_checkpoint, save_checkpoint
from megatron_llama.data_loader import MockGPTDataset
from megatron_llama.metrics import MetricsLogger
from megatron_llama.model.compile import compile_blocks, default_on_cuda
from megatron_llama.optim.grad_scaler import ConstantLossScaler, DynamicLossScaler
from megatron_llama.optim.lr_schedule import LearningRateSchedule
from megatron_llama.optim.distributed_optimizer import build_distributed_optimizer
from megatron_llama.optim.mixed_precision import build_optimizer
from megatron_llama.parallel import state as parallel_state
from megatron_llama.parallel.data_parallel import DataParallelBuffers
from megatron_llama.parallel.layers import set_gradient_accumulation_fusion
from megatron_llama.parallel.pipeline import schedule_name
from megatron_llama.parallel.random import set_random_seeds
from megatron_llama.parallel.stages import StageModel, build_model_chunks
from megatron_llama.training import TrainingDiverged, TrainingSetup, TrainingState, train

NOT_SAVED_ARGUMENTS = ("tokenizer", "model_config", "notes", "params_dtype", "resume_from")


def arguments_record(args: argparse.Namespace) -> dict:
    """The run's arguments as JSON values for args.json (the model config under "model")."""
    record = {key: value for key, value in vars(args).items() if key not in NOT_SAVED_ARGUMENTS}
    record["params_dtype"] = str(args.params_dtype).replace("torch.", "")
    record["model"] = args.model_config.to_dict()
    return record


def build_datasets(args: argparse.Namespace):
    """(train, valid, test) datasets holding at least the samples this run asks of each."""
    train_samples = args.train_iters * args.global_batch_size
    eval_samples = args.eval_iters * args.global_batch_size
    if args.sft:
        from megatron_llama.data.sft_dataset import build_sft_datasets

        return build_sft_datasets(args.train_data_path[0], args.valid_data_path[0] if args.valid_data_path else None,
                                  args.tokenizer, args.seq_length, (train_samples, eval_samples), args.seed)
    if args.mock_data:
        vocab = args.model_config.vocab_size
        return (MockGPTDataset(train_samples, args.seq_length, vocab, args.seed),
                MockGPTDataset(eval_samples, args.seq_length, vocab, args.seed + 1) if eval_samples else None,
                None)
    from megatron_llama.data.blended_dataset import build_train_valid_test_datasets

    return build_train_valid_test_datasets(
        data_path=args.data_path or None, split=args.split, seq_length=args.seq_length, seed=args.seed,
        num_samples=(train_samples, eval_samples, eval_samples), cache_path=args.data_cache_path,
        train_data_path=args.train_data_path, valid_data_path=args.valid_data_path,
        test_data_path=args.test_data_path)


def build_loss_scaler(args: argparse.Namespace):
    if args.params_dtype != torch.float16:
        return None
    if args.loss_scale is not None:
        return ConstantLossScaler(args.loss_scale)
    return DynamicLossScaler(initial_scale=args.initial_loss_scale, min_scale=args.min_loss_scale,
                             growth_interval=args.loss_scale_window, hysteresis=args.hysteresis)


def initialize_distributed(args: argparse.Namespace) -> bool:
    """Start the default process group (unless one exists or the run is one process) and build the
    model-parallel groups on it. Returns True when the default group was started here."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)  # before any NCCL call, so each rank's communicator is on its GPU
    started = False
    if args.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        started = True
    if dist.is_initialized():
        parallel_state.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                                 args.virtual_pipeline_model_parallel_size,
                                                 sequence_parallel=args.sequence_parallel)
    return started


def shutdown_distributed(started: bool):
    parallel_state.destroy_model_parallel()
    if started and dist.is_initialized():
        dist.destroy_process_group()


def parallel_ranks() -> ParallelRanks:
    """This process's (tensor, pipeline, data) ranks and the layout's sizes, for checkpoint file names."""
    return ParallelRanks(
        tensor_rank=parallel_state.get_tensor_model_parallel_rank(),
        pipeline_rank=parallel_state.get_pipeline_model_parallel_rank(),
        data_rank=parallel_state.get_data_parallel_rank(with_context_parallel=True),
        tensor_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_size=parallel_state.get_pipeline_model_parallel_world_size(),
        data_size=parallel_state.get_data_parallel_world_size(with_context_parallel=True))


def is_logging_rank() -> bool:
    """The rank that holds the loss and writes logs and metrics: tensor rank 0, data rank 0, last stage."""
    return (parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
            and parallel_state.is_pipeline_last_stage(ignore_virtual=True))


def full_parameter_count(config) -> int:
    """Parameters of the whole model, whatever this rank holds: every stage built on the meta device (no memory),
    tensor-parallel layers knowing their full shape."""
    from megatron_llama.model.llama import LlamaModel

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


def build_stage_model(args: argparse.Namespace, device: torch.device):
    """This rank's model chunks (stage split of the flags), with activation recompute applied to each, as one
    StageModel; and the split. Order: parallel layers (built sharded) -> recompute (wraps block forwards) ->
    compiled elementwise regions (model/compile.py) and gradient-accumulation fusion (parallel/layers.py), each on
    CUDA unless --no-compile-blocks / --no-gradient-accumulation-fusion -> data-parallel buffers and optimizer (they take the parameters as they finally are)."""
    from megatron_llama.model.recompute import apply_recompute

    split = stage_split(args)
    chunks = build_model_chunks(args.model_config, args.seed, split, device=device, dtype=args.params_dtype)
    for chunk in chunks:
        apply_recompute(chunk, args.recompute_granularity, args.recompute_method, args.recompute_num_layers)
        compile_blocks(chunk, default_on_cuda(args.compile_blocks, device))
        chunk.fuse_cross_entropy = default_on_cuda(None, device)
        set_gradient_accumulation_fusion(chunk, default_on_cuda(args.gradient_accumulation_fusion, device))
    return StageModel(chunks), split


def build_optimizer_and_buffers(args: argparse.Namespace, model: StageModel):
    """The data-parallel gradient buffers and the optimizer over them (distributed or replicated); a log line."""
    names = {name for name, _ in model.named_parameters()}
    tied_split = (not args.model_config.untie_embeddings_and_output_weights and args.pipeline_model_parallel_size > 1
                  and args.use_distributed_optimizer and "embedding.weight" in names)
    buffers = DataParallelBuffers(model, parallel_state.get_data_parallel_group(with_context_parallel=True),
                                  bucket_size=args.ddp_bucket_size, overlap_grad_reduce=args.overlap_grad_reduce,
                                  use_distributed_optimizer=args.use_distributed_optimizer,
                                  overlap_param_gather=args.overlap_param_gather, reduction="sum",
                                  separate_bucket_names=["embedding.weight"] if tied_split else [])
    settings = dict(lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                    weight_decay=args.weight_decay, clip_grad=args.clip_grad, loss_scaler=build_loss_scaler(args))
    if args.use_distributed_optimizer:
        optimizer, description = build_distributed_optimizer(model, buffers, **settings)
    else:
        optimizer, description = build_optimizer(model, grad_buffers=buffers, **settings)
    return optimizer, buffers, (f"{description}; {len(buffers.buckets)} gradient bucket(s)"
                                f"{', overlapped reduction' if args.overlap_grad_reduce else ''}")


def run(args: argparse.Namespace, logger: MetricsLogger) -> int:
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    for note in args.notes:
        logger.print(note)
    ranks = parallel_ranks()
    logger.print(f"layout: {args.world_size} processes = tensor {ranks.tensor_size} x pipeline "
                 f"{ranks.pipeline_size} x data {ranks.data_size}"
                 f"{', sequence parallel' if parallel_state.get_sequence_parallel() else ''}")
    set_random_seeds(args.seed)
    config = args.model_config
    model, split = build_stage_model(args, device)
    if ranks.pipeline_size > 1:
        logger.print(f"pipeline: {schedule_name(split.pipeline_size, split.num_chunks)}, "
                     f"{args.num_micro_batches} micro-batches per step\n{split.describe()}")
    logger.print(f"model: {full_parameter_count(config):,} parameters "
                 f"({sum(param.numel() for param in model.parameters()):,} on this rank), {config.num_layers} "
                 f"layers, hidden {config.hidden_size}, vocabulary {config.vocab_size} padded to "
                 f"{config.padded_vocab_size(ranks.tensor_size)}, {str(args.params_dtype).replace('torch.', '')} "
                 f"weights on {device}, attention {config.attention_backend}")
    optimizer, buffers, description = build_optimizer_and_buffers(args, model)
    logger.print(description)
    schedule = LearningRateSchedule(max_lr=args.lr, min_lr=args.min_lr, warmup_iters=args.lr_warmup_iters,
                                    decay_iters=args.lr_decay_iters, decay_style=args.lr_decay_style,
                                    warmup_init=args.lr_warmup_init)
    state = TrainingState()
    if args.resume_from is not None:
        resumed, message = load_checkpoint(args.load, model=model, optimizer=optimizer, config=config,
                                           ranks=ranks, finetune=args.finetune, split=split)
        state = TrainingState(resumed.iteration, resumed.consumed_train_samples)
        if resumed.loss_scaler is not None and optimizer.loss_scaler is not None:
            optimizer.loss_scaler.load_state_dict(resumed.loss_scaler)
        logger.print(message)
    train_dataset, valid_dataset, test_dataset = build_datasets(args)
    record = arguments_record(args)

    def save(current: TrainingState):
        if args.use_distributed_optimizer:
            buffers.finish_param_sync()  # an overlapped all-gather of the updated params may still be in flight
        save_checkpoint(args.save, current.iteration, model=model, optimizer=optimizer, args=record,
                        consumed_train_samples=current.consumed_train_samples, schedule_state=schedule.state_dict(),
                        loss_scaler_state=optimizer.loss_scaler.state_dict() if optimizer.loss_scaler else None,
                        ranks=ranks, barrier=dist.barrier if args.world_size > 1 else None)
        logger.print(f"saved checkpoint of iteration {current.iteration} to {args.save}")

    stop_flag = SignalFlag(args.exit_signal_handler, logger)
    setup = TrainingSetup(
        train_iters=args.train_iters, global_batch_size=args.global_batch_size,
        micro_batch_size=args.micro_batch_size, num_micro_batches=args.num_micro_batches,
        seq_length=args.seq_length, flops_per_token=config.flops_per_token(args.seq_length), device=device,
        log_interval=args.log_interval, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
        save_interval=args.save_interval, exit_interval=args.exit_interval, world_size=args.world_size,
        data_parallel_rank=ranks.data_rank, data_parallel_size=ranks.data_size, buffers=buffers,
        save=save if args.save else None,
        stop_requested=stop_flag if args.exit_signal_handler else None, count_loss_tokens=args.sft)
    try:
        train(model, optimizer, schedule, state, setup, train_dataset, logger, valid_dataset, test_dataset)
    finally:
        stop_flag.restore()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run pretraining with command-line `argv`; returns the process exit status."""
    try:
        args = parse_args(argv)
    except ArgumentsError as error:
        if (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0:
            print(f"error: {error}", file=sys.stderr)  # every rank fails alike; one message is enough
        return 2
    started = initialize_distributed(args)
    logger = MetricsLogger(jsonl_path=args.metrics_path, tensorboard_dir=args.tensorboard_dir,
                           enabled=is_logging_rank())
    try:
        return run(args, logger)
    except TrainingDiverged as error:
        if logger.enabled:  # the loss and gradient norm are agreed by every rank
            print(f"error: training diverged at {error}", file=sys.stderr)
        return 1
    except CheckpointError as error:
        where = f"rank {dist.get_rank()}: " if dist.is_initialized() and dist.get_world_size() > 1 else ""
        print(f"error: {where}{error}", file=sys.stderr)
        return 2
    finally:
        logger.close()
        shutdown_distributed(started)


if __name__ == "__main__":
    sys.exit(main())
