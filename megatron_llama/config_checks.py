"""The rules over a run's whole configuration: bad combinations refused (ArgumentsError), before any model,
dataset or process group is built.

    check_config(config)     # config_resolve.resolve calls it on the RunConfig it has just filled in

Each rule names the flags involved and the numbers, and says what to change:
  * Parallel layout: the model must split over the tensor ranks (ModelConfig.check), --sequence-parallel needs
    --seq-length divisible by tp, the blocks must split over the pipeline stages (parallel/stages.split_layers)
    and the micro-batches per step must suit the schedule (parallel/pipeline.check_micro_batch_count); the global
    batch must be a multiple of micro-batch x data-parallel size. --overlap-param-gather needs
    --use-distributed-optimizer. (The world size must be a multiple of tp x pp: config_resolve.py, which derives
    the data-parallel size from it.)
  * FP8: --fp8-format needs a GPU of compute capability 8.9 or newer (the CPU emulates), not --fp16, and every
    dimension of the blocks' FP8 GEMMs on a rank (hidden size, qkv, attention output and ffn widths / tp, tokens per
    micro-batch) a multiple of 16; --fp8-recipe needs --fp8-format (config_resolve.py).
  * Recompute: --recompute-method and --recompute-num-layers go with --recompute-granularity full, which needs a
    method.
  * Learning rates (--lr, --min-lr, --lr-warmup-init) must be finite, not negative, and within float32's range
    (the optimizer's states and master params are float32); warm-up shorter than the decay.
  * Data: exactly one source of training data (--data-path, --train-data-path, or --mock-data); --sft and --dpo
    read one jsonl file (or preprocessed PREFIX) per split with the run's tokenizer; document flags apply to
    pretraining only.
  * Checkpoints: interval and background saving need --save; --finetune and --ckpt-step need --load, which must
    exist; --profile's iterations and ranks must lie in the run.
  * Divergence watch (divergence.py): --spiky-loss-factor and --large-grad-factor above 1, --spike-reference-iters
    and --spikes-before-stop positive.
  * Outputs: every path the run writes (--save, --metrics-path, --tensorboard-dir, --data-cache-path) must be a
    writable folder (the metrics path: a writable file), or creatable: its nearest existing parent a writable folder.
"""
from __future__ import annotations

import math
import os

import torch

from megatron_llama.config import DataConfig, RunConfig
from megatron_llama.data.blended_dataset import parse_data_path
from megatron_llama.data.chat_template import DEFAULT_CHAT_TEMPLATE
from megatron_llama.data.gpt_dataset import parse_split
from megatron_llama.data.indexed_dataset import dataset_exists
from megatron_llama.parallel.fp8 import check_fp8_supported
from megatron_llama.parallel.pipeline import check_micro_batch_count


class ArgumentsError(ValueError):
    """A bad flag or combination of flags; the message says what to change."""


def check_config(config: RunConfig) -> None:
    """Check every combination of `config`'s values (ArgumentsError names the flags)."""
    _check_model(config)
    _check_batches(config)
    check_fp8(config)
    _check_pipeline(config)
    _check_data_parallel_and_recompute(config)
    _check_schedule(config)
    _check_data(config)
    _check_checkpointing(config)
    _check_profiling(config)
    _check_divergence_watch(config)
    _check_output_paths(config)


def flag_name(name: str) -> str:
    """The command-line flag of a configuration field: "seq_length" -> "--seq-length"."""
    return "--" + name.replace("_", "-")


def check_positive(section, *names: str):
    """ArgumentsError unless each of `names` in the config `section` is None or positive."""
    for name in names:
        value = getattr(section, name)
        if value is not None and value <= 0:
            raise ArgumentsError(f"{flag_name(name)} must be positive, got {value}")


def _check_model(config: RunConfig):
    model, training, tp = config.model, config.training, config.parallel.tensor_model_parallel_size
    check_positive(training, "seq_length")
    try:
        model.check(tp)
    except ValueError as error:
        raise ArgumentsError(str(error)) from None
    if config.parallel.sequence_parallel and training.seq_length % tp:
        raise ArgumentsError(f"--sequence-parallel splits the sequence across tensor ranks: --seq-length "
                             f"{training.seq_length} is not divisible by --tensor-model-parallel-size {tp}; use a "
                             f"multiple of {tp} or drop --sequence-parallel")
    if training.seq_length > model.max_position_embeddings:
        raise ArgumentsError(f"--seq-length {training.seq_length} exceeds --max-position-embeddings "
                             f"{model.max_position_embeddings}; raise --max-position-embeddings or shorten "
                             f"the sequence")
    if model.attention_backend == "xformers" and training.device == "cpu":
        raise ArgumentsError("--attention-backend xformers has no CPU kernels; use --attention-backend sdpa")


