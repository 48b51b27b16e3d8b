"""Checkpoints: save, load and exact resume for the trainer; model-only read/write for the converters.

On-disk layout (one folder per saved iteration, one shard file per rank; file names: checkpoint_files.py):

    {save}/iter_{iteration:07d}/
        config.json                                the run's configuration (config.RunConfig.to_dict(): model,
                                                   parallel layout with the sizes saved at, training, data with
                                                   the tokenizer's sha256, ...)
        meta.json                                  iteration, consumed_train_samples, lr-schedule and
                                                   loss-scaler state, "model_only", and "files": the sha256 and
                                                   size of every other file of the iteration
        mp_rank_{tp:02d}_{pp:03d}/model.pt               model state-dict shard (plain tensors)
        mp_rank_{tp:02d}_{pp:03d}/optim_dp_{dp:03d}.pt   optimizer shard: fp32 master params + Adam states
        mp_rank_{tp:02d}_{pp:03d}/rng_dp_{dp:03d}.pt     every RNG state of that rank
    {save}/latest_checkpointed_iteration.txt       the newest complete iteration, written last

Crash safety: every file is written under a temporary name, flushed to disk and renamed; the tracker
file is replaced only after every file of the iteration is complete, so a reader following the
tracker never sees a half-written checkpoint. A restart with --load equal to --save sets the folders of
unpublished iterations aside (checkpoint_files.set_aside_unpublished) and goes on.

Checksums: each rank computes the sha256 of the files it writes while writing them and leaves the records in its
shard folder (checksums_dp_{dp:03d}.json); once every rank is done, rank 0 moves them all into meta.json, then
publishes. Each rank verifies the files it reads against meta.json (sizes of all files when the checkpoint is
opened, sha256 when a file is read); a truncated or corrupt file is named together with the newest intact earlier
iteration, which `--ckpt-step N` loads. Checkpoints written before meta.json held "files" load unverified.

Pipeline shards: rank r's shard holds the state dicts of all its model chunks merged (names are global);
which blocks a rank holds is the recorded configuration's stage split (RunConfig.stage_split).

Any layout resumes any checkpoint (load_checkpoint): at another tensor/pipeline split, or with the other optimizer
kind, the weights and the optimizer state by parameter name (optim/named_state.py) are merged from every saved
rank and re-split for this one; why the format allows it, and what happens to the RNG states: docs/formats.md.

Saving: snapshot_checkpoint (this rank's state in host memory) then write_snapshot (files, receipt, every rank's
agreement, publish); save_checkpoint does both now, async_save.py writes the snapshot on a background thread
(--async-save). The agreement (comm.all_ranks_true, on a gloo group of its own) carries each rank's success: when
any rank could not write its files, every rank raises CheckpointError at once and nothing is published.

Splitting and merging shards between layouts lives in shard_layout.py: read_model_checkpoint returns the
embedding and head with the tp=1 vocabulary padding, write_model_checkpoint accepts any number of rows >= vocab_size.

Checkpoints written before config.json hold args.json instead (every flag by name, the model under "model");
they load as they are: open_checkpoint converts that record (RunConfig.from_flat_arguments).

Converters and tools use:
    model_config, state_dict, run_config = read_model_checkpoint(load_dir, iteration=None)
    write_model_checkpoint(save_dir, iteration, model_config, state_dict, run_config=None,
                           tensor_parallel_size=1, pipeline_parallel_size=1)
"""
from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from megatron_llama.checkpoint_files import (CheckpointError, atomic_torch_save, atomic_write_json, iteration_dir,
                                             check_file_size, load_tensor_file, optimizer_filename, read_json,
                                             read_tracker, receipt_filename, rng_filename, saved_iterations,
                                             shard_dir, tracker_path, verify_file, write_tracker)
from megatron_llama.config import ModelConfig, ParallelConfig, RunConfig
from megatron_llama.optim.base import NamedOptimizerState
from megatron_llama.optim.named_state import named_optimizer_state
from megatron_llama.parallel.state import ParallelLayout
from megatron_llama.shard_layout import merge_shards, resplit, same_model_split, split_state_dict

