"""The parsed command line -> the run's frozen configuration: every derived value filled in once, every rule checked.

    config, notes, tokenizer = config_from_args(argv)

does the start-up's three steps in this order:
  1. arguments.parse_args(argv): the flags as given (argparse alone; no file opened).
  2. open_tokenizer(type, model): the tokenizer the flags name, or None; it gives the vocabulary and its hash.
  3. resolve(arguments, tokenizer, world_size): the frozen RunConfig and notes for the log.
A bad flag, combination or tokenizer raises ArgumentsError (config_checks.py) naming the flag and what to change,
before any model, dataset or process group is built. The --load checkpoint is opened afterwards (pretrain.py).

What `resolve` derives, here and nowhere else:
  model      --model-preset's values under the model flags given (without a preset --num-layers, --hidden-size
             and --num-attention-heads are required); --ffn-hidden-size: Llama's 8h/3 rounded up to a multiple of
             256; --max-position-embeddings: --seq-length; the vocabulary: the tokenizer's (--vocab-size must
             agree), else --vocab-size, else the preset's; --group-query-attention alone: one key/value head;
             --tie/--untie-embeddings-and-output-weights and --use-stable-embedding over the preset's choice.
  parallel   data-parallel size = world size / (tensor x pipeline size).
  training   the device of --device auto (cuda when torch sees a GPU); precision from --bf16/--fp16 (fp32 on a
             CPU, with a note); --compile-blocks, --cross-entropy-loss-fusion, --gradient-accumulation-fusion: on on
             CUDA, off on CPU unless given; global batch: micro-batch x data-parallel size; --lr-decay-iters:
             --train-iters; --recompute-num-layers: 1 with --recompute-granularity full; --fp8-recipe:
             tensorwise (a note says that a CPU emulates the fp8 GEMMs).
  data       the tokenizer's sha256 (data/tokenizer.tokenizer_hash).
  logging    the metrics file: metrics.jsonl in --save, else in --tensorboard-dir.
Then config_checks.check_config runs the rules over the whole configuration.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from megatron_llama.arguments import FIELDS_WITHOUT_OWN_FLAG, parse_args
from megatron_llama.config import (PRESETS, CheckpointConfig, DataConfig, LoggingConfig, ModelConfig,
                                   ParallelConfig, RunConfig, TrainingConfig)
from megatron_llama.config_checks import ArgumentsError, check_config, check_positive, flag_name
from megatron_llama.data.tokenizer import TokenizerError, build_tokenizer, tokenizer_hash
from megatron_llama.model.compile import default_on_cuda
from megatron_llama.parallel import world

# The model fields whose own flag overrides the preset's value when given (vocab_size is weighed against the
# tokenizer's instead).
MODEL_OVERRIDES = tuple(field.name for field in dataclasses.fields(ModelConfig)
                        if field.name not in FIELDS_WITHOUT_OWN_FLAG and field.name != "vocab_size")
FUSIONS = ("compile_blocks", "cross_entropy_loss_fusion", "gradient_accumulation_fusion")


def config_from_args(argv: list[str] | None = None) -> tuple[RunConfig, list[str], object | None]:
    """(the resolved RunConfig, notes for the log, the tokenizer or None) of command line `argv`: the three steps of
    the module docstring. Raises ArgumentsError."""
    arguments = parse_args(argv)
    tokenizer = open_tokenizer(arguments.tokenizer_type, arguments.tokenizer_model)
    config, notes = resolve(arguments, tokenizer, world.world_size())
    return config, notes, tokenizer


def open_tokenizer(tokenizer_type: str | None, tokenizer_model: str | None):
    """The tokenizer of --tokenizer-type and --tokenizer-model (None without them); ArgumentsError when only one is
    given or the tokenizer cannot be read."""
    if (tokenizer_type is None) != (tokenizer_model is None):
        raise ArgumentsError("--tokenizer-type and --tokenizer-model go together; give both or neither")
    if tokenizer_type is None:
        return None
    if not os.path.exists(tokenizer_model):
        raise ArgumentsError(f"--tokenizer-model {tokenizer_model} does not exist")
    try:
        return build_tokenizer(tokenizer_type, tokenizer_model)
    except TokenizerError as error:
        raise ArgumentsError(f"--tokenizer-model {tokenizer_model}: {error}") from None


def resolve(arguments: argparse.Namespace, tokenizer, world_size: int) -> tuple[RunConfig, list[str]]:
    """The frozen RunConfig of the parsed flags `arguments`, the opened `tokenizer` (or None) and the launched
    `world_size`, every derived value filled in (module docstring) and every rule checked; and notes for the log.
    Raises ArgumentsError."""
    notes: list[str] = []
    _check_precision_flags(arguments)
    model = _model(arguments, tokenizer)
    parallel = _parallel(arguments, world_size, notes)
    training = _training(arguments, parallel.data_parallel_size, notes)
    beside = arguments.save or arguments.tensorboard_dir  # metrics go beside the checkpoints, else the events
    metrics_path = arguments.metrics_path or (os.path.join(beside, "metrics.jsonl") if beside else None)
    config = RunConfig(model=model, parallel=parallel, training=training,
                       data=_section(DataConfig, arguments,
                                     tokenizer_hash=tokenizer_hash(tokenizer) if tokenizer is not None else None),
                       checkpoint=_section(CheckpointConfig, arguments),
                       logging=_section(LoggingConfig, arguments, metrics_path=metrics_path))
    check_config(config)
    return config, notes


def _section(section, arguments: argparse.Namespace, **derived):
    """A config dataclass from the flags named like its fields, and the `derived` values of the others."""
    given = {field.name: getattr(arguments, field.name) for field in dataclasses.fields(section)
             if field.name not in derived}
    return section(**given, **derived)


def default_ffn_hidden_size(hidden_size: int) -> int:
    """Llama's SwiGLU width: 8h/3 rounded up to a multiple of 256 (4096 -> 11008)."""
    return -(-(8 * hidden_size // 3) // 256) * 256


def _model(arguments: argparse.Namespace, tokenizer) -> ModelConfig:
    preset = arguments.model_preset
    values = dict(PRESETS[preset]) if preset else {}
    if not preset:
        missing = [flag_name(name) for name in ("num_layers", "hidden_size", "num_attention_heads")
                   if getattr(arguments, name) is None]
        if missing:
            raise ArgumentsError(f"{', '.join(missing)} required without --model-preset "
                                 f"(presets: {', '.join(sorted(PRESETS))})")
    values.update({name: getattr(arguments, name) for name in MODEL_OVERRIDES if getattr(arguments, name) is not None})
    values["vocab_size"] = _vocab_size(arguments, tokenizer, values.get("vocab_size"))
    if arguments.group_query_attention and values.get("num_query_groups") is None:
        values["num_query_groups"] = 1  # Megatron's default: one key/value head (multi-query attention)
    if arguments.untie_embeddings_and_output_weights and arguments.tie_embeddings_and_output_weights:
        raise ArgumentsError("--untie-embeddings-and-output-weights and --tie-embeddings-and-output-weights "
                             "were both given; choose one")
    if arguments.untie_embeddings_and_output_weights or arguments.tie_embeddings_and_output_weights:
        values["untie_embeddings_and_output_weights"] = arguments.untie_embeddings_and_output_weights
    if arguments.use_stable_embedding:
        values["use_stable_embedding"] = True
    values.setdefault("ffn_hidden_size", default_ffn_hidden_size(values["hidden_size"]))
    values.setdefault("max_position_embeddings", arguments.seq_length)
    return ModelConfig(**values)


def _vocab_size(arguments: argparse.Namespace, tokenizer, preset_vocab_size: int | None) -> int:
    """The tokenizer's vocabulary size (--vocab-size must agree), else --vocab-size, else the preset's."""
    check_positive(arguments, "vocab_size")
    given = arguments.vocab_size
    if tokenizer is not None:
        if given is not None and given != tokenizer.vocab_size:
            raise ArgumentsError(f"--vocab-size {given} disagrees with the tokenizer {arguments.tokenizer_model} "
                                 f"({tokenizer.vocab_size} entries); drop --vocab-size")
        return tokenizer.vocab_size
    if given is None and preset_vocab_size is None:
        raise ArgumentsError("the vocabulary size is unknown: give --tokenizer-type and --tokenizer-model, "
                             "or --vocab-size, or a --model-preset")
    return given if given is not None else preset_vocab_size


def _parallel(arguments: argparse.Namespace, world_size: int, notes: list[str]) -> ParallelConfig:
    check_positive(arguments, "tensor_model_parallel_size", "pipeline_model_parallel_size", "ddp_bucket_size",
                   "num_layers_per_virtual_pipeline_stage", "distributed_timeout_minutes")
    tp, pp = arguments.tensor_model_parallel_size, arguments.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ArgumentsError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                             f"--pipeline-model-parallel-size {pp} = {tp * pp}; launch a multiple of "
                             f"{tp * pp} processes (torchrun --nproc_per_node) or change the parallel sizes")
    if arguments.sequence_parallel and tp == 1:
        notes.append("--sequence-parallel has no effect at --tensor-model-parallel-size 1")
    return _section(ParallelConfig, arguments, data_parallel_size=world_size // (tp * pp))


def _check_precision_flags(arguments: argparse.Namespace):
    if arguments.bf16 and arguments.fp16:
        raise ArgumentsError("--bf16 and --fp16 were both given; choose one")
    if arguments.fp8_format is not None and arguments.fp16:
        raise ArgumentsError("--fp8-format cannot be combined with --fp16: the fp8 GEMMs take and return bf16 "
                             "(use --bf16 with --fp8-format, or drop --fp8-format)")
    if arguments.fp8_recipe is not None and arguments.fp8_format is None:
        raise ArgumentsError(f"--fp8-recipe {arguments.fp8_recipe} applies to fp8 training only; add --fp8-format "
                             f"(e4m3 or hybrid) or drop --fp8-recipe")
    if arguments.loss_scale is not None and not arguments.fp16:
        raise ArgumentsError("--loss-scale applies only to --fp16 training; drop it or add --fp16")
    check_positive(arguments, "loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window",
                   "hysteresis")
    if arguments.min_loss_scale > arguments.initial_loss_scale:
        raise ArgumentsError(f"--min-loss-scale {arguments.min_loss_scale} is above --initial-loss-scale "
                             f"{arguments.initial_loss_scale}")


def _device(requested: str) -> str:
    """cpu or cuda for --device; a cuda run needs a GPU for this process's LOCAL_RANK."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ArgumentsError("--device cuda was given but torch sees no CUDA GPU; use --device cpu or auto")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested == "cuda" and local_rank >= torch.cuda.device_count():
        raise ArgumentsError(f"process LOCAL_RANK {local_rank} has no GPU of its own: torch sees "
                             f"{torch.cuda.device_count()} on this node; launch at most that many processes per "
                             f"node (torchrun --nproc_per_node)")
    return requested


def _training(arguments: argparse.Namespace, data_parallel_size: int, notes: list[str]) -> TrainingConfig:
    device = _device(arguments.device)
    precision = "bf16" if arguments.bf16 else "fp16" if arguments.fp16 else "fp32"
    if device == "cpu" and precision != "fp32":
        notes.append(f"--{precision} ignored: a CPU run trains in fp32 (mixed precision is for GPUs)")
        precision = "fp32"
    derived = {name: default_on_cuda(getattr(arguments, name), device) for name in FUSIONS}
    if arguments.global_batch_size is None:
        derived["global_batch_size"] = arguments.micro_batch_size * data_parallel_size
    if arguments.lr_decay_iters is None:
        derived["lr_decay_iters"] = arguments.train_iters
    if arguments.recompute_granularity == "full" and arguments.recompute_num_layers is None:
        derived["recompute_num_layers"] = 1
    if arguments.fp8_recipe is None:
        derived["fp8_recipe"] = TrainingConfig.fp8_recipe
    if arguments.fp8_format is not None and device == "cpu":
        notes.append(f"--fp8-format {arguments.fp8_format}: the CPU has no FP8 GEMMs, so they are emulated (operands "
                     f"cast to fp8 with the GPU's scales, products in fp32)")
    return _section(TrainingConfig, arguments, device=device, precision=precision, **derived)
