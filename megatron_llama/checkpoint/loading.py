"""Loading a checkpoint into this rank's model and optimizer, at any parallel layout: exact resume, weights only
(--finetune, model-only checkpoints, a DPO reference), and the checks that a checkpoint fits the run.

    warnings = check_resumable(folder, saved_config, run_config, model_only)   # before any process group starts
    resumed, message = load_checkpoint(folder, model=model, optimizer=optimizer, config=run_config, layout=layout)
    load_weights(folder, reference_model, run_config, layout)                  # the weights alone

`folder` is an iteration folder, as reading.open_checkpoint finds it.

Any layout resumes any checkpoint: at another tensor/pipeline split, or with the other optimizer kind, the weights
and the optimizer state by parameter name (optim/named_state.py) are merged from every saved rank and re-split for
this one (resharding.py); why the format allows it, and what happens to the RNG states: docs/formats.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megatron_llama.checkpoint.files import MODEL_FILENAME, CheckpointError, optimizer_filename, rng_filename, shard_dir
from megatron_llama.checkpoint.reading import (open_iteration_folder, parallel_sizes, read_checkpoint_file,
                                               read_model_shards)
from megatron_llama.checkpoint.resharding import resplit, same_model_split
from megatron_llama.checkpoint.rng_state import restore_rng_state
from megatron_llama.config import RunConfig
from megatron_llama.config_checks import flag_name
from megatron_llama.optim.base import NamedOptimizerState
from megatron_llama.optim.named_state import named_optimizer_state
from megatron_llama.parallel.state import ParallelLayout


def check_state_dict_fits(loaded: dict, model: torch.nn.Module, source: str):
    """Same parameter names and shapes as `model`, or a CheckpointError naming the first differences."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing parameters {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
    if unexpected:
        problems.append(f"parameters this model lacks {', '.join(unexpected[:4])}" +
                        (" ..." if len(unexpected) > 4 else ""))
    for name in sorted(set(expected) & set(loaded)):
        if tuple(loaded[name].shape) != tuple(expected[name].shape):
            problems.append(f"parameter {name} has shape {list(loaded[name].shape)} in the checkpoint but "
                            f"{list(expected[name].shape)} in this model")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(problems[:5])}; "
                              f"change the model flags to match the checkpoint")


@dataclass
class ResumeState:
    """Where a loaded checkpoint's training stopped, and its loss scaler's state (None: none saved, or weights only)."""

    iteration: int
    consumed_train_samples: int
    loss_scaler: dict | None


MODEL_SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                      "vocab_size", "make_vocab_size_divisible_by", "untie_embeddings_and_output_weights",
                      "use_stable_embedding")


def check_resumable(folder: str, saved: RunConfig, run: RunConfig, model_only: bool = False) -> list[str]:
    """CheckpointError unless `run` can load the checkpoint in `folder` (saved with `saved`): the same model shape
    always; for a full resume (not --finetune, not a model-only checkpoint) also the same tokenizer and sequence
    length, since the run goes on where the checkpoint stopped (the layout and optimizer kind may change:
    load_checkpoint re-splits). Returns warnings for the log: loading only the weights of a model trained with
    another tokenizer; a full resume with other schedule or optimizer settings (each named, old -> new)."""
    differences = [f"{name}: checkpoint {getattr(saved.model, name)!r}, this run {getattr(run.model, name)!r}"
                   for name in MODEL_SHAPE_FIELDS if getattr(saved.model, name) != getattr(run.model, name)]
    if differences:
        raise CheckpointError(f"--load {folder} holds a different model ({'; '.join(differences)}); "
                              f"change the model flags to match the checkpoint, or load another checkpoint")
    weights_only = run.checkpoint.finetune or model_only
    saved_hash, run_hash = saved.data.tokenizer_hash, run.data.tokenizer_hash
    if saved_hash and run_hash and saved_hash != run_hash:
        problem = (f"--load {folder} was trained with tokenizer {saved.data.tokenizer_model} (sha256 "
                   f"{saved_hash[:12]}) but this run's --tokenizer-model {run.data.tokenizer_model} is another one "
                   f"(sha256 {run_hash[:12]}): the same token ids may stand for other pieces")
        if not weights_only:
            raise CheckpointError(f"{problem}; resume with the checkpoint's tokenizer, or pass --finetune to start "
                                  f"a new training from its weights on purpose")
        return [f"WARNING: {problem}; the weights are loaded anyway, the embedding rows of every id whose piece "
                f"changed start from what another piece learnt"]
    if weights_only:
        return []
    if saved.training.seq_length != run.training.seq_length:
        raise CheckpointError(f"--load {folder} was trained with --seq-length {saved.training.seq_length} but this "
                              f"run has --seq-length {run.training.seq_length}; resuming would change the data order "
                              f"and samples; use --seq-length {saved.training.seq_length}, or pass --finetune to "
                              f"start a new training from its weights")
    return changed_schedule_and_optimizer_settings(folder, saved, run)