CONFIG_FILENAME = "config.json"
LEGACY_ARGS_FILENAME = "args.json"  # the flat argument record of checkpoints written before config.json
META_FILENAME = "meta.json"
MODEL_FILENAME = "model.pt"
FILE_RECORDS = "files"  # meta.json's entry: path inside the iteration folder -> {"sha256", "bytes"}


# -------------------------------------------------------------------------------- finding a checkpoint

def parallel_sizes(parallel: ParallelConfig) -> tuple[int, int, int]:
    """(tensor, pipeline, data) parallel sizes of a layout."""
    return (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size, parallel.data_parallel_size)


def read_run_config(iter_dir: str) -> RunConfig:
    """The configuration a checkpoint was saved with: config.json, else the args.json of older checkpoints."""
    path = os.path.join(iter_dir, CONFIG_FILENAME)
    legacy = os.path.join(iter_dir, LEGACY_ARGS_FILENAME)
    try:
        if os.path.isfile(path) or not os.path.isfile(legacy):
            return RunConfig.from_dict(read_json(path, "configuration file"), path)
        values = read_json(legacy, "arguments file")
        if "model" not in values:
            raise CheckpointError(f"{legacy} has no 'model' entry (the model configuration)")
        return RunConfig.from_flat_arguments(values, legacy)
    except (ValueError, TypeError) as error:
        raise CheckpointError(str(error)) from None


def checkpoint_files(iter_dir: str, config: RunConfig, model_only: bool) -> list[str]:
    """Every shard file a complete checkpoint of this layout holds, and its metadata."""
    tp, pp, dp = parallel_sizes(config.parallel)
    files = [os.path.join(iter_dir, META_FILENAME)]
    for pipeline_rank in range(pp):
        for tensor_rank in range(tp):
            shard = shard_dir(iter_dir, tensor_rank, pipeline_rank)
            files.append(os.path.join(shard, MODEL_FILENAME))
            if not model_only:
                for data_rank in range(dp):
                    files.append(os.path.join(shard, optimizer_filename(data_rank)))
                    files.append(os.path.join(shard, rng_filename(data_rank)))
    return files


def file_record(folder: str, meta: dict, path: str) -> dict | None:
    """The checksum record meta.json holds for `path` (None for checkpoints written before checksums)."""
    if FILE_RECORDS not in meta:
        return None
    name = os.path.relpath(path, folder)
    if name not in meta[FILE_RECORDS]:
        raise CheckpointError(f"{os.path.join(folder, META_FILENAME)} records no checksum for {name}; the "
                              f"checkpoint is incomplete")
    return meta[FILE_RECORDS][name]


