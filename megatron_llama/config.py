"""The run's typed configuration: the model and its named presets, the parallel layout, training, data,
checkpointing and logging. The one place where a setting's default and description are written.

`ModelConfig` holds every number that shapes the network; `PRESETS` maps a preset name
(`--model-preset` on the command line) to the values of a published model. Open-Llama's
sizes follow its configs (shared input-output embedding, stable embedding LayerNorm);
Llama-2 and Llama-3 follow Meta's released configs.

`RunConfig` gathers one dataclass per concern (`ParallelConfig`, `TrainingConfig`, `DataConfig`,
`CheckpointConfig`, `LoggingConfig`), each field named after its Megatron-LM flag and documented by the string
below it (`field_docstrings`). Every dataclass is frozen: a changed value is a new configuration
(`dataclasses.replace`). arguments.py generates the command line from the fields (default, type, docstring as
help, section as group), config_resolve.py turns the parsed flags into a resolved RunConfig; checkpoints store
`to_dict()` as config.json (docs/formats.md) and tools rebuild from `RunConfig.from_dict` without argparse:

    config = RunConfig.from_dict(json.load(open("ckpt/iter_0000100/config.json")))
    model = LlamaModel(config.model)
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from dataclasses import dataclass

import torch

from megatron_llama.data.chat_template import DEFAULT_CHAT_TEMPLATE
from megatron_llama.parallel.fp8 import Fp8Recipe
from megatron_llama.parallel.stages import StageSplit, split_layers


@dataclass(frozen=True)
class ModelConfig:
    """Every number that shapes the network (--model-preset gives them all; each model flag overrides one)."""

    num_layers: int = 2
    """Transformer blocks."""
    hidden_size: int = 64
    """Width of the residual stream (h)."""
    ffn_hidden_size: int = 176
    """Width of the SwiGLU MLP; not given and no preset: 8h/3 rounded up to a multiple of 256 (4096 -> 11008)."""
    num_attention_heads: int = 4
    """Query heads of every attention layer."""
    num_query_groups: int | None = None
    """Key/value heads (grouped-query attention, turned on by this flag alone); None: one per query head."""
    vocab_size: int | None = 32000
    """Entries of the tokenizer's vocabulary: the tokenizer's when the run has one (this flag must then agree),
    else this flag, else the preset's."""
    make_vocab_size_divisible_by: int = 128
    """The embedding's rows are the vocabulary rounded up to a multiple of this x the tensor-parallel size."""
    max_position_embeddings: int = 2048
    """Longest sequence the rotary positions are meant for; not given: the preset's, else --seq-length."""
    rotary_base: float = 10000.0
    """Base of the rotary embedding's frequencies (theta)."""
    norm_epsilon: float = 1e-5
    """Epsilon of every RMSNorm."""
    untie_embeddings_and_output_weights: bool = True
    """A separate output head; False: the head shares the input embedding's weight (Open-Llama)."""
    use_stable_embedding: bool = False
    """Open-Llama: LayerNorm right after the token embedding."""
    init_method_std: float = 0.02
    """Standard deviation of the normal initialisation of the weights."""
    attention_backend: str = "sdpa"
    """Core attention kernels (model/attention.py): sdpa (torch's scaled_dot_product_attention), xformers, or eager
    (the plain matmul-softmax reference)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Vocabulary rounded up to a multiple of make_vocab_size_divisible_by x tp."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def matmul_params(self) -> int:
        """Weights of all matmuls, output head included (N of the FLOPs formula in docs/performance.md)."""
        h, kv = self.hidden_size, self.kv_heads * self.head_dim
        per_layer = h * h + 2 * h * kv + h * h + 3 * h * self.ffn_hidden_size
        return self.num_layers * per_layer + h * self.padded_vocab_size()

    def flops_per_token(self, seq_length: int) -> int:
        """6 N + 12 L h s (PaLM appendix B; causal masking not discounted)."""
        return 6 * self.matmul_params() + 12 * self.num_layers * self.hidden_size * seq_length

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, tensor_parallel_size: int = 1, tensor_parallel_flag: str = "--tensor-model-parallel-size") -> None:
        """The model's shape rules, for the CLI, checkpoint splitting, conversion and the model itself.

        Raises ValueError naming the flag and numbers to change: positive sizes, hidden size divisible by the
        attention heads, attention heads by the key/value heads, an even head dimension (rotary embeddings),
        and heads, key/value heads and --ffn-hidden-size divisible by `tensor_parallel_size` (named by
        `tensor_parallel_flag`: each tensor rank holds whole heads and an equal share of the ffn).
        """
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                     "max_position_embeddings", "make_vocab_size_divisible_by"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.num_query_groups is not None and self.num_query_groups <= 0:
            raise ValueError(f"--num-query-groups must be positive, got {self.num_query_groups}")
        heads, groups = self.num_attention_heads, self.kv_heads
        if self.hidden_size % heads:
            raise ValueError(f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads {heads}; "
                             f"use a multiple of {heads}")
        if heads % groups:
            raise ValueError(f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}; "
                             f"use a number of query groups that divides {heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} (--hidden-size / --num-attention-heads) must be "
                             f"even for rotary embeddings")
        self._check_tensor_parallel_split(tensor_parallel_size, tensor_parallel_flag)

    def _check_tensor_parallel_split(self, tensor_parallel_size: int, flag: str) -> None:
        tp = tensor_parallel_size
        sizes = (("attention heads (--num-attention-heads)", self.num_attention_heads),
                 ("key/value heads (--num-query-groups)", self.kv_heads),
                 ("--ffn-hidden-size", self.ffn_hidden_size))
        misfits = [f"{what} {value}" for what, value in sizes if value % tp]
        if misfits:
            raise ValueError(f"{' and '.join(misfits)} {'is' if len(misfits) == 1 else 'are'} not divisible by "
                             f"{flag} {tp}: each tensor rank holds 1/{tp} of them; choose a {flag} that divides "
                             f"{', '.join(str(value) for _, value in sizes)}")


def _llama(layers, hidden, ffn, heads, groups=None, vocab=32000, positions=4096, rope=10000.0, eps=1e-5, **extra):
    return dict(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                num_query_groups=groups, vocab_size=vocab, max_position_embeddings=positions,
                rotary_base=rope, norm_epsilon=eps, **extra)


_OPEN_LLAMA = dict(vocab=100000, positions=2048, eps=1e-6,
                   untie_embeddings_and_output_weights=False, use_stable_embedding=True)

PRESETS: dict[str, dict] = {
    "tiny": _llama(2, 64, 176, 4, 2, vocab=1000, positions=256),
    "tiny-mha": _llama(2, 64, 176, 4, None, vocab=1000, positions=256),
    "openllama-7b": _llama(32, 4096, 11008, 32, **_OPEN_LLAMA),
    "openllama-13b": _llama(40, 5120, 13824, 40, **_OPEN_LLAMA),
    "openllama-33b": _llama(60, 6656, 17920, 52, **_OPEN_LLAMA),
    "openllama-65b": _llama(80, 8192, 22016, 64, **_OPEN_LLAMA),
    "llama2-7b": _llama(32, 4096, 11008, 32),
    "llama2-13b": _llama(40, 5120, 13824, 40),
    "llama2-70b": _llama(80, 8192, 28672, 64, 8),
    "llama3-8b": _llama(32, 4096, 14336, 32, 8, vocab=128256, positions=8192, rope=500000.0),
}


def model_config_from_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    values = dict(PRESETS[name])
    values.update({key: value for key, value in overrides.items() if value is not None})
    return ModelConfig(**values)


# ------------------------------------------------------------------------------------- the run's configuration
# One dataclass per concern, each field named after its Megatron-LM flag and documented by the string below it (the
# flag's --help); arguments.py generates the command line from them, config_resolve.py fills in the derived values,
# checkpoints store RunConfig.to_dict() as config.json, and tools rebuild a model from it without argparse.

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class ParallelConfig:
    """How the run is split over processes: world = tensor x pipeline x data (parallel/state.py's formula)."""

    tensor_model_parallel_size: int = 1
    """Ranks that split every weight matrix (Megatron's column/row-parallel layers)."""
    pipeline_model_parallel_size: int = 1
    """Ranks that split the blocks into consecutive stages."""
    data_parallel_size: int = 1
    """Replicas of the model: the launched world size / (tensor x pipeline); derived, recorded for resumes."""
    sequence_parallel: bool = False
    """Norms and residuals on sequence shards across tensor ranks (Korthikanti et al. 2022); needs --seq-length
    divisible by --tensor-model-parallel-size."""
    num_layers_per_virtual_pipeline_stage: int | None = None
    """Blocks per model chunk; each pipeline rank then holds several chunks (interleaved 1F1B). None: one chunk."""
    decoder_first_pipeline_num_layers: int | None = None
    """Blocks on the first pipeline stage of an uneven split (None: an even share)."""
    decoder_last_pipeline_num_layers: int | None = None
    """Blocks on the last pipeline stage of an uneven split (None: an even share)."""
    ddp_bucket_size: int = 40_000_000
    """Gradient elements per data-parallel bucket (one collective each)."""
    overlap_grad_reduce: bool = False
    """Start each bucket's data-parallel reduction as soon as its gradients are complete."""
    use_distributed_optimizer: bool = False
    """Shard the fp32 master params and Adam states over data-parallel ranks (ZeRO stage 1)."""
    overlap_param_gather: bool = False
    """All-gather the updated parameters behind the next forward (distributed optimizer only)."""
    distributed_timeout_minutes: int = 10
    """Minutes a collective waits for the other ranks before the run fails (every process group)."""

    @property
    def world_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.data_parallel_size


@dataclass(frozen=True)
class TrainingConfig:
    """Batches, optimizer, learning-rate schedule, precision and activation recompute of a run."""

    micro_batch_size: int = 1
    """Sequences per forward/backward pass on one data-parallel rank."""
    global_batch_size: int = 1
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches; not given: micro-batch size x
    data-parallel size."""
    train_iters: int = 0
    """Optimizer steps of the whole run."""
    seq_length: int = 2048
    """Tokens per training sequence."""
    lr: float = 3e-4
    """Peak learning rate, reached at the end of the warm-up."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_decay_style: str = "cosine"
    """Shape of the decay (optim/lr_schedule.DECAY_STYLES)."""
    lr_warmup_iters: int = 0
    """Steps of linear warm-up from lr_warmup_init to lr."""
    lr_warmup_init: float = 0.0
    """Learning rate at step 0 of the warm-up."""
    lr_decay_iters: int | None = None
    """Steps until min_lr is reached (None: train_iters)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to norms and biases)."""
    clip_grad: float = 1.0
    """Global gradient-norm limit; 0 turns clipping off."""
    adam_beta1: float = 0.9
    """AdamW's first-moment decay."""
    adam_beta2: float = 0.999
    """AdamW's second-moment decay."""
    adam_eps: float = 1e-8
    """AdamW's denominator epsilon."""
    precision: str = "fp32"
    """Model weights' dtype: fp32, bf16 or fp16; main grads and master params are fp32 in every case."""
    loss_scale: float | None = None
    """A constant fp16 loss scale instead of a dynamic one."""
    initial_loss_scale: float = 2.0**32
    """First dynamic fp16 loss scale."""
    min_loss_scale: float = 1.0
    """Floor of the dynamic fp16 loss scale; an overflow there stops the run."""
    loss_scale_window: int = 1000
    """Clean fp16 steps before the dynamic loss scale doubles."""
    hysteresis: int = 2
    """fp16 overflows tolerated before the dynamic loss scale halves."""
    seed: int = 1234
    """Seed of the weights' initialisation, the data order and dropout-free randomness."""
    device: str = "cpu"
    """cpu or cuda (--device auto: cuda when torch sees a GPU, resolved by config_resolve.py)."""
    compile_blocks: bool = False
    """torch.compile the blocks' elementwise regions: norms, rotary, SwiGLU, residual adds (model/compile.py); not
    given: on on CUDA, off on CPU."""
    cross_entropy_loss_fusion: bool = False
    """Output head + vocab-parallel cross entropy over chunks of tokens, no fp32 logits
    (parallel/fused_cross_entropy.py); not given: on on CUDA, off on CPU."""
    gradient_accumulation_fusion: bool = False
    """Weight-gradient GEMMs accumulate straight into the fp32 main grads (parallel/layers.py); not given: on on
    CUDA, off on CPU."""
    fp8_format: str | None = None
    """FP8 GEMMs for the blocks' linear layers (parallel/fp8.py; torch only, no extra package): e4m3 (every operand
    float8_e4m3fn) or hybrid (gradients float8_e5m2); the output head, embedding, norms and attention stay in the
    model's precision. Needs a GPU of compute capability 8.9 or newer (emulated on the CPU); None: no fp8."""
    fp8_recipe: str = "tensorwise"
    """Scaling of the FP8 GEMMs (with --fp8-format): tensorwise (one scale per tensor, all three GEMMs in fp8) or
    rowwise (one scale per row, weight gradient in bf16); not given: tensorwise."""
    recompute_granularity: str | None = None
    """full: recompute whole blocks in backward; selective: only the attention core; None: keep activations."""
    recompute_method: str | None = None
    """With full recompute: uniform (every block, in groups) or block (the first recompute_num_layers blocks)."""
    recompute_num_layers: int | None = None
    """Blocks per recompute group (uniform) or blocks recomputed (block)."""
    check_for_spiky_loss: bool = True
    """Watch for a loss above --spiky-loss-factor x the median of the reference iterations (divergence.py); a
    flagged iteration warns, --spikes-before-stop of them among the last --spike-reference-iters stop the run (exit
    1, nothing of it saved). --no-check-for-spiky-loss turns it off."""
    check_for_large_grads: bool = True
    """Watch for a gradient norm above --large-grad-factor x the median of the reference iterations, as
    --check-for-spiky-loss does for the loss. --no-check-for-large-grads turns it off."""
    spiky_loss_factor: float = 2.0
    """A loss above this many times the reference median is a spike (a healthy run stays within 1.1x)."""
    large_grad_factor: float = 10.0
    """A gradient norm above this many times the reference median is a spike (a healthy run stays within 3x)."""
    spike_reference_iters: int = 20
    """The reference: the last N iterations that were neither spikes nor skipped fp16 steps."""
    spikes_before_stop: int = 3
    """Spikes among the last --spike-reference-iters iterations that stop the run as diverged."""

    @property
    def params_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    @property
    def fp8(self) -> Fp8Recipe | None:
        """The blocks' FP8 GEMM recipe of --fp8-format and --fp8-recipe; None without --fp8-format."""
        return Fp8Recipe(format=self.fp8_format, scaling=self.fp8_recipe) if self.fp8_format is not None else None


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from and which tokenizer made them."""

    data_path: list[str] | None = None
    """PREFIX, or WEIGHT PREFIX WEIGHT PREFIX ... (blended), split into train/valid/test by `split`."""
    train_data_path: list[str] | None = None
    """Training data with its own prefixes (instead of data_path); SFT: one jsonl file, or tools/preprocess_sft.py's
    PREFIX."""
    valid_data_path: list[str] | None = None
    """Validation data with its own prefixes; SFT: one jsonl file, or tools/preprocess_sft.py's PREFIX."""
    test_data_path: list[str] | None = None
    """Test data with its own prefixes."""
    split: str = "969,30,1"
    """train,valid,test proportions of data_path's documents."""
    data_cache_path: str | None = None
    """Folder of the cached sample indices (None: beside the data)."""
    sft: bool = False
    """Instruction tuning on {prompt, response} / {messages} jsonl records (or tools/preprocess_sft.py's files);
    the loss covers the assistant turns only."""
    chat_template: str = DEFAULT_CHAT_TEMPLATE
    """SFT: the chat template that renders the records (data/chat_template.py: openllama, llama2, chatml)."""
    sft_packing: bool = False
    """SFT: several records per sequence, each attending only to itself, positions restarting at each."""
    reset_position_ids: bool = False
    """Pretraining: rotary positions restart after every end-of-document token."""
    reset_attention_mask: bool = False
    """Pretraining: attention never crosses an end-of-document token (block-diagonal causal attention)."""
    eod_mask_loss: bool = False
    """Pretraining: no loss on the prediction made from an end-of-document token (the next document's first)."""
    dpo: bool = False
    """Direct preference optimization on {prompt, chosen, rejected} jsonl pairs against the loaded model, frozen
    (megatron_llama/objectives/dpo.py)."""
    dpo_beta: float = 0.1
    """DPO's beta: how far the policy may move from the reference (IPO's tau)."""
    dpo_loss: str = "sigmoid"
    """sigmoid (DPO) or ipo."""
    dpo_precompute_reference: bool = False
    """DPO: the reference's log-probabilities of every pair computed once before training (then its model copy is
    freed) instead of in every step."""
    dpo_reference: str | None = None
    """DPO: the checkpoint iteration folder whose weights are the frozen reference (a run's folder given stands for
    its published iteration). Default: the folder that --load --finetune starts from, which the run records here, so
    that resuming the DPO run finds its reference."""
    mock_data: bool = False
    """Random tokens instead of a corpus (smoke tests and benchmarks)."""
    tokenizer_type: str | None = None
    """SentencePieceTokenizer or HuggingFaceTokenizer."""
    tokenizer_model: str | None = None
    """The tokenizer's file (tokenizer.model, or tokenizer.json / its folder)."""
    tokenizer_hash: str | None = None
    """sha256 of the tokenizer's files (data/tokenizer.tokenizer_hash), filled by the run's setup when it opens the
    tokenizer; a resume with another tokenizer is refused. None: no tokenizer, or a checkpoint older than the field."""


@dataclass(frozen=True)
class CheckpointConfig:
    """Where checkpoints are written and read, and when."""

    save: str | None = None
    """Checkpoint folder written by this run."""
    load: str | None = None
    """Checkpoint folder to resume from (its newest published iteration)."""
    finetune: bool = False
    """Load only the model weights from `load` and start at iteration 0 (any layout)."""
    ckpt_step: int | None = None
    """The iteration of `load` to start from (None: the published one, named by its tracker file)."""
    save_interval: int | None = None
    """Save every N iterations (and at the end)."""
    exit_interval: int | None = None
    """Save (with --save) and exit when the iteration is a multiple of N."""
    exit_signal_handler: bool = False
    """On SIGTERM, save after the current iteration and exit."""
    async_save: bool = False
    """Write checkpoints on a background thread: the step waits only for a copy of the state in host memory
    (checkpoint/async_save.py); the next save and the end of training wait for the previous one."""


@dataclass(frozen=True)
class LoggingConfig:
    """What is logged and evaluated, and where it goes."""

    log_interval: int = 100
    """Iterations per training log line / metrics record."""
    tensorboard_dir: str | None = None
    """TensorBoard event folder (None: no events)."""
    metrics_path: str | None = None
    """JSON-lines metrics file (resolved to metrics.jsonl in `save`, else in tensorboard_dir)."""
    eval_interval: int = 1000
    """Iterations between evaluations on the validation set."""
    eval_iters: int = 100
    """Global batches per evaluation; 0: no evaluation."""
    profile: bool = False
    """Record a torch.profiler trace of iterations profile_step_start .. profile_step_end - 1 (profiling.py) into
    tensorboard_dir, else beside the metrics file."""
    profile_step_start: int = 10
    """First profiled iteration."""
    profile_step_end: int = 12
    """First iteration after the profiled ones."""
    profile_ranks: list[int] = dataclasses.field(default_factory=lambda: [0])
    """Global ranks that record a trace."""
    log_memory_to_tensorboard: bool = False
    """Add the device's memory statistics (metrics.memory_statistics) to every training record."""


SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "training": TrainingConfig, "data": DataConfig,
            "checkpoint": CheckpointConfig, "logging": LoggingConfig}


