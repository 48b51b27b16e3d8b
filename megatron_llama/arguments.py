"""Command-line arguments of the trainer (Megatron-LM's flag names) -> the run's typed configuration (config.py).

    python -m megatron_llama.pretrain --model-preset tiny --seq-length 128 --micro-batch-size 4 \\
        --global-batch-size 16 --train-iters 200 --lr 3e-4 --data-path data/corpus_text_document \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model --save ckpt

    torchrun --nproc_per_node 4 -m megatron_llama.pretrain --tensor-model-parallel-size 2 \\
        --sequence-parallel ...        # 4 processes: tp 2, data-parallel 2

`parse_args(argv)` returns `(RunConfig, notes)`: every flag mapped onto its field of config.py's dataclasses (each
field is named after its flag), derived values filled in (data-parallel size, global batch, lr decay iterations,
metrics path, the device of --device auto, the model's values from --model-preset), and `notes`, messages for the
log. Parsing opens no file: it only checks that the named paths exist. The tokenizer (and with it the vocabulary
size, when --vocab-size is not given) and the checkpoint of --load are opened by the run's setup (pretrain.py).
Every check of a bad combination runs here (the rules over the whole configuration in config_checks.py), before
any model, dataset or process group is built; a failure raises ArgumentsError whose message names the flag and the
numbers and says what to change.

Parallel layout: the world size (WORLD_SIZE from torchrun, or the started default process group) must be a
multiple of tensor x pipeline parallel size; data-parallel size = world / (tp x pp). The model must split over
the tensor ranks (ModelConfig's rules), --sequence-parallel needs --seq-length divisible by tp, the blocks must
split over the pipeline stages (parallel/stages.split_layers) and the micro-batches per step must suit the
schedule (parallel/pipeline.check_micro_batch_count). --overlap-param-gather needs --use-distributed-optimizer.
Recompute: --recompute-method and --recompute-num-layers go with --recompute-granularity full, which needs a method.

Model shape: `--model-preset NAME` (config.PRESETS) gives every model value; explicit flags override it. Without a
preset --num-layers, --hidden-size and --num-attention-heads are required; --ffn-hidden-size then defaults to
Llama's rule (8h/3 rounded up to a multiple of 256).

Choices that differ from Megatron-LM's defaults (documented in --help too):
  * Output head: untied from the input embedding unless the preset ties it (Open-Llama presets do);
    --untie-embeddings-and-output-weights forces untied, --tie-embeddings-and-output-weights tied.
  * --num-query-groups N turns grouped-query attention on by itself (Megatron needs
    --group-query-attention as well; the pair is accepted).
  * Precision: --bf16/--fp16 on a CPU run trains in fp32 and says so (CPU kernels for half precision
    are slow and the tests need exact fp32).
  * Vocabulary: from the tokenizer (--tokenizer-type/--tokenizer-model); else --vocab-size; else the
    preset's. --vocab-size that disagrees with the tokenizer is an error (found by the setup).
  * --load DIR: DIR must exist. A DIR without a published checkpoint is accepted only when it is also the
    --save directory (the "resume in place" pattern: the first run starts from scratch; the setup sets aside
    what an interrupted save left). --ckpt-step N loads iteration N of DIR instead of the published one.
  * Learning rates (--lr, --min-lr, --lr-warmup-init) must be finite, not negative, and within float32's range
    (the optimizer's states and master params are float32).
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from megatron_llama.config import (PRESETS, CheckpointConfig, DataConfig, LoggingConfig, ModelConfig,
                                   ParallelConfig, RunConfig, TrainingConfig)
from megatron_llama.data.chat_template import CHAT_TEMPLATES
from megatron_llama.model.attention import ATTENTION_BACKENDS
from megatron_llama.model.compile import default_on_cuda
from megatron_llama.optim.lr_schedule import DECAY_STYLES
from megatron_llama.parallel import world
from megatron_llama.config_checks import ArgumentsError, check_positive, complete_and_check, flag_name

MODEL_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "max_position_embeddings", "make_vocab_size_divisible_by", "rotary_base", "norm_epsilon",
               "init_method_std", "attention_backend")


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

    fusion = parser.add_argument_group("fused kernels (each on by default on CUDA, off on CPU; --no-X turns it off)")
    fusion.add_argument("--compile-blocks", action=argparse.BooleanOptionalAction,
                        help="torch.compile the blocks' elementwise regions (norms, rotary, SwiGLU, residual adds)")
    fusion.add_argument("--cross-entropy-loss-fusion", action=argparse.BooleanOptionalAction,
                        help="output head and vocab-parallel cross entropy over chunks of tokens, no fp32 logits")
    fusion.add_argument("--gradient-accumulation-fusion", action=argparse.BooleanOptionalAction,
                        help="weight-gradient GEMMs accumulate straight into the fp32 main grads")

    data = parser.add_argument_group("data")
    data.add_argument("--data-path", nargs="*", help="PREFIX, or WEIGHT PREFIX WEIGHT PREFIX ... (blended)")
    data.add_argument("--train-data-path", nargs="*")
    data.add_argument("--valid-data-path", nargs="*")
    data.add_argument("--test-data-path", nargs="*")
    data.add_argument("--split", default="969,30,1", help="train,valid,test proportions of --data-path")
    data.add_argument("--data-cache-path", help="where index files are cached (default: beside the data)")
    data.add_argument("--sft", action="store_true",
                      help="instruction tuning: --train-data-path (and --valid-data-path) name one jsonl file of "
                           "{prompt, response} or {messages} records, or the PREFIX of tools/preprocess_sft.py; the "
                           "loss covers the assistant turns only")
    data.add_argument("--chat-template", default="openllama", choices=tuple(CHAT_TEMPLATES),
                      help="--sft, --dpo: how records are rendered (Open-Llama's 'user: ...<s>system: ...</s>' by default)")
    data.add_argument("--sft-packing", action="store_true",
                      help="--sft: pack several records per sequence; attention never crosses a record boundary")
    data.add_argument("--reset-position-ids", action="store_true",
                      help="positions restart after each end-of-document token")
    data.add_argument("--reset-attention-mask", action="store_true",
                      help="attention never crosses an end-of-document token")
    data.add_argument("--eod-mask-loss", action="store_true",
                      help="no loss on the token that follows an end-of-document token")
    data.add_argument("--dpo", action="store_true",
                      help="direct preference optimization: --train-data-path names one jsonl file of {prompt, "
                           "chosen, rejected} pairs; the reference policy is the --load checkpoint, frozen")
    data.add_argument("--dpo-beta", type=float, default=0.1, help="DPO's beta (IPO's tau)")
    data.add_argument("--dpo-loss", choices=("sigmoid", "ipo"), default="sigmoid")
    data.add_argument("--dpo-precompute-reference", action="store_true",
                      help="--dpo: compute the reference's log-probabilities of every pair once, before training, and "
                           "free the reference model (saves its memory and one forward per step)")
    data.add_argument("--dpo-reference", metavar="ITER_DIR",
                      help="--dpo: the checkpoint (a run folder: its published iteration; or DIR/iter_NNNNNNN) of the "
                           "frozen reference; default: the weights --load --finetune starts from (recorded in the "
                           "run's checkpoints)")
    data.add_argument("--mock-data", action="store_true", help="random tokens instead of a corpus (smoke tests)")
    data.add_argument("--tokenizer-type", choices=("SentencePieceTokenizer", "HuggingFaceTokenizer"))
    data.add_argument("--tokenizer-model")

    checkpoint = parser.add_argument_group("checkpoints")
    checkpoint.add_argument("--save", help="checkpoint directory")
    checkpoint.add_argument("--load", help="resume from the newest checkpoint in this directory")
    checkpoint.add_argument("--finetune", action="store_true",
                            help="load only the model weights from --load; start at iteration 0")
    checkpoint.add_argument("--ckpt-step", type=int,
                            help="load this iteration of --load instead of the published (newest) one")
    checkpoint.add_argument("--save-interval", type=int)
    checkpoint.add_argument("--exit-interval", type=int, help="save (with --save) and exit when iteration %% N == 0")
    checkpoint.add_argument("--exit-signal-handler", action="store_true",
                            help="on SIGTERM, save a checkpoint after the current iteration and exit")
    checkpoint.add_argument("--async-save", action="store_true",
                            help="write checkpoints in the background; training waits only for a copy in host memory")

    logging = parser.add_argument_group("logging and evaluation")
    logging.add_argument("--log-interval", type=int, default=100)
    logging.add_argument("--tensorboard-dir")
    logging.add_argument("--metrics-path",
                         help="JSON-lines metrics file (default: metrics.jsonl in --save, else in --tensorboard-dir)")
    logging.add_argument("--eval-interval", type=int, default=1000)
    logging.add_argument("--eval-iters", type=int, default=100, help="global batches per evaluation; 0: no evaluation")
    logging.add_argument("--profile", action="store_true",
                         help="torch.profiler trace of iterations [--profile-step-start, --profile-step-end) into "
                              "--tensorboard-dir (else beside the metrics file)")
    logging.add_argument("--profile-step-start", type=int, default=10)
    logging.add_argument("--profile-step-end", type=int, default=12)
    logging.add_argument("--profile-ranks", type=int, nargs="+", default=[0], help="global ranks that record a trace")
    logging.add_argument("--log-memory-to-tensorboard", action="store_true",
                         help="memory statistics in every training record (TensorBoard and metrics file)")

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
    parallel.add_argument("--distributed-timeout-minutes", type=int, default=10,
                          help="minutes a collective waits for the other ranks before the run fails")

    recompute = parser.add_argument_group("activation recompute")
    recompute.add_argument("--recompute-granularity", choices=("full", "selective"),
                           help="full: whole blocks (with --recompute-method); selective: the attention core only")
    recompute.add_argument("--recompute-method", choices=("uniform", "block"),
                           help="uniform: every block in groups of --recompute-num-layers; block: the first N blocks")
    recompute.add_argument("--recompute-num-layers", type=int)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[RunConfig, list[str]]:
    """Parse and check the command line: (the run's configuration, notes for the log). Raises ArgumentsError
    (argparse itself exits on unknown flags)."""
    args = build_parser().parse_args(argv)
    notes: list[str] = []
    _check_precision_flags(args)
    _check_tokenizer_flags(args)
    config = RunConfig(model=_model_config(args), parallel=_parallel_config(args, notes),
                       training=_training_config(args, notes), data=_section(DataConfig, args, tokenizer_hash=None),
                       checkpoint=_section(CheckpointConfig, args), logging=_section(LoggingConfig, args))
    complete_and_check(config, notes)
    return config, notes


def _section(section, args: argparse.Namespace, **values):
    """A config dataclass from the flags named like its fields (and `values` for the others)."""
    names = {field.name for field in dataclasses.fields(section)}
    return section(**{name: getattr(args, name) for name in names if name not in values}, **values)


def _parallel_config(args: argparse.Namespace, notes: list[str]) -> ParallelConfig:
    config = _section(ParallelConfig, args, data_parallel_size=1)
    check_positive(config, "tensor_model_parallel_size", "pipeline_model_parallel_size", "ddp_bucket_size",
              "num_layers_per_virtual_pipeline_stage", "distributed_timeout_minutes")
    tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    world_size = world.world_size()
    if world_size % (tp * pp):
        raise ArgumentsError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                             f"--pipeline-model-parallel-size {pp} = {tp * pp}; launch a multiple of "
                             f"{tp * pp} processes (torchrun --nproc_per_node) or change the parallel sizes")
    config.data_parallel_size = world_size // (tp * pp)
    if config.sequence_parallel and tp == 1:
        notes.append("--sequence-parallel has no effect at --tensor-model-parallel-size 1")
    return config


def _check_precision_flags(args: argparse.Namespace):
    if args.bf16 and args.fp16:
        raise ArgumentsError("--bf16 and --fp16 were both given; choose one")
    if args.loss_scale is not None and not args.fp16:
        raise ArgumentsError("--loss-scale applies only to --fp16 training; drop it or add --fp16")
    check_positive(args, "loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis")
    if args.min_loss_scale > args.initial_loss_scale:
        raise ArgumentsError(f"--min-loss-scale {args.min_loss_scale} is above --initial-loss-scale "
                             f"{args.initial_loss_scale}")


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


def _training_config(args: argparse.Namespace, notes: list[str]) -> TrainingConfig:
    device = _device(args.device)
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    if device == "cpu" and precision != "fp32":
        notes.append(f"--{precision} ignored: a CPU run trains in fp32 (mixed precision is for GPUs)")
        precision = "fp32"
    fusions = {name: default_on_cuda(getattr(args, name), device)
               for name in ("compile_blocks", "cross_entropy_loss_fusion", "gradient_accumulation_fusion")}
    return _section(TrainingConfig, args, device=device, precision=precision, **fusions)


def _check_tokenizer_flags(args: argparse.Namespace):
    if (args.tokenizer_type is None) != (args.tokenizer_model is None):
        raise ArgumentsError("--tokenizer-type and --tokenizer-model go together; give both or neither")
    if args.tokenizer_model is not None and not os.path.exists(args.tokenizer_model):
        raise ArgumentsError(f"--tokenizer-model {args.tokenizer_model} does not exist")
    if args.tokenizer_type is None and args.vocab_size is None and args.model_preset is None:
        raise ArgumentsError("the vocabulary size is unknown: give --tokenizer-type and --tokenizer-model, "
                             "or --vocab-size, or a --model-preset")
    check_positive(args, "vocab_size")


def default_ffn_hidden_size(hidden_size: int) -> int:
    """Llama's SwiGLU width: 8h/3 rounded up to a multiple of 256 (4096 -> 11008)."""
    return -(-(8 * hidden_size // 3) // 256) * 256


def _model_config(args: argparse.Namespace) -> ModelConfig:
    values = dict(PRESETS[args.model_preset]) if args.model_preset else {}
    if not args.model_preset:
        missing = [flag_name(name) for name in ("num_layers", "hidden_size", "num_attention_heads")
                   if getattr(args, name) is None]
        if missing:
            raise ArgumentsError(f"{', '.join(missing)} required without --model-preset "
                                 f"(presets: {', '.join(sorted(PRESETS))})")
    for name in MODEL_FLAGS:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.vocab_size is not None:
        values["vocab_size"] = args.vocab_size
    elif args.tokenizer_type is not None:
        values["vocab_size"] = None  # the setup reads it from the tokenizer
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