def _open_iteration(folder: str, source: str) -> tuple[RunConfig, dict]:
    """The configuration and meta of the iteration folder `folder`, once every file is present with its recorded
    size (CheckpointError otherwise; `source` says how the folder was chosen)."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{source} {folder} does not exist; the checkpoint was deleted or moved")
    meta = read_json(os.path.join(folder, META_FILENAME), "metadata file")
    if FILE_RECORDS in meta and CONFIG_FILENAME in meta[FILE_RECORDS]:
        verify_file(os.path.join(folder, CONFIG_FILENAME), meta[FILE_RECORDS][CONFIG_FILENAME])
    config = read_run_config(folder)
    expected = _tensor_files(folder, config, meta)
    missing = [path for path in expected if not os.path.isfile(path)]
    if missing:
        shown = ", ".join(os.path.relpath(path, folder) for path in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise CheckpointError(f"{source} {folder} is incomplete: missing {shown}{more}")
    for path in expected:
        record = file_record(folder, meta, path)
        if record is not None:
            check_file_size(path, record)
    return config, meta


def _tensor_files(folder: str, config: RunConfig, meta: dict) -> list[str]:
    """The shard files of the checkpoint in `folder` (checkpoint_files without meta.json)."""
    return [path for path in checkpoint_files(folder, config, bool(meta.get("model_only")))
            if os.path.basename(path) != META_FILENAME]


def newest_intact_iteration(checkpoint_dir: str, before: int) -> int | None:
    """The newest iteration below `before` whose every file is present and matches its recorded sha256."""
    for iteration in reversed([n for n in saved_iterations(checkpoint_dir) if n < before]):
        folder = iteration_dir(checkpoint_dir, iteration)
        try:
            config, meta = _open_iteration(folder, "")
            for path in _tensor_files(folder, config, meta):
                record = file_record(folder, meta, path)
                if record is not None:
                    verify_file(path, record)
        except CheckpointError:
            continue
        return iteration
    return None


def with_earlier_checkpoint(error: CheckpointError, checkpoint_dir: str, iteration: int) -> CheckpointError:
    """`error` about iteration `iteration`, completed with the newest intact earlier iteration to load instead."""
    earlier = newest_intact_iteration(checkpoint_dir, iteration)
    hint = (f"the newest intact earlier checkpoint is iteration {earlier}: load it with --ckpt-step {earlier}"
            if earlier is not None else f"{checkpoint_dir} holds no intact checkpoint before iteration {iteration}")
    return CheckpointError(f"{error}; {hint}")


def open_checkpoint(checkpoint_dir: str, iteration: int | None = None) -> tuple[str, RunConfig, dict]:
    """Locate a complete checkpoint (the published one, or `iteration`): returns (iteration folder, its run
    configuration, meta) or raises CheckpointError naming what is wrong and the iteration to load instead."""
    if iteration is None:
        iteration = read_tracker(checkpoint_dir)
        source = f"{tracker_path(checkpoint_dir)} names iteration {iteration}, but"
    else:
        if not os.path.isdir(checkpoint_dir):
            raise CheckpointError(f"checkpoint directory {checkpoint_dir} does not exist; check --load")
        source = f"iteration {iteration} was requested, but"
    folder = iteration_dir(checkpoint_dir, iteration)
    try:
        config, meta = _open_iteration(folder, source)
    except CheckpointError as error:
        raise with_earlier_checkpoint(error, checkpoint_dir, iteration) from None
    return folder, config, meta


def read_checkpoint_file(folder: str, meta: dict, path: str, mmap: bool = False):
    """A tensor file of the checkpoint in `folder`, checked against meta.json's record before it is unpickled."""
    try:
        return load_tensor_file(path, mmap, file_record(folder, meta, path))
    except CheckpointError as error:
        raise with_earlier_checkpoint(error, os.path.dirname(folder), int(meta["iteration"])) from None


# -------------------------------------------------------------------------- model-only API (converters)

def write_model_checkpoint(save_dir: str, iteration: int, config: ModelConfig, state_dict: dict,
                           run_config: RunConfig | None = None, tensor_parallel_size: int = 1,
                           pipeline_parallel_size: int = 1):
    """Write a model-only checkpoint that the trainer can --load (it starts from iteration 0 with a fresh optimizer);
    `run_config` records what else is known (e.g. the tokenizer), its model and layout replaced by these."""
    shards = split_state_dict(config, state_dict, tensor_parallel_size, pipeline_parallel_size)
    folder = iteration_dir(save_dir, iteration)
    records = {}
    for (tensor_rank, pipeline_rank), shard in shards.items():
        directory = shard_dir(folder, tensor_rank, pipeline_rank)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, MODEL_FILENAME)
        records[os.path.relpath(path, folder)] = atomic_torch_save(shard, path)
    layout = ParallelConfig(tensor_model_parallel_size=tensor_parallel_size,
                            pipeline_model_parallel_size=pipeline_parallel_size)
    recorded = dataclasses.replace(run_config or RunConfig(), model=config, parallel=layout)
    records[CONFIG_FILENAME] = atomic_write_json(os.path.join(folder, CONFIG_FILENAME), recorded.to_dict())
    atomic_write_json(os.path.join(folder, META_FILENAME),
                      {"iteration": iteration, "consumed_train_samples": 0, "model_only": True, FILE_RECORDS: records})
    write_tracker(save_dir, iteration)


def read_model_shards(folder: str, config: RunConfig, meta: dict) -> dict[tuple[int, int], dict]:
    """Every (tensor rank, pipeline rank)'s model.pt of the checkpoint in `folder`, each verified."""
    tp, pp, _ = parallel_sizes(config.parallel)
    return {(tensor_rank, pipeline_rank):
            read_checkpoint_file(folder, meta, os.path.join(shard_dir(folder, tensor_rank, pipeline_rank),
                                                            MODEL_FILENAME))
            for pipeline_rank in range(pp) for tensor_rank in range(tp)}


