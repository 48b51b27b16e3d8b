"""Command-line arguments of the trainer (Megatron-LM's flag names) and every check of a bad combination.

    python -m megatron_llama.pretrain --model-preset tiny --seq-length 128 --micro-batch-size 4 \\
        --global-batch-size 16 --train-iters 200 --lr 3e-4 --data-path data/corpus_text_document \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model --save ckpt

    torchrun --nproc_per_node 4 -m megatron_llama.pretrain --tensor-model-parallel-size 2 \\
        --sequence-parallel ...        # 4 processes: tp 2, data-parallel 2

`parse_args(argv)` returns an argparse.Namespace with the flags plus derived values:
`model_config` (ModelConfig), `device`, `params_dtype`, `world_size`, `data_parallel_size`,
`num_micro_batches`, `virtual_pipeline_model_parallel_size` (model chunks per rank, None without
interleaving), `lr_decay_iters`, `metrics_path` and `notes` (messages for the log); `stage_split(args)` gives
the pipeline split of a namespace or of a checkpoint's args.json. Every check
runs here, before any model, dataset or process group is built; a failure raises ArgumentsError
whose message names the flag and the numbers and says what to change.

Parallel layout: the world size (WORLD_SIZE from torchrun, or the started default process group)
must be a multiple of tensor x pipeline parallel size; data-parallel size = world / (tp x pp).
Tensor parallelism needs attention heads, key/value heads and --ffn-hidden-size divisible by tp
(`tensor_parallel_misfit`, also used when checkpoints are split), and --sequence-parallel needs
--seq-length divisible by tp. Pipeline parallelism: the blocks must split over the stages
(parallel/stages.split_layers: evenly, or with --decoder-first/last-pipeline-num-layers, or in chunks of
--num-layers-per-virtual-pipeline-stage), and the micro-batches per step must suit the schedule
(parallel/pipeline.check_micro_batch_count: interleaving needs a multiple of pp). Data parallelism:
--overlap-param-gather needs --use-distributed-optimizer. Recompute: --recompute-method and
--recompute-num-layers go with --recompute-granularity full, which needs a method.

Model shape: `--model-preset NAME` (megatron_llama.config.PRESETS) gives every model value; explicit
flags override it. Without a preset --num-layers, --hidden-size and --num-attention-heads are
required; --ffn-hidden-size then defaults to Llama's rule (8h/3 rounded up to a multiple of 256).

Choices that differ from Megatron-LM's defaults (documented in --help too):
  * Output head: untied from the input embedding unless the preset ties it (Open-Llama presets do);
    --untie-embeddings-and-output-weights forces untied, --tie-embeddings-and-output-weights tied.
  * --num-query-groups N turns grouped-query attention on by itself (Megatron needs
    --group-query-attention as well; the pair is accepted).
  * Precision: --bf16/--fp16 on a CPU run trains in fp32 and says so (CPU kernels for half precision
    are slow and the tests need exact fp32).
  * Vocabulary: from the tokenizer (--tokenizer-type/--tokenizer-model); else --vocab-size; else the
    preset's. --vocab-size that disagrees with the tokenizer is an error.
  * --load DIR: DIR must exist. A DIR without any checkpoint is accepted only when it is also the
    --save directory (the "resume in place" pattern: the first run starts from scratch).
"""
from __future__ import annotations

import argparse
import os

import torch

from megatron_llama.config import PRESETS, ModelConfig
from megatron_llama.optim.lr_schedule import DECAY_STYLES

ATTENTION_BACKENDS = ("sdpa", "xformers", "eager")
MODEL_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "max_position_embeddings", "make_vocab_size_divisible_by", "rotary_base", "norm_epsilon",
               "init_method_std", "attention_backend")