SCHEDULE_AND_OPTIMIZER_FIELDS = ("lr", "min_lr", "lr_decay_style", "lr_warmup_iters", "lr_warmup_init",
                                 "lr_decay_iters", "weight_decay", "clip_grad", "adam_beta1", "adam_beta2", "adam_eps")


def changed_schedule_and_optimizer_settings(folder: str, saved: RunConfig, run: RunConfig) -> list[str]:
    """A notice for the log naming each learning-rate schedule or optimizer setting of `run` that differs from the
    checkpoint's (`saved`, its config.json), as checkpoint value -> this run's value; [] when none does."""
    changes = [f"{flag_name(name)} {getattr(saved.training, name)!r} -> {getattr(run.training, name)!r}"
               for name in SCHEDULE_AND_OPTIMIZER_FIELDS
               if getattr(saved.training, name) != getattr(run.training, name)]
    if not changes:
        return []
    return [f"NOTICE: resuming {folder} with other schedule/optimizer settings than it was saved with (checkpoint "
            f"-> this run): {', '.join(changes)}; this run's values apply from here on and are recorded in its "
            f"checkpoints"]


def _load_model_state(folder: str, saved: RunConfig, meta: dict, model: torch.nn.Module, config: RunConfig,
                      layout: ParallelLayout) -> tuple[dict, dict | None]:
    """Load this rank's weights of the checkpoint in `folder` into `model`, re-split when the checkpoint's tensor or
    pipeline split is not this run's; returns the state dict and the whole-model shards read for it (None at the
    same split)."""
    path = os.path.join(shard_dir(folder, layout.tensor_rank, layout.pipeline_rank), MODEL_FILENAME)
    if same_model_split(saved, config):
        model_state, shards = read_checkpoint_file(folder, meta, path), None
    else:
        shards = read_model_shards(folder, saved, meta)
        model_state = resplit(saved, config, layout, shards)
    check_state_dict_fits(model_state, model, path)
    model.load_state_dict(model_state)
    return model_state, shards


def load_weights(folder: str, model: torch.nn.Module, config: RunConfig,
                 layout: ParallelLayout = ParallelLayout.single_process()) -> None:
    """Only the weights of the checkpoint iteration `folder` (checked like any load) into `model`, at this run's
    split (`config`): the frozen reference of a DPO run (--dpo-reference)."""
    saved, meta = open_iteration_folder(folder, "the checkpoint")
    _load_model_state(folder, saved, meta, model, config, layout)


