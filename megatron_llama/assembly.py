"""A run's pieces built from its resolved configuration and this rank's layout, in the order they depend on each
other: the one assembly used by the entry point (pretrain.py), the benchmarks and the tests.

    run = build_run(config, layout, device)     # Run(model, split, buffers, optimizer, lr_schedule, ...)
    for line in describe_run(run, config, layout):
        print(line)

Order: seeds (parallel/random.py) -> this rank's model chunks, built sharded (model/stage_model.py; the stage split
of parallel/stages.py) -> activation recompute wrapping the block forwards (model/recompute.py) -> the compiled
elementwise regions (model/compile.py), the fused output head + cross entropy (parallel/fused_cross_entropy.py)
and gradient-accumulation fusion (parallel/layers.py), as the configuration says (on CUDA by default), and the
blocks' FP8 GEMMs with --fp8-format (parallel/fp8.py; not the output head or the embedding) -> the
data-parallel buffers, the one owner of the fp32 main grads (parallel/data_parallel.py) -> the optimizer over them
(optim/builder.py: replicated or distributed) -> the learning-rate schedule. The buffers and optimizer come last
because they take the parameters as they finally are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_llama.config import RunConfig, TrainingConfig
from megatron_llama.model.compile import compile_blocks
from megatron_llama.model.llama import LlamaModel
from megatron_llama.model.recompute import apply_recompute
from megatron_llama.model.stage_model import StageModel, build_model_chunks
from megatron_llama.optim.base import TrainingOptimizer
from megatron_llama.optim.builder import build_optimizer
from megatron_llama.optim.grad_scaler import ConstantLossScaler, DynamicLossScaler
from megatron_llama.optim.lr_schedule import LearningRateSchedule
from megatron_llama.parallel.data_parallel import DataParallelBuffers
from megatron_llama.parallel.layers import set_fp8_recipe, set_gradient_accumulation_fusion
from megatron_llama.parallel.pipeline import schedule_name
from megatron_llama.parallel.random import set_random_seeds
from megatron_llama.parallel.stages import StageSplit
from megatron_llama.parallel.state import ParallelLayout


@dataclass
class Run:
    """This rank's trainable pieces of a run."""

    model: StageModel  # this rank's model chunks as one module
    split: StageSplit  # which blocks every pipeline rank and chunk holds
    buffers: DataParallelBuffers  # the fp32 main grads and their bucketed data-parallel sync
    optimizer: TrainingOptimizer
    optimizer_description: str  # a log line naming the optimizer and its buckets
    lr_schedule: LearningRateSchedule
    device: torch.device


def run_device(training: TrainingConfig) -> torch.device:
    """This process's device: its current GPU on a cuda run (torchrun's LOCAL_RANK was made current), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if training.device == "cuda" else torch.device("cpu")


def build_stage_model(config: RunConfig, layout: ParallelLayout, device: torch.device) -> tuple[StageModel, StageSplit]:
    """This rank's model chunks with recompute and the configured fusions applied (the module docstring's order),
    as one StageModel; and the split."""
    training = config.training
    split = config.stage_split()
    chunks = build_model_chunks(config.model, training.seed, split, layout, device=device,
                                dtype=training.params_dtype)
    for chunk in chunks:
        apply_recompute(chunk, training.recompute_granularity, training.recompute_method,
                        training.recompute_num_layers)
        compile_blocks(chunk, training.compile_blocks)
        chunk.fuse_cross_entropy = training.cross_entropy_loss_fusion
        set_gradient_accumulation_fusion(chunk, training.gradient_accumulation_fusion)
        set_fp8_recipe(chunk.layers, training.fp8)  # the blocks only: the output head stays in the model's dtype
    return StageModel(chunks), split


def build_loss_scaler(training: TrainingConfig) -> ConstantLossScaler | DynamicLossScaler | None:
    """fp16's loss scaler (constant with --loss-scale, else dynamic); None in every other precision."""
    if training.precision != "fp16":
        return None
    if training.loss_scale is not None:
        return ConstantLossScaler(training.loss_scale)
    return DynamicLossScaler(initial_scale=training.initial_loss_scale, min_scale=training.min_loss_scale,
                             growth_interval=training.loss_scale_window, hysteresis=training.hysteresis)