def _check_batches(config: RunConfig):
    training, dp = config.training, config.parallel.data_parallel_size
    check_positive(training, "micro_batch_size", "global_batch_size", "train_iters")
    per_step = training.micro_batch_size * dp
    if training.global_batch_size % per_step:
        raise ArgumentsError(f"global batch {training.global_batch_size} is not divisible by micro-batch "
                             f"{training.micro_batch_size} x data-parallel {dp} = {per_step}; "
                             f"use a multiple of {per_step}")


def check_fp8(config: RunConfig):
    """--fp8-format: a GPU with FP8 GEMMs (or the CPU's emulation), not fp16, and every dimension of this rank's
    FP8 GEMMs a multiple of 16 (parallel/fp8.check_fp8_supported). Under sequence parallelism the column-parallel
    GEMMs still take every token of the micro-batch: the shards are gathered before they multiply."""
    model, training, tp = config.model, config.training, config.parallel.tensor_model_parallel_size
    if training.fp8_format is None:
        return
    gemm_dims = {
        "--hidden-size": model.hidden_size,
        "qkv width (--num-attention-heads + 2 x --num-query-groups) x head dim / tp":
            (model.num_attention_heads + 2 * model.kv_heads) * model.head_dim // tp,
        "attention output width --hidden-size / tp": model.num_attention_heads * model.head_dim // tp,
        "--ffn-hidden-size / tp": model.ffn_hidden_size // tp,
        "tokens per micro-batch (--micro-batch-size x --seq-length)": training.micro_batch_size * training.seq_length,
    }
    try:
        check_fp8_supported(torch.device(training.device), gemm_dims, params_dtype=training.params_dtype)
    except ValueError as error:
        raise ArgumentsError(str(error)) from None


def _check_pipeline(config: RunConfig):
    """The stage split and the micro-batch count of the pipeline schedule."""
    try:
        split = config.stage_split()
        check_micro_batch_count(config.num_micro_batches, split.pipeline_size, split.num_chunks)
    except ValueError as error:
        raise ArgumentsError(str(error)) from None


def _check_data_parallel_and_recompute(config: RunConfig):
    training = config.training
    check_positive(training, "recompute_num_layers")
    if config.parallel.overlap_param_gather and not config.parallel.use_distributed_optimizer:
        raise ArgumentsError("--overlap-param-gather overlaps the all-gather of the distributed optimizer's "
                             "updated params; add --use-distributed-optimizer or drop --overlap-param-gather")
    if training.recompute_granularity != "full":
        given = [flag for flag, value in (("--recompute-method", training.recompute_method),
                                          ("--recompute-num-layers", training.recompute_num_layers))
                 if value is not None]
        if given:
            raise ArgumentsError(f"{' and '.join(given)} apply to --recompute-granularity full only (got "
                                 f"{training.recompute_granularity}); add --recompute-granularity full or drop them")
    elif training.recompute_method is None:
        raise ArgumentsError("--recompute-granularity full needs --recompute-method uniform (every block, in groups "
                             "of --recompute-num-layers) or block (the first --recompute-num-layers blocks)")


def _check_schedule(config: RunConfig):
    training, logging = config.training, config.logging
    for name in ("lr", "min_lr", "lr_warmup_init"):
        value = getattr(training, name)
        if not math.isfinite(value) or value < 0:
            raise ArgumentsError(f"{flag_name(name)} must be a finite number >= 0, got {value}")
        if value > torch.finfo(torch.float32).max:
            raise ArgumentsError(f"{flag_name(name)} {value} does not fit in float32, the optimizer's precision "
                                 f"(at most {torch.finfo(torch.float32).max:.3e})")
    check_positive(training, "lr", "lr_decay_iters")
    check_positive(logging, "log_interval", "eval_interval")
    check_positive(config.checkpoint, "save_interval", "exit_interval")
    if training.min_lr < 0 or training.min_lr > training.lr:
        raise ArgumentsError(f"--min-lr {training.min_lr} must lie between 0 and --lr {training.lr}")
    if training.lr_warmup_iters < 0:
        raise ArgumentsError(f"--lr-warmup-iters must not be negative, got {training.lr_warmup_iters}")
    if training.lr_decay_style != "constant" and training.lr_warmup_iters >= training.lr_decay_iters:
        raise ArgumentsError(f"--lr-warmup-iters {training.lr_warmup_iters} must be below --lr-decay-iters "
                             f"{training.lr_decay_iters} (default --train-iters) for {training.lr_decay_style} decay")
    if training.weight_decay < 0 or training.clip_grad < 0 or logging.eval_iters < 0:
        raise ArgumentsError("--weight-decay, --clip-grad and --eval-iters must not be negative")
    if not (0 <= training.adam_beta1 < 1 and 0 <= training.adam_beta2 < 1):
        raise ArgumentsError(f"--adam-beta1 {training.adam_beta1} and --adam-beta2 {training.adam_beta2} must lie "
                             f"in [0, 1)")