def read_model_checkpoint(load_dir: str, iteration: int | None = None) -> tuple[ModelConfig, dict, RunConfig]:
    """(ModelConfig, full state dict as a tp=1 model holds it, the run's configuration) of a saved checkpoint."""
    folder, run_config, meta = open_checkpoint(load_dir, iteration)
    config = run_config.model
    state_dict = merge_shards(config, read_model_shards(folder, run_config, meta),
                              run_config.parallel.tensor_model_parallel_size)
    return config, state_dict, run_config


# ------------------------------------------------------------------------------- trainer save and load

def capture_rng_state() -> dict:
    """Every random generator this rank draws from: python, numpy, torch CPU and this rank's CUDA device."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": {"version": version, "state": list(python_state), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device only: one GPU per rank
    return state


def restore_rng_state(state: dict):
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch_cpu"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, list):  # written before checkpoints kept one device per rank
            cuda = cuda[torch.cuda.current_device()]
        torch.cuda.set_rng_state(cuda)


def _on_host(value, copy: bool):
    """`value` (nested dicts, lists and tuples of tensors and plain values) with every tensor on the CPU, held by
    its own storage: a view into a larger buffer (the distributed optimizer's parameter buckets) is copied out, so
    the file holds the tensor alone; `copy` copies every tensor, so that training may go on changing the originals
    while a background thread writes them (--async-save)."""
    if torch.is_tensor(value):
        value = value.detach()
        if copy or value.device.type != "cpu" or (
                value.untyped_storage().nbytes() != value.numel() * value.element_size()):
            return value.to("cpu", copy=True)
        return value
    if isinstance(value, dict):
        return {key: _on_host(item, copy) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_host(item, copy) for item in value)
    return value


@dataclass
class CheckpointSnapshot:
    """One rank's part of a checkpoint, in host memory: the files of its shard folder by name, and the entries
    rank 0 writes into meta.json."""

    iteration: int
    files: dict[str, object]
    meta: dict


def snapshot_checkpoint(iteration: int, *, model: torch.nn.Module, optimizer, consumed_train_samples: int,
                        lr_schedule_state: dict, loss_scaler_state: dict | None, layout: ParallelLayout,
                        copy: bool = False) -> CheckpointSnapshot:
    """What this rank saves for `iteration`: model.pt (first data-parallel rank only), its optimizer state and
    every RNG state; with `copy`, a copy that no later training step changes."""
    files = {}
    if layout.data_rank == 0:
        files[MODEL_FILENAME] = model.state_dict()
    files[optimizer_filename(layout.data_rank)] = optimizer.state_dict()
    files[rng_filename(layout.data_rank)] = capture_rng_state()
    meta = {"iteration": iteration, "consumed_train_samples": consumed_train_samples, "model_only": False,
            "lr_schedule": lr_schedule_state, "loss_scaler": loss_scaler_state}
    return CheckpointSnapshot(iteration, _on_host(files, copy), _on_host(meta, True))


def write_snapshot(save_dir: str, snapshot: CheckpointSnapshot, config: RunConfig, layout: ParallelLayout,
                   agree: Callable[[bool], bool] | None = None):
    """Write this rank's shard files and the receipt of their checksums; once every rank has (`agree(ok)`: a
    collective over every rank, True when all are ok, e.g. parallel/comm.all_ranks_true; None in one process), rank
    0 writes the configuration, moves every rank's receipt into meta.json and publishes the iteration in the
    tracker, and every rank waits for that. When a rank fails, every rank raises CheckpointError (the failing one
    with its error) and nothing is published."""
    agree = agree or (lambda ok: ok)
    folder = iteration_dir(save_dir, snapshot.iteration)
    failure = None
    try:
        directory = shard_dir(folder, layout.tensor_rank, layout.pipeline_rank)
        os.makedirs(directory, exist_ok=True)
        records = {}
        for filename, value in snapshot.files.items():
            path = os.path.join(directory, filename)
            records[os.path.relpath(path, folder)] = atomic_torch_save(value, path)
        atomic_write_json(os.path.join(directory, receipt_filename(layout.data_rank)), records)
    except Exception as error:  # noqa: BLE001 - every rank must still take part in the agreement
        failure = error
    iteration = snapshot.iteration
    _raise_unless_agreed(agree(failure is None), failure, f"could not write the files of iteration {iteration}",
                         f"another rank could not write its files of iteration {iteration}")
    if layout.tensor_rank == layout.pipeline_rank == layout.data_rank == 0:
        try:
            records = {CONFIG_FILENAME: atomic_write_json(os.path.join(folder, CONFIG_FILENAME), config.to_dict())}
            receipts = _receipt_paths(folder, config)
            for receipt in receipts:
                records.update(read_json(receipt, "checksum receipt"))
            atomic_write_json(os.path.join(folder, META_FILENAME), {**snapshot.meta, FILE_RECORDS: records})
            for receipt in receipts:
                os.remove(receipt)
            write_tracker(save_dir, snapshot.iteration)
        except Exception as error:  # noqa: BLE001
            failure = error
    _raise_unless_agreed(agree(failure is None), failure, f"could not publish iteration {iteration}",
                         f"rank 0 could not publish iteration {iteration}")


def _raise_unless_agreed(agreed: bool, own_failure: Exception | None, own_message: str, others_message: str):
    """CheckpointError on every rank unless all agreed: with this rank's own error, or saying another failed."""
    if own_failure is not None:
        raise CheckpointError(f"{own_message} ({type(own_failure).__name__}: {own_failure}); the previous "
                              f"checkpoint stays the latest") from own_failure
    if not agreed:
        raise CheckpointError(f"{others_message}; the previous checkpoint stays the latest")


