"""Finding and opening a saved checkpoint: its recorded configuration, its completeness, verified reads, the
newest intact earlier iteration to offer when one is damaged, and the whole model of any layout for the converters.

    folder, saved_config, meta = open_checkpoint(load_dir)             # the published iteration (or iteration=N)
    tensors = read_checkpoint_file(folder, meta, path)                 # checked against meta.json's sha256 first
    model_config, state_dict, run_config = read_model_checkpoint(load_dir, iteration=None)

Opening checks that every file of the iteration is present with the size meta.json records; reading a file checks
its sha256 before it is unpickled, then every tensor in it is checked finite. A truncated, corrupt or non-finite
file raises CheckpointError naming it (and the tensor) together with the newest intact earlier iteration (complete,
verified and finite), which `--ckpt-step N` loads. Checkpoints written before meta.json held "files"
load unverified; those written before config.json hold args.json instead (every flag by name, the model under
"model"), converted by RunConfig.from_flat_arguments.

read_model_checkpoint returns the embedding and head with the tp=1 vocabulary padding (resharding.merge_shards).
"""
from __future__ import annotations

import os

from megatron_llama.checkpoint.files import (CONFIG_FILENAME, FILE_RECORDS, LEGACY_ARGS_FILENAME, META_FILENAME,
                                             MODEL_FILENAME, CheckpointError, check_file_size, iteration_dir,
                                             load_tensor_file, optimizer_filename, read_json, read_tracker,
                                             rng_filename, saved_iterations, shard_dir, tracker_path, verify_file)
from megatron_llama.checkpoint.finiteness import first_non_finite
from megatron_llama.checkpoint.resharding import merge_shards
from megatron_llama.config import ModelConfig, ParallelConfig, RunConfig


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


def expected_files(iter_dir: str, config: RunConfig, model_only: bool) -> list[str]:
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


def open_iteration_folder(folder: str, source: str) -> tuple[RunConfig, dict]:
    """The configuration and meta of the iteration folder `folder`, once every file is present with its recorded
    size (CheckpointError otherwise; `source` says how the folder was chosen)."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{source} {folder} does not exist; the checkpoint was deleted or moved")
    meta = read_json(os.path.join(folder, META_FILENAME), "metadata file")
    if FILE_RECORDS in meta and CONFIG_FILENAME in meta[FILE_RECORDS]:
        verify_file(os.path.join(folder, CONFIG_FILENAME), meta[FILE_RECORDS][CONFIG_FILENAME])
    config = read_run_config(folder)
    expected = tensor_files(folder, config, meta)
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


def tensor_files(folder: str, config: RunConfig, meta: dict) -> list[str]:
    """The shard files of the checkpoint in `folder` (expected_files without meta.json)."""
    return [path for path in expected_files(folder, config, bool(meta.get("model_only")))
            if os.path.basename(path) != META_FILENAME]


def verification_problem(folder: str) -> str | None:
    """None when the iteration folder `folder` is complete and every file matches its recorded size and sha256
    (checkpoints written before checksums: every file present), else what is wrong with it."""
    try:
        config, meta = open_iteration_folder(folder, "")
        for path in tensor_files(folder, config, meta):
            record = file_record(folder, meta, path)
            if record is not None:
                verify_file(path, record)
    except CheckpointError as error:
        return str(error).strip()
    return None


def _non_finite_problem(folder: str) -> str | None:
    """What in the verified iteration folder `folder` holds NaN/Inf, or None."""
    config, meta = open_iteration_folder(folder, "")
    for path in tensor_files(folder, config, meta):
        problem = first_non_finite(load_tensor_file(path, mmap=True), _HOLDS[_file_kind(path)])
        if problem is not None:
            return f"{path}: {problem}"
    return None


def newest_intact_iteration(checkpoint_dir: str, before: int | None = None) -> int | None:
    """The newest iteration (below `before`, when given) whose every file is present, matches its recorded sha256
    and holds only finite values."""
    candidates = [n for n in saved_iterations(checkpoint_dir) if before is None or n < before]
    for iteration in reversed(candidates):
        folder = iteration_dir(checkpoint_dir, iteration)
        if verification_problem(folder) is None and _non_finite_problem(folder) is None:
            return iteration
    return None


def with_earlier_checkpoint(error: CheckpointError, checkpoint_dir: str, iteration: int) -> CheckpointError:
    """`error` about iteration `iteration`, completed with the newest intact earlier iteration to load instead."""
    earlier = newest_intact_iteration(checkpoint_dir, iteration)
    hint = (f"the newest intact earlier checkpoint is iteration {earlier}: load it with --ckpt-step {earlier}"
            if earlier is not None else
            f"{checkpoint_dir} holds no intact checkpoint before iteration {iteration} (for --ckpt-step N)")
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
        config, meta = open_iteration_folder(folder, source)
    except CheckpointError as error:
        raise with_earlier_checkpoint(error, checkpoint_dir, iteration) from None
    return folder, config, meta


_HOLDS = {"model": "weight", "optim": "optimizer state", "rng": "random state"}


def _file_kind(path: str) -> str:
    """model, optim or rng: what a shard file holds, by its name (files.py)."""
    return os.path.basename(path).split("_")[0].split(".")[0]


def read_checkpoint_file(folder: str, meta: dict, path: str, mmap: bool = False):
    """A tensor file of the checkpoint in `folder`, checked against meta.json's record before it is unpickled and
    refused when a tensor in it holds NaN/Inf (a poisoned checkpoint is never loaded)."""
    iteration = int(meta["iteration"])
    try:
        state = load_tensor_file(path, mmap, file_record(folder, meta, path))
        problem = first_non_finite(state, _HOLDS[_file_kind(path)])
        if problem is not None:
            raise CheckpointError(f"{path}: {problem}: the checkpoint of iteration {iteration} is not finite")
    except CheckpointError as error:
        raise with_earlier_checkpoint(error, os.path.dirname(folder), iteration) from None
    return state


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
