"""Saving: a trainer checkpoint of every rank, published only when every rank's files are complete; and the
model-only checkpoints the converters write.

    snapshot = snapshot_checkpoint(iteration, model=..., optimizer=..., consumed_train_samples=...,
                                   lr_schedule_state=..., loss_scaler_state=..., layout=layout, copy=False)
    write_snapshot(save_dir, snapshot, config, layout, agree)       # files, receipt, agreement, publish
    save_checkpoint(save_dir, iteration, ...)                       # both, now (async_save.py: on a thread)
    write_model_checkpoint(save_dir, iteration, model_config, state_dict, run_config=None,
                           tensor_parallel_size=1, pipeline_parallel_size=1)

A trainer save has two steps. snapshot_checkpoint takes this rank's state into host memory (model.pt on the first
data-parallel rank, its optimizer shard, every RNG state; the meta.json entries). write_snapshot writes those files,
each with its checksum record (files.py), and the receipt of the records in the shard folder
(checksums_dp_{dp:03d}.json); then every rank agrees (`agree(ok)`: parallel/comm.all_ranks_true on a gloo group of
its own, which the Checkpointer builds); rank 0 writes config.json, moves every rank's receipt into meta.json and
publishes the iteration in the tracker, and a second agreement ends the save. When any rank could not write its
files, every rank raises CheckpointError at once and nothing is published.

Pipeline shards: rank r's model.pt holds the state dicts of all its model chunks merged (names are global).
A model-only checkpoint (write_model_checkpoint) is split for any tensor/pipeline size (resharding.py) and accepts
an embedding and head of any number of rows >= vocab_size; the trainer starts it at iteration 0.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_llama.checkpoint.files import (CONFIG_FILENAME, FILE_RECORDS, META_FILENAME, MODEL_FILENAME,
                                             CheckpointError, atomic_torch_save, atomic_write_json, iteration_dir,
                                             optimizer_filename, read_json, receipt_filename, rng_filename,
                                             shard_dir, write_tracker)
from megatron_llama.checkpoint.finiteness import first_non_finite
from megatron_llama.checkpoint.reading import parallel_sizes
from megatron_llama.checkpoint.resharding import split_state_dict
from megatron_llama.checkpoint.rng_state import capture_rng_state
from megatron_llama.config import ModelConfig, ParallelConfig, RunConfig
from megatron_llama.parallel.state import ParallelLayout


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
            problem = first_non_finite(value, filename)
            if problem is not None:
                raise CheckpointError(f"{problem} (rank {layout.rank}): a non-finite state is never published")
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


def write_model_checkpoint(save_dir: str, iteration: int, config: ModelConfig, state_dict: dict,
                           run_config: RunConfig | None = None, tensor_parallel_size: int = 1,
                           pipeline_parallel_size: int = 1):
    """Write a model-only checkpoint that the trainer can --load (it starts from iteration 0 with a fresh optimizer);
    `run_config` records what else is known (e.g. the tokenizer), its model and parallel sizes replaced by these."""
    shards = split_state_dict(config, state_dict, tensor_parallel_size, pipeline_parallel_size)
    folder = iteration_dir(save_dir, iteration)
    records = {}
    for (tensor_rank, pipeline_rank), shard in shards.items():
        directory = shard_dir(folder, tensor_rank, pipeline_rank)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, MODEL_FILENAME)
        records[os.path.relpath(path, folder)] = atomic_torch_save(shard, path)
    parallel = ParallelConfig(tensor_model_parallel_size=tensor_parallel_size,
                              pipeline_model_parallel_size=pipeline_parallel_size)
    recorded = dataclasses.replace(run_config or RunConfig(), model=config, parallel=parallel)
    records[CONFIG_FILENAME] = atomic_write_json(os.path.join(folder, CONFIG_FILENAME), recorded.to_dict())
    atomic_write_json(os.path.join(folder, META_FILENAME),
                      {"iteration": iteration, "consumed_train_samples": 0, "model_only": True, FILE_RECORDS: records})
    write_tracker(save_dir, iteration)