def save_checkpoint(save_dir: str, iteration: int, *, model: torch.nn.Module, optimizer, config: RunConfig,
                    consumed_train_samples: int, lr_schedule_state: dict, loss_scaler_state: dict | None,
                    layout: ParallelLayout = ParallelLayout.single_process(), agree=None):
    """Save and publish `iteration` now (write_snapshot); every rank returns once it is published."""
    snapshot = snapshot_checkpoint(iteration, model=model, optimizer=optimizer,
                                   consumed_train_samples=consumed_train_samples,
                                   lr_schedule_state=lr_schedule_state, loss_scaler_state=loss_scaler_state,
                                   layout=layout)
    write_snapshot(save_dir, snapshot, config, layout, agree)


def _receipt_paths(folder: str, config: RunConfig) -> list[str]:
    """The checksum receipt of every rank of the layout that saved into `folder`."""
    tp, pp, dp = parallel_sizes(config.parallel)
    return [os.path.join(shard_dir(folder, tensor_rank, pipeline_rank), receipt_filename(data_rank))
            for pipeline_rank in range(pp) for tensor_rank in range(tp) for data_rank in range(dp)]


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
    another tokenizer."""
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
    return []


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
    saved, meta = _open_iteration(folder, "the checkpoint")
    _load_model_state(folder, saved, meta, model, config, layout)


def load_checkpoint(load_dir: str, *, model: torch.nn.Module, optimizer, config: RunConfig,
                    layout: ParallelLayout = ParallelLayout.single_process()) -> tuple[ResumeState, str]:
    """Load the newest checkpoint of `load_dir` (or iteration --ckpt-step) into `model` and `optimizer`; returns
    its state and a log line. Every file read is first checked against its checksum in meta.json.

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
    folder, saved, meta = open_checkpoint(load_dir, config.checkpoint.ckpt_step)
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
    relayout = "" if same_split and same_optimizer else (
        f", re-split from tensor/pipeline/data {parallel_sizes(saved.parallel)} "
        f"{'with' if saved.parallel.use_distributed_optimizer else 'without'} the distributed optimizer"
        f"{'' if same_split else '; random generators as seeded for this layout'}")
    return state, (f"resumed from {folder}: iteration {state.iteration}, "
                   f"{state.consumed_train_samples} samples consumed{relayout}")


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