class ArgumentsError(ValueError):
    """A bad flag or combination of flags; the message says what to change."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_llama.pretrain",
                                     description="Pretrain a Llama model (Megatron-LM flag names).")
    model = parser.add_argument_group("model")
    model.add_argument("--model-preset", choices=sorted(PRESETS), help="start from a named model; flags override it")
    model.add_argument("--num-layers", type=int)
    model.add_argument("--hidden-size", type=int)
    model.add_argument("--ffn-hidden-size", type=int, help="default: 8h/3 rounded up to a multiple of 256")
    model.add_argument("--num-attention-heads", type=int)
    model.add_argument("--group-query-attention", action="store_true",
                       help="use grouped-query attention (implied by --num-query-groups)")
    model.add_argument("--num-query-groups", type=int, help="key/value heads; turns on grouped-query attention")
    model.add_argument("--seq-length", type=int, required=True)
    model.add_argument("--max-position-embeddings", type=int, help="default: the preset's, else --seq-length")
    model.add_argument("--vocab-size", type=int, help="needed only without a tokenizer and preset")
    model.add_argument("--make-vocab-size-divisible-by", type=int)
    model.add_argument("--rotary-base", type=float)
    model.add_argument("--norm-epsilon", type=float)
    model.add_argument("--init-method-std", type=float)
    model.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                       help="separate output head (the default unless the preset ties them)")
    model.add_argument("--tie-embeddings-and-output-weights", action="store_true",
                       help="output head shares the input embedding (Open-Llama)")
    model.add_argument("--use-stable-embedding", action="store_true",
                       help="LayerNorm right after the token embedding (Open-Llama)")
    model.add_argument("--attention-backend", choices=ATTENTION_BACKENDS)
    model.add_argument("--compile-blocks", action=argparse.BooleanOptionalAction, help="torch.compile the blocks' elementwise regions (default: on CUDA, off on CPU)")
    model.add_argument("--gradient-accumulation-fusion", action=argparse.BooleanOptionalAction, help="weight-gradient GEMMs accumulate into the fp32 main grads (default: on CUDA, off on CPU)")

    train = parser.add_argument_group("training")
    train.add_argument("--micro-batch-size", type=int, required=True)
    train.add_argument("--global-batch-size", type=int, help="default: micro-batch size x data-parallel size")
    train.add_argument("--train-iters", type=int, required=True)
    train.add_argument("--lr", type=float, required=True)
    train.add_argument("--min-lr", type=float, default=0.0)
    train.add_argument("--lr-decay-style", choices=DECAY_STYLES, default="cosine")
    train.add_argument("--lr-warmup-iters", type=int, default=0)
    train.add_argument("--lr-warmup-init", type=float, default=0.0)
    train.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm limit; 0 turns clipping off")
    train.add_argument("--adam-beta1", type=float, default=0.9)
    train.add_argument("--adam-beta2", type=float, default=0.999)
    train.add_argument("--adam-eps", type=float, default=1e-8)
    train.add_argument("--bf16", action="store_true", help="bf16 model weights, fp32 main grads and master params")
    train.add_argument("--fp16", action="store_true", help="fp16 model weights with dynamic loss scaling")
    train.add_argument("--loss-scale", type=float, help="constant fp16 loss scale instead of a dynamic one")
    train.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    train.add_argument("--min-loss-scale", type=float, default=1.0)
    train.add_argument("--loss-scale-window", type=int, default=1000, help="clean steps before the scale doubles")
    train.add_argument("--hysteresis", type=int, default=2, help="overflows tolerated before the scale halves")
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: cuda when available, else cpu")

    data = parser.add_argument_group("data")
    data.add_argument("--data-path", nargs="*", help="PREFIX, or WEIGHT PREFIX WEIGHT PREFIX ... (blended)")
    data.add_argument("--train-data-path", nargs="*")
    data.add_argument("--valid-data-path", nargs="*")
    data.add_argument("--test-data-path", nargs="*")
    data.add_argument("--split", default="969,30,1", help="train,valid,test proportions of --data-path")
    data.add_argument("--data-cache-path", help="where index files are cached (default: beside the data)")
    data.add_argument("--sft", action="store_true",
                      help="instruction tuning: --train-data-path (and --valid-data-path) name one jsonl file of "
                           "{prompt, response} or {messages} records; the loss covers response tokens only")
    data.add_argument("--mock-data", action="store_true", help="random tokens instead of a corpus (smoke tests)")
    data.add_argument("--tokenizer-type", choices=("SentencePieceTokenizer", "HuggingFaceTokenizer"))
    data.add_argument("--tokenizer-model")

    checkpoint = parser.add_argument_group("checkpoints")
    checkpoint.add_argument("--save", help="checkpoint directory")
    checkpoint.add_argument("--load", help="resume from the newest checkpoint in this directory")
    checkpoint.add_argument("--finetune", action="store_true",
                            help="load only the model weights from --load; start at iteration 0")
    checkpoint.add_argument("--save-interval", type=int)
    checkpoint.add_argument("--exit-interval", type=int, help="save (with --save) and exit when iteration %% N == 0")
    checkpoint.add_argument("--exit-signal-handler", action="store_true",
                            help="on SIGTERM, save a checkpoint after the current iteration and exit")

    logging = parser.add_argument_group("logging and evaluation")
    logging.add_argument("--log-interval", type=int, default=100)
    logging.add_argument("--tensorboard-dir")
    logging.add_argument("--metrics-path",
                         help="JSON-lines metrics file (default: metrics.jsonl in --save, else in --tensorboard-dir)")
    logging.add_argument("--eval-interval", type=int, default=1000)
    logging.add_argument("--eval-iters", type=int, default=100, help="global batches per evaluation; 0: no evaluation")

    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parallel.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parallel.add_argument("--sequence-parallel", action="store_true",
                          help="norms and residuals on sequence shards across tensor ranks (Korthikanti et al. "
                               "2022); needs --seq-length divisible by --tensor-model-parallel-size")
    parallel.add_argument("--num-layers-per-virtual-pipeline-stage", type=int,
                          help="blocks per model chunk: each pipeline rank holds several chunks (interleaved 1F1B)")
    parallel.add_argument("--decoder-first-pipeline-num-layers", type=int,
                          help="blocks on the first pipeline stage (uneven split; the others share the rest)")
    parallel.add_argument("--decoder-last-pipeline-num-layers", type=int,
                          help="blocks on the last pipeline stage (uneven split; the others share the rest)")
    parallel.add_argument("--ddp-bucket-size", type=int, default=40_000_000,
                          help="elements per data-parallel gradient bucket (one collective each)")
    parallel.add_argument("--overlap-grad-reduce", action="store_true",
                          help="start each bucket's data-parallel reduction as soon as its gradients are ready")
    parallel.add_argument("--use-distributed-optimizer", action="store_true",
                          help="shard fp32 master params and Adam states over data-parallel ranks (ZeRO-1)")
    parallel.add_argument("--overlap-param-gather", action="store_true",
                          help="all-gather updated params behind the next forward (needs --use-distributed-optimizer)")

    recompute = parser.add_argument_group("activation recompute")
    recompute.add_argument("--recompute-granularity", choices=("full", "selective"),
                           help="full: whole blocks (with --recompute-method); selective: the attention core only")
    recompute.add_argument("--recompute-method", choices=("uniform", "block"),
                           help="uniform: every block in groups of --recompute-num-layers; block: the first N blocks")
    recompute.add_argument("--recompute-num-layers", type=int)
    return parser


def stage_split(args):
    """The pipeline stage split (parallel/stages.StageSplit) of an argparse namespace or a checkpoint's args dict."""
    from megatron_llama.parallel.stages import split_layers

    values = args if isinstance(args, dict) else vars(args)
    num_layers = values["model"]["num_layers"] if isinstance(args, dict) else args.model_config.num_layers
    return split_layers(num_layers, int(values.get("pipeline_model_parallel_size") or 1),
                        layers_per_virtual_stage=values.get("num_layers_per_virtual_pipeline_stage"),
                        first_stage_layers=values.get("decoder_first_pipeline_num_layers"),
                        last_stage_layers=values.get("decoder_last_pipeline_num_layers"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; raises ArgumentsError (argparse itself exits on unknown flags)."""
    args = build_parser().parse_args(argv)
    args.notes = []
    _check_parallel_layout(args)
    _check_precision_and_device(args)
    _check_vocabulary(args)
    args.model_config = _model_config(args)
    _check_model(args)
    _check_batches(args)
    _check_pipeline(args)
    _check_data_parallel_and_recompute(args)
    _check_schedule(args)
    _check_data(args)
    _check_checkpointing(args)
    return args


def _positive(args, *names: str):
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ArgumentsError(f"--{name.replace('_', '-')} must be positive, got {value}")


def launched_world_size() -> int:
    """Processes of this run: the started default process group's size, else torchrun's WORLD_SIZE, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_parallel_layout(args):
    _positive(args, "tensor_model_parallel_size", "pipeline_model_parallel_size")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    world_size = launched_world_size()
    model_parallel = tp * pp
    if world_size % model_parallel:
        raise ArgumentsError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                             f"--pipeline-model-parallel-size {pp} = {model_parallel}; launch a multiple of "
                             f"{model_parallel} processes (torchrun --nproc_per_node) or change the parallel sizes")
    args.world_size = world_size
    args.data_parallel_size = world_size // model_parallel
    if args.sequence_parallel and tp == 1:
        args.notes.append("--sequence-parallel has no effect at --tensor-model-parallel-size 1")


def _check_precision_and_device(args):
    if args.bf16 and args.fp16:
        raise ArgumentsError("--bf16 and --fp16 were both given; choose one")
    if args.loss_scale is not None and not args.fp16:
        raise ArgumentsError("--loss-scale applies only to --fp16 training; drop it or add --fp16")
    _positive(args, "loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis")
    if args.min_loss_scale > args.initial_loss_scale:
        raise ArgumentsError(f"--min-loss-scale {args.min_loss_scale} is above --initial-loss-scale "
                             f"{args.initial_loss_scale}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise ArgumentsError("--device cuda was given but torch sees no CUDA GPU; use --device cpu or auto")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda" and local_rank >= torch.cuda.device_count():
        raise ArgumentsError(f"process LOCAL_RANK {local_rank} has no GPU of its own: torch sees "
                             f"{torch.cuda.device_count()} on this node; launch at most that many processes per "
                             f"node (torchrun --nproc_per_node)")
    args.params_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    if args.device == "cpu" and args.params_dtype != torch.float32:
        flag = "--bf16" if args.bf16 else "--fp16"
        args.notes.append(f"{flag} ignored: a CPU run trains in fp32 (mixed precision is for GPUs)")
        args.params_dtype = torch.float32
        args.bf16 = args.fp16 = False


def _check_vocabulary(args):
    if (args.tokenizer_type is None) != (args.tokenizer_model is None):
        raise ArgumentsError("--tokenizer-type and --tokenizer-model go together; give both or neither")
    args.tokenizer = None
    if args.tokenizer_type is not None:
        if not os.path.exists(args.tokenizer_model):
            raise ArgumentsError(f"--tokenizer-model {args.tokenizer_model} does not exist")
        from megatron_llama.data.tokenizer import build_tokenizer

        args.tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
        if args.vocab_size is not None and args.vocab_size != args.tokenizer.vocab_size:
            raise ArgumentsError(f"--vocab-size {args.vocab_size} disagrees with the tokenizer "
                                 f"{args.tokenizer_model} ({args.tokenizer.vocab_size} entries); drop --vocab-size")
        args.vocab_size = args.tokenizer.vocab_size
    elif args.vocab_size is None and args.model_preset is None:
        raise ArgumentsError("the vocabulary size is unknown: give --tokenizer-type and --tokenizer-model, "
                             "or --vocab-size, or a --model-preset")
    _positive(args, "vocab_size")


def default_ffn_hidden_size(hidden_size: int) -> int:
    """Llama's SwiGLU width: 8h/3 rounded up to a multiple of 256 (4096 -> 11008)."""
    return -(-(8 * hidden_size // 3) // 256) * 256


def _model_config(args) -> ModelConfig:
    values = dict(PRESETS[args.model_preset]) if args.model_preset else {}
    if not args.model_preset:
        missing = [f"--{name.replace('_', '-')}" for name in ("num_layers", "hidden_size", "num_attention_heads")
                   if getattr(args, name) is None]
        if missing:
            raise ArgumentsError(f"{', '.join(missing)} required without --model-preset "
                                 f"(presets: {', '.join(sorted(PRESETS))})")
    for name in MODEL_FLAGS:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.vocab_size is not None:
        values["vocab_size"] = args.vocab_size
    if args.group_query_attention and values.get("num_query_groups") is None:
        values["num_query_groups"] = 1  # Megatron's default: one key/value head (multi-query attention)
    if args.untie_embeddings_and_output_weights and args.tie_embeddings_and_output_weights:
        raise ArgumentsError("--untie-embeddings-and-output-weights and --tie-embeddings-and-output-weights "
                             "were both given; choose one")
    if args.untie_embeddings_and_output_weights:
        values["untie_embeddings_and_output_weights"] = True
    if args.tie_embeddings_and_output_weights:
        values["untie_embeddings_and_output_weights"] = False
    if args.use_stable_embedding:
        values["use_stable_embedding"] = True
    if "ffn_hidden_size" not in values:
        values["ffn_hidden_size"] = default_ffn_hidden_size(values["hidden_size"])
    if "max_position_embeddings" not in values:
        values["max_position_embeddings"] = args.seq_length
    return ModelConfig(**values)


def _check_model(args):
    config = args.model_config
    _positive(args, "seq_length")
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                 "max_position_embeddings", "make_vocab_size_divisible_by"):
        if getattr(config, name) <= 0:
            raise ArgumentsError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    if config.num_query_groups is not None and config.num_query_groups <= 0:
        raise ArgumentsError(f"--num-query-groups must be positive, got {config.num_query_groups}")
    heads, groups = config.num_attention_heads, config.kv_heads
    if config.hidden_size % heads:
        raise ArgumentsError(f"--hidden-size {config.hidden_size} is not divisible by --num-attention-heads {heads}; "
                             f"use a multiple of {heads}")
    if heads % groups:
        raise ArgumentsError(f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}; "
                             f"use a number of query groups that divides {heads}")
    if config.head_dim % 2:
        raise ArgumentsError(f"head dimension {config.head_dim} (--hidden-size / --num-attention-heads) must be "
                             f"even for rotary embeddings")
    tp = args.tensor_model_parallel_size
    misfit = tensor_parallel_misfit(config, tp)
    if misfit:
        raise ArgumentsError(misfit)
    if args.sequence_parallel and args.seq_length % tp:
        raise ArgumentsError(f"--sequence-parallel splits the sequence across tensor ranks: --seq-length "
                             f"{args.seq_length} is not divisible by --tensor-model-parallel-size {tp}; use a "
                             f"multiple of {tp} or drop --sequence-parallel")
    if args.seq_length > config.max_position_embeddings:
        raise ArgumentsError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                             f"{config.max_position_embeddings}; raise --max-position-embeddings or shorten "
                             f"the sequence")
    if config.attention_backend == "xformers" and args.device == "cpu":
        raise ArgumentsError("--attention-backend xformers has no CPU kernels; use --attention-backend sdpa")


def tensor_parallel_misfit(config: ModelConfig, tensor_parallel_size: int,
                           flag: str = "--tensor-model-parallel-size") -> str | None:
    """Why `config` cannot be split `tensor_parallel_size` ways (heads, key/value heads, ffn), or None."""
    tp = tensor_parallel_size
    sizes = (("attention heads (--num-attention-heads)", config.num_attention_heads),
             ("key/value heads (--num-query-groups)", config.kv_heads),
             ("--ffn-hidden-size", config.ffn_hidden_size))
    misfits = [f"{what} {value}" for what, value in sizes if value % tp]
    if not misfits:
        return None
    return (f"{' and '.join(misfits)} {'is' if len(misfits) == 1 else 'are'} not divisible by {flag} {tp}: each "
            f"tensor rank holds 1/{tp} of them; choose a {flag} that divides "
            f"{', '.join(str(value) for _, value in sizes)}")


def _check_batches(args):
    _positive(args, "micro_batch_size", "global_batch_size", "train_iters")
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.global_batch_size % per_step:
        raise ArgumentsError(f"global batch {args.global_batch_size} is not divisible by micro-batch "
                             f"{args.micro_batch_size} x data-parallel {args.data_parallel_size} = {per_step}; "
                             f"use a multiple of {per_step}")
    args.num_micro_batches = args.global_batch_size // per_step


def _check_pipeline(args):
    """Stage split and micro-batch count of the pipeline schedule; sets args.virtual_pipeline_model_parallel_size."""
    from megatron_llama.parallel.pipeline import check_micro_batch_count

    _positive(args, "num_layers_per_virtual_pipeline_stage")
    try:
        split = stage_split(args)
        check_micro_batch_count(args.num_micro_batches, split.pipeline_size, split.num_chunks)
    except ValueError as error:
        raise ArgumentsError(str(error)) from None
    args.virtual_pipeline_model_parallel_size = split.num_chunks if split.num_chunks > 1 else None


def _check_data_parallel_and_recompute(args):
    _positive(args, "ddp_bucket_size", "recompute_num_layers")
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ArgumentsError("--overlap-param-gather overlaps the all-gather of the distributed optimizer's "
                             "updated params; add --use-distributed-optimizer or drop --overlap-param-gather")
    if args.recompute_granularity != "full":
        given = [flag for flag, value in (("--recompute-method", args.recompute_method),
                                          ("--recompute-num-layers", args.recompute_num_layers)) if value is not None]
        if given:
            raise ArgumentsError(f"{' and '.join(given)} apply to --recompute-granularity full only (got "
                                 f"{args.recompute_granularity}); add --recompute-granularity full or drop them")
    elif args.recompute_method is None:
        raise ArgumentsError("--recompute-granularity full needs --recompute-method uniform (every block, in groups "
                             "of --recompute-num-layers) or block (the first --recompute-num-layers blocks)")
    elif args.recompute_num_layers is None:
        args.recompute_num_layers = 1


def _check_schedule(args):
    _positive(args, "lr", "lr_decay_iters", "log_interval", "eval_interval", "save_interval", "exit_interval")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.min_lr < 0 or args.min_lr > args.lr:
        raise ArgumentsError(f"--min-lr {args.min_lr} must lie between 0 and --lr {args.lr}")
    if args.lr_warmup_iters < 0:
        raise ArgumentsError(f"--lr-warmup-iters must not be negative, got {args.lr_warmup_iters}")
    if args.lr_decay_style != "constant" and args.lr_warmup_iters >= args.lr_decay_iters:
        raise ArgumentsError(f"--lr-warmup-iters {args.lr_warmup_iters} must be below --lr-decay-iters "
                             f"{args.lr_decay_iters} (default --train-iters) for {args.lr_decay_style} decay")
    if args.weight_decay < 0 or args.clip_grad < 0 or args.eval_iters < 0:
        raise ArgumentsError("--weight-decay, --clip-grad and --eval-iters must not be negative")
    if not (0 <= args.adam_beta1 < 1 and 0 <= args.adam_beta2 < 1):
        raise ArgumentsError(f"--adam-beta1 {args.adam_beta1} and --adam-beta2 {args.adam_beta2} must lie in [0, 1)")


def _check_data(args):
    from megatron_llama.data.blended_dataset import parse_data_path
    from megatron_llama.data.gpt_dataset import parse_split

    sources = {flag: getattr(args, flag[2:].replace("-", "_"))
               for flag in ("--data-path", "--train-data-path", "--valid-data-path", "--test-data-path")}
    given = {flag: values for flag, values in sources.items() if values}
    if args.sft:
        _check_sft_data(args, given)
        return
    if args.mock_data:
        if given:
            raise ArgumentsError(f"--mock-data and {', '.join(given)} were both given; choose one")
        return
    if not given:
        raise ArgumentsError("no training data: give --data-path (or --train-data-path), or --mock-data")
    if args.data_path and len(given) > 1:
        raise ArgumentsError("--data-path (split by --split) and --train/valid/test-data-path exclude each other; "
                             "give one or the other")
    if "--data-path" not in given and "--train-data-path" not in given:
        raise ArgumentsError("no training data: --valid/test-data-path need --train-data-path as well")
    if args.tokenizer is None:
        raise ArgumentsError("--data-path needs the tokenizer that made it: give --tokenizer-type and "
                             "--tokenizer-model")
    try:
        for flag, values in given.items():
            parse_data_path(values, flag)
        parse_split(args.split)
    except (ValueError, FileNotFoundError) as error:
        raise ArgumentsError(str(error)) from None


def _check_sft_data(args, given: dict):
    """--sft reads one jsonl file per split with the run's tokenizer (data/sft_dataset.py)."""
    if args.mock_data or "--data-path" in given or "--test-data-path" in given:
        raise ArgumentsError("--sft takes --train-data-path FILE.jsonl (and --valid-data-path FILE.jsonl) only; "
                             "drop --mock-data, --data-path and --test-data-path")
    if "--train-data-path" not in given:
        raise ArgumentsError("--sft needs --train-data-path FILE.jsonl")
    for flag in ("--train-data-path", "--valid-data-path"):
        files = given.get(flag, [])
        if len(files) > 1:
            raise ArgumentsError(f"--sft reads one file per split but {flag} names {len(files)}; merge them")
        if files and not os.path.isfile(files[0]):
            raise ArgumentsError(f"{flag} {files[0]} does not exist")
    if args.tokenizer is None:
        raise ArgumentsError("--sft tokenizes the records: give --tokenizer-type and --tokenizer-model")


def _check_checkpointing(args):
    from megatron_llama.checkpointing import CheckpointError, open_checkpoint

    for flag, value in (("--save-interval", args.save_interval), ("--exit-signal-handler", args.exit_signal_handler)):
        if value and args.save is None:
            raise ArgumentsError(f"{flag} needs --save DIR to write checkpoints to")
    beside = args.save or args.tensorboard_dir  # metrics go beside the checkpoints, else beside the events
    args.metrics_path = args.metrics_path or (os.path.join(beside, "metrics.jsonl") if beside else None)
    args.resume_from = None
    if args.finetune and args.load is None:
        raise ArgumentsError("--finetune needs --load DIR holding the weights to start from")
    if args.load is None:
        return
    if not os.path.isdir(args.load):
        raise ArgumentsError(f"--load {args.load} does not exist; check the path (or drop --load to start fresh)")
    empty = not any(name.startswith("iter_") or name.endswith(".txt") for name in os.listdir(args.load))
    if empty and args.save is not None and os.path.abspath(args.save) == os.path.abspath(args.load):
        args.notes.append(f"no checkpoint in {args.load} yet: starting from iteration 0")
        return
    try:
        folder, saved_args, meta = open_checkpoint(args.load)
    except CheckpointError as error:
        raise ArgumentsError(f"--load {args.load}: {error}") from None
    _check_same_model(folder, saved_args, args.model_config)
    if not (args.finetune or meta.get("model_only")):
        _check_same_layout(folder, saved_args, args)
    args.resume_from = folder


def _check_same_layout(folder: str, saved_args: dict, args):
    """A full resume restores per-rank optimizer and RNG states: the run needs the checkpoint's layout."""
    from megatron_llama.checkpointing import parallel_sizes

    saved = parallel_sizes(saved_args)
    this_run = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.data_parallel_size)
    if saved[:2] != this_run[:2]:
        raise ArgumentsError(f"--load {folder} was saved with tensor/pipeline/data-parallel sizes {saved} but this "
                             f"run has {this_run}; resume with the same tensor and pipeline sizes (the data-parallel "
                             f"size may change), or pass --finetune to load only the weights into the new layout")
    if bool(saved_args.get("use_distributed_optimizer")) != args.use_distributed_optimizer:
        used = "with" if saved_args.get("use_distributed_optimizer") else "without"
        raise ArgumentsError(f"--load {folder} was saved {used} --use-distributed-optimizer, whose optimizer state "
                             f"has another format; resume {used} it, or pass --finetune to load only the weights")
    saved_split = stage_split(saved_args).ranges
    if saved_split != stage_split(args).ranges:
        raise ArgumentsError(f"--load {folder} splits the blocks over pipeline ranks as {saved_split} but this run "
                             f"as {stage_split(args).ranges}; use the checkpoint's --num-layers-per-virtual-"
                             f"pipeline-stage / --decoder-first/last-pipeline-num-layers, or pass --finetune")


def _check_same_model(folder: str, saved_args: dict, config: ModelConfig):
    """The checkpoint's model must have this run's shape; name each differing value."""
    saved = saved_args["model"]
    shape_fields = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                    "vocab_size", "make_vocab_size_divisible_by", "untie_embeddings_and_output_weights",
                    "use_stable_embedding")
    differences = [f"{name}: checkpoint {saved.get(name)!r}, this run {getattr(config, name)!r}"
                   for name in shape_fields if saved.get(name) != getattr(config, name)]
    if differences:
        raise ArgumentsError(f"--load {folder} holds a different model ({'; '.join(differences)}); "
                             f"change the model flags to match the checkpoint, or load another checkpoint")