def _check_data(config: RunConfig):
    data = config.data
    given = {flag_name(name): getattr(data, name) for name in ("data_path", "train_data_path", "valid_data_path",
                                                            "test_data_path") if getattr(data, name)}
    document_flags = [flag_name(name) for name in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")
                      if getattr(data, name)]
    if (data.sft_packing or data.reset_attention_mask) and config.model.attention_backend == "xformers":
        raise ArgumentsError("--attention-backend xformers takes no document mask; --sft-packing and "
                             "--reset-attention-mask need --attention-backend sdpa or eager")
    if (data.dpo_reference is not None or data.dpo_precompute_reference) and not data.dpo:
        raise ArgumentsError("--dpo-reference and --dpo-precompute-reference apply to --dpo only; drop them")
    if data.dpo:
        if document_flags or data.sft_packing:
            raise ArgumentsError(f"{', '.join(document_flags + ['--sft-packing'] * data.sft_packing)} do not apply "
                                 f"to --dpo; drop them")
        _check_dpo_data(config, given)
        return
    if data.sft:
        if document_flags:
            raise ArgumentsError(f"{', '.join(document_flags)} apply to pretraining; with --sft use --sft-packing")
        _check_sft_data(data, given)
        return
    if data.sft_packing or data.chat_template != DEFAULT_CHAT_TEMPLATE:
        raise ArgumentsError("--sft-packing and --chat-template apply to --sft (--chat-template also to --dpo) only; "
                             "add --sft or drop them")
    if document_flags and data.mock_data:
        raise ArgumentsError(f"{', '.join(document_flags)} find documents by their end-of-document tokens, which "
                             f"--mock-data has none of; give --data-path or drop them")
    if data.mock_data:
        if given:
            raise ArgumentsError(f"--mock-data and {', '.join(given)} were both given; choose one")
        return
    if not given:
        raise ArgumentsError("no training data: give --data-path (or --train-data-path), or --mock-data")
    if data.data_path and len(given) > 1:
        raise ArgumentsError("--data-path (split by --split) and --train/valid/test-data-path exclude each other; "
                             "give one or the other")
    if "--data-path" not in given and "--train-data-path" not in given:
        raise ArgumentsError("no training data: --valid/test-data-path need --train-data-path as well")
    if data.tokenizer_type is None:
        raise ArgumentsError("--data-path needs the tokenizer that made it: give --tokenizer-type and "
                             "--tokenizer-model")
    try:
        for flag, values in given.items():
            parse_data_path(values, flag)
        parse_split(data.split)
    except (ValueError, FileNotFoundError) as error:
        raise ArgumentsError(str(error)) from None


def _check_dpo_data(config: RunConfig, given: dict):
    """--dpo reads one jsonl file of preference pairs with the run's tokenizer (data/preference_dataset.py) and
    trains against a frozen reference (megatron_llama/objectives/dpo.py): --dpo-reference, else the weights it starts from."""
    data = config.data
    if data.sft:
        raise ArgumentsError("--sft and --dpo were both given; choose one")
    if data.mock_data or "--train-data-path" not in given or set(given) - {"--train-data-path", "--valid-data-path"}:
        raise ArgumentsError("--dpo takes --train-data-path FILE.jsonl (and --valid-data-path FILE.jsonl to evaluate "
                             "on); drop --mock-data, --data-path and --test-data-path")
    for flag, paths in given.items():
        if len(paths) > 1 or not os.path.isfile(paths[0]):
            raise ArgumentsError(f"--dpo reads one jsonl file per flag: {flag} {' '.join(paths)} is not one existing "
                                 f"file")
    if data.tokenizer_type is None:
        raise ArgumentsError("--dpo tokenizes the records: give --tokenizer-type and --tokenizer-model")
    if data.dpo_beta <= 0:
        raise ArgumentsError(f"--dpo-beta must be positive, got {data.dpo_beta}")
    if data.dpo_reference is not None and not os.path.isdir(data.dpo_reference):
        raise ArgumentsError(f"--dpo-reference {data.dpo_reference} is not a folder; give a checkpoint folder (a "
                             f"run's, or one iteration's: DIR/iter_NNNNNNN)")