def build_optimizer_and_buffers(config: RunConfig, layout: ParallelLayout,
                                model: StageModel) -> tuple[TrainingOptimizer, DataParallelBuffers, str]:
    """The data-parallel gradient buffers and the optimizer over them (distributed or replicated); a log line."""
    parallel, training = config.parallel, config.training
    names = {name for name, _ in model.named_parameters()}
    tied_split = (not config.model.untie_embeddings_and_output_weights and parallel.pipeline_model_parallel_size > 1
                  and parallel.use_distributed_optimizer and "embedding.weight" in names)
    buffers = DataParallelBuffers(model, layout.data_group, bucket_size=parallel.ddp_bucket_size,
                                  overlap_grad_reduce=parallel.overlap_grad_reduce,
                                  use_distributed_optimizer=parallel.use_distributed_optimizer,
                                  overlap_param_gather=parallel.overlap_param_gather,
                                  separate_bucket_names=["embedding.weight"] if tied_split else [])
    optimizer, description = build_optimizer(model, buffers, layout, lr=training.lr,
                                             betas=(training.adam_beta1, training.adam_beta2), eps=training.adam_eps,
                                             weight_decay=training.weight_decay, clip_grad=training.clip_grad,
                                             loss_scaler=build_loss_scaler(training))
    return optimizer, buffers, (f"{description}; {len(buffers.buckets)} gradient bucket(s)"
                                f"{', overlapped reduction' if parallel.overlap_grad_reduce else ''}")


def build_lr_schedule(training: TrainingConfig) -> LearningRateSchedule:
    return LearningRateSchedule(max_lr=training.lr, min_lr=training.min_lr, warmup_iters=training.lr_warmup_iters,
                                decay_iters=training.lr_decay_iters, decay_style=training.lr_decay_style,
                                warmup_init=training.lr_warmup_init)


def build_run(config: RunConfig, layout: ParallelLayout, device: torch.device) -> Run:
    """Every trainable piece of `config` on this rank (the module docstring's order)."""
    set_random_seeds(config.training.seed, layout)
    model, split = build_stage_model(config, layout, device)
    optimizer, buffers, description = build_optimizer_and_buffers(config, layout, model)
    return Run(model=model, split=split, buffers=buffers, optimizer=optimizer, optimizer_description=description,
               lr_schedule=build_lr_schedule(config.training), device=device)


def full_parameter_count(config) -> int:
    """Parameters of the whole model, whatever this rank holds: every stage built on the meta device (no memory),
    tensor-parallel layers knowing their full shape."""
    with torch.device("meta"):
        whole = LlamaModel(config)
    return sum(math.prod(getattr(param, "full_shape", param.shape)) for param in whole.parameters())


def describe_run(run: Run, config: RunConfig, layout: ParallelLayout) -> list[str]:
    """The log lines that say what was built: the layout, the pipeline schedule, the model, the optimizer."""
    model, training = config.model, config.training
    lines = [f"layout: {config.parallel.world_size} processes = tensor {layout.tensor_size} x pipeline "
             f"{layout.pipeline_size} x data {layout.data_size}"
             f"{', sequence parallel' if layout.sequence_parallel else ''}"]
    if layout.pipeline_size > 1:
        lines.append(f"pipeline: {schedule_name(run.split.pipeline_size, run.split.num_chunks)}, "
                     f"{config.num_micro_batches} micro-batches per step\n{run.split.describe()}")
    lines.append(f"model: {full_parameter_count(model):,} parameters "
                 f"({sum(param.numel() for param in run.model.parameters()):,} on this rank), {model.num_layers} "
                 f"layers, hidden {model.hidden_size}, vocabulary {model.vocab_size} padded to "
                 f"{model.padded_vocab_size(layout.tensor_size)}, {training.precision} weights on {run.device}, "
                 f"attention {model.attention_backend}"
                 f"{describe_fp8(training, run.device)}")
    lines.append(run.optimizer_description)
    return lines


def describe_fp8(training: TrainingConfig, device: torch.device) -> str:
    """The log's words for the blocks' FP8 GEMMs ("" without --fp8-format)."""
    recipe = training.fp8
    if recipe is None:
        return ""
    where = "emulated in fp32" if recipe.emulates_on(device) else "torch._scaled_mm"
    return f", blocks' GEMMs in fp8 ({recipe.format} {recipe.scaling}, {where})"