@functools.cache
def field_docstrings(section: type) -> dict[str, str]:
    """Field name -> its attribute docstring (the string right below the declaration), whitespace collapsed to
    single spaces: the --help text of the field's flag (arguments.py). Read once per section from the source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(section))).body[0].body
    return {statement.target.id: " ".join(following.value.value.split())
            for statement, following in zip(body, body[1:])
            if isinstance(statement, ast.AnnAssign) and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run was started with; checkpoints hold it as JSON (`to_dict` / `from_dict`)."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per step on each data-parallel rank: global batch / (micro-batch x data-parallel size)."""
        return self.training.global_batch_size // (self.training.micro_batch_size * self.parallel.data_parallel_size)

    def stage_split(self) -> StageSplit:
        """Which blocks each pipeline rank and model chunk holds (parallel/stages.split_layers of the flags)."""
        parallel = self.parallel
        return split_layers(self.model.num_layers, parallel.pipeline_model_parallel_size,
                            layers_per_virtual_stage=parallel.num_layers_per_virtual_pipeline_stage,
                            first_stage_layers=parallel.decoder_first_pipeline_num_layers,
                            last_stage_layers=parallel.decoder_last_pipeline_num_layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = "the configuration") -> "RunConfig":
        """The inverse of to_dict; a section or field this version does not know raises ValueError naming it."""
        unknown = sorted(set(values) - set(SECTIONS))
        if unknown:
            raise ValueError(f"{where} has sections this version does not know: {', '.join(unknown)}; it was "
                             f"written by a newer megatron_llama")
        sections = {}
        for name, section in SECTIONS.items():
            given = dict(values.get(name) or {})
            extra = sorted(set(given) - {field.name for field in dataclasses.fields(section)})
            if extra:
                raise ValueError(f"{where} describes '{name}' with fields this version does not know: "
                                 f"{', '.join(extra)}; it was written by a newer megatron_llama")
            sections[name] = section(**given)
        return cls(**sections)

    @classmethod
    def from_flat_arguments(cls, values: dict, where: str = "the arguments") -> "RunConfig":
        """A RunConfig from the flat argument record of checkpoints written before config.json (args.json: every
        flag by name, the model under "model"); flags that no longer exist are dropped."""
        sections = {"model": dict(values["model"])}
        for name, section in SECTIONS.items():
            if name != "model":
                fields = {field.name for field in dataclasses.fields(section)}
                sections[name] = {key: value for key, value in values.items() if key in fields}
        dtype = str(values.get("params_dtype", "float32"))
        sections["training"]["precision"] = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "fp32")
        return cls.from_dict(sections, where)