def _check_sft_data(data: DataConfig, given: dict):
    """--sft reads one jsonl file per split with the run's tokenizer (data/sft_dataset.py)."""
    if data.mock_data or "--data-path" in given or "--test-data-path" in given:
        raise ArgumentsError("--sft takes --train-data-path FILE.jsonl (and --valid-data-path FILE.jsonl) only; "
                             "drop --mock-data, --data-path and --test-data-path")
    if "--train-data-path" not in given:
        raise ArgumentsError("--sft needs --train-data-path FILE.jsonl (or the PREFIX of tools/preprocess_sft.py)")
    for flag in ("--train-data-path", "--valid-data-path"):
        files = given.get(flag, [])
        if len(files) > 1:
            raise ArgumentsError(f"--sft reads one file per split but {flag} names {len(files)}; merge them")
        if files and not (os.path.isfile(files[0]) or dataset_exists(files[0])):
            raise ArgumentsError(f"{flag} {files[0]} does not exist (neither a jsonl file nor a PREFIX of "
                                 f"PREFIX.bin and PREFIX.idx)")
    if data.tokenizer_type is None:
        raise ArgumentsError("--sft tokenizes the records: give --tokenizer-type and --tokenizer-model")


def _check_checkpointing(config: RunConfig):
    checkpoint = config.checkpoint
    for flag, value in (("--save-interval", checkpoint.save_interval),
                        ("--exit-signal-handler", checkpoint.exit_signal_handler),
                        ("--async-save", checkpoint.async_save)):
        if value and checkpoint.save is None:
            raise ArgumentsError(f"{flag} needs --save DIR to write checkpoints to")
    if checkpoint.finetune and checkpoint.load is None:
        raise ArgumentsError("--finetune needs --load DIR holding the weights to start from")
    if checkpoint.ckpt_step is not None and (checkpoint.load is None or checkpoint.ckpt_step < 0):
        raise ArgumentsError(f"--ckpt-step {checkpoint.ckpt_step} needs --load DIR and an iteration >= 0")
    if checkpoint.load is not None and not os.path.isdir(checkpoint.load):
        raise ArgumentsError(f"--load {checkpoint.load} does not exist; check the path (or drop --load to start "
                             f"fresh)")


def _check_profiling(config: RunConfig):
    """--profile's iterations must lie in the run and its ranks exist; the trace needs a folder (metrics path set)."""
    logging, world_size = config.logging, config.parallel.world_size
    if not logging.profile:
        return
    start, end = logging.profile_step_start, logging.profile_step_end
    if start < 1 or end <= start:
        raise ArgumentsError(f"--profile-step-start {start} and --profile-step-end {end} must satisfy "
                             f"1 <= start < end (iterations start..end-1 are profiled)")
    if start > config.training.train_iters:
        raise ArgumentsError(f"--profile-step-start {start} is after the last iteration (--train-iters "
                             f"{config.training.train_iters}); no trace would be written")
    outside = [rank for rank in logging.profile_ranks if not 0 <= rank < world_size]
    if outside:
        raise ArgumentsError(f"--profile-ranks {' '.join(map(str, outside))} outside the {world_size} ranks of the "
                             f"run; give ranks 0..{world_size - 1}")
    if logging.tensorboard_dir is None and logging.metrics_path is None:
        raise ArgumentsError("--profile writes its trace into --tensorboard-dir, or beside the metrics file: give "
                             "--tensorboard-dir, --save or --metrics-path")


def _check_divergence_watch(config: RunConfig):
    training = config.training
    check_positive(training, "spike_reference_iters", "spikes_before_stop")
    for name in ("spiky_loss_factor", "large_grad_factor"):
        if not getattr(training, name) > 1:
            raise ArgumentsError(f"{flag_name(name)} must be above 1 (a spike is that many times the running median), "
                                 f"got {getattr(training, name)}")


def _check_output_paths(config: RunConfig):
    """Every path the run will write is writable, or can be created, before anything starts."""
    outputs = [("--save", config.checkpoint.save, True), ("--tensorboard-dir", config.logging.tensorboard_dir, True),
               ("--data-cache-path", config.data.data_cache_path, True),
               ("--metrics-path", config.logging.metrics_path, False)]
    for flag, path, is_folder in outputs:
        if path is not None:
            problem = unwritable_reason(path, is_folder)
            if problem is not None:
                raise ArgumentsError(f"{flag} {path}: {problem}; give a path this process can write")


def unwritable_reason(path: str, is_folder: bool) -> str | None:
    """Why this process cannot write the folder (or file) `path`, or None when it exists writable or can be created."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if is_folder != os.path.isdir(path):
            return "is a folder, not a file" if os.path.isdir(path) else "is a file, not a folder"
        if not os.access(path, os.W_OK | (os.X_OK if is_folder else 0)):
            return "is not writable"
        return None
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be created: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable"
    return None