def load_checkpoint(folder: str, *, model: torch.nn.Module, optimizer, config: RunConfig,
                    layout: ParallelLayout = ParallelLayout.single_process()) -> tuple[ResumeState, str]:
    """Load the checkpoint iteration `folder` (reading.open_checkpoint's) into `model` and `optimizer`, once it is
    checked against the run (check_resumable); returns its state and a log line. Every file read is first checked
    against its checksum in meta.json.

    A full checkpoint restores weights, master params, Adam states, every RNG and the sample count.
    A model-only checkpoint (write_model_checkpoint), or --finetune, restores the weights only and
    starts at iteration 0 with a fresh optimizer; the weights are re-split when the checkpoint's tensor or
    pipeline layout differs from this run's (`config`, the run's configuration).

    The data-parallel size may differ from the saved one: the distributed optimizer reshards the shards of every
    saved data-parallel rank; a replicated optimizer state is the same on every data-parallel rank, so the first
    one's is read. Each rank takes the RNG state of its own data-parallel rank, else of rank 0.

    The tensor/pipeline split and the optimizer kind may differ too: the optimizer state of every saved rank is
    taken by parameter name, merged and re-split like the weights (resplit_optimizer_state); the RNG states are
    then those this run seeded for its own layout (no saved rank's states fit a rank of another split).
    """
    saved, meta = open_iteration_folder(folder, "the checkpoint")
    weights_only = config.checkpoint.finetune or bool(meta.get("model_only"))
    check_resumable(folder, saved, config, bool(meta.get("model_only")))
    shard = shard_dir(folder, layout.tensor_rank, layout.pipeline_rank)
    same_split = same_model_split(saved, config)
    model_state, saved_model_shards = _load_model_state(folder, saved, meta, model, config, layout)
    if weights_only:
        optimizer.set_master_params(model_state)
        reason = "--finetune" if config.checkpoint.finetune else "a model-only checkpoint"
        return ResumeState(0, 0, None), f"loaded the weights of {folder} ({reason}); starting at iteration 0"
    saved_data_parallel_size = saved.parallel.data_parallel_size
    same_optimizer = saved.parallel.use_distributed_optimizer == config.parallel.use_distributed_optimizer
    try:
        if same_split and same_optimizer:  # the optimizer reads the saved data-parallel ranks' files it needs
            optimizer.load_state_dict(optimizer_file_reader(folder, meta, layout.tensor_rank, layout.pipeline_rank),
                                      saved_data_parallel_size, model_state)
        else:
            optimizer.load_named_state(resplit_optimizer_state(
                folder, saved, meta, config, layout, saved_model_shards or read_model_shards(folder, saved, meta)))
    except ValueError as error:
        raise CheckpointError(f"{shard}: {error}") from None
    if same_split:
        rng_rank = layout.data_rank if layout.data_rank < saved_data_parallel_size else 0
        restore_rng_state(read_checkpoint_file(folder, meta, os.path.join(shard, rng_filename(rng_rank))))
    state = ResumeState(int(meta["iteration"]), int(meta["consumed_train_samples"]), meta.get("loss_scaler"))
    resplit_note = "" if same_split and same_optimizer else (
        f", re-split from tensor/pipeline/data {parallel_sizes(saved.parallel)} "
        f"{'with' if saved.parallel.use_distributed_optimizer else 'without'} the distributed optimizer"
        f"{'' if same_split else '; random generators as seeded for this layout'}")
    return state, (f"resumed from {folder}: iteration {state.iteration}, "
                   f"{state.consumed_train_samples} samples consumed{resplit_note}")


def optimizer_file_reader(folder: str, meta: dict, tensor_rank: int, pipeline_rank: int):
    """saved data-parallel rank -> the optimizer file it wrote in shard folder (tensor_rank, pipeline_rank),
    verified and memory-mapped (the optimizer copies what it keeps)."""
    shard = shard_dir(folder, tensor_rank, pipeline_rank)
    return lambda data_rank: read_checkpoint_file(folder, meta, os.path.join(shard, optimizer_filename(data_rank)),
                                                  mmap=True)


def resplit_optimizer_state(folder: str, saved: RunConfig, meta: dict, run: RunConfig, layout: ParallelLayout,
                            saved_model_shards: dict[tuple[int, int], dict]) -> NamedOptimizerState:
    """The optimizer state of this rank's parameters under `run`'s layout, from the files of every saved rank
    (`saved_model_shards`: read_model_shards): each (tp, pp) rank's state by parameter name (optim/named_state.py),
    every per-element state (masters, exp_avg, exp_avg_sq) merged and split like the weights, with the same
    tensor-parallel slicing."""
    data_size = saved.parallel.data_parallel_size
    per_rank = {(tensor_rank, pipeline_rank): named_optimizer_state(
                    optimizer_file_reader(folder, meta, tensor_rank, pipeline_rank), data_size, model_shard)
                for (tensor_rank, pipeline_rank), model_shard in saved_model_shards.items()}
    first = per_rank[(0, 0)]
    tensors = {key: resplit(saved, run, layout, {position: state.tensors[key] for position, state in per_rank.items()})
               for key in first.tensors}
    return NamedOptimizerState(tensors, first.scalar_states, first.param_groups)
