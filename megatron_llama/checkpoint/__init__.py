"""Checkpoints: save, load and exact resume for the trainer (one Checkpointer); model-only read/write for the
converters.

On-disk layout (one folder per saved iteration, one shard file per rank; file names: files.py):

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
    {save}/unpublished_iter_{iteration:07d}/       an interrupted save, set aside by a restart in place

Crash safety: every file is written under a temporary name, flushed to disk and renamed; the tracker file is
replaced only after every file of the iteration is complete, so a reader following the tracker never sees a
half-written checkpoint. A restart with --load equal to --save resumes the published iteration (without a tracker:
the newest one whose checksums verify), sets aside the newer folders that fail verification and goes on
(restart_in_place.py); a folder whose checksums verify is never renamed or deleted.

One writer: the trainer writing into --save holds {save}/writer.lock (writer_lock.py); a second one is refused.

Finiteness: every tensor read is checked finite (a NaN in a checkpoint is never resumed, converted or generated
from) and a save refuses to publish a state holding NaN/Inf (finiteness.py).

Checksums: each rank computes the sha256 of the files it writes while writing them and leaves the records in its
shard folder (checksums_dp_{dp:03d}.json); once every rank is done, rank 0 moves them all into meta.json, then
publishes. Each rank verifies the files it reads against meta.json (sizes of all files when the checkpoint is
opened, sha256 when a file is read); a truncated or corrupt file is named together with the newest intact earlier
iteration, which `--ckpt-step N` loads. Checkpoints written before meta.json held "files" load unverified.

Pipeline shards: rank r's shard holds the state dicts of all its model chunks merged (names are global); which
blocks a rank holds is the recorded configuration's stage split (RunConfig.stage_split).

Checkpoints written before config.json hold args.json instead (every flag by name, the model under "model"); they
load as they are: reading.open_checkpoint converts that record (RunConfig.from_flat_arguments).

Modules, each one job:
    files.py         names, atomic checksummed writes, verified reads, the tracker
    finiteness.py    the first tensor of a state holding NaN/Inf
    writer_lock.py   one trainer per save directory
    restart_in_place.py  the iteration a restart in place resumes; interrupted saves set aside
    resharding.py    shards merged into whole tensors and split for another parallel layout (tensor/pipeline)
    reading.py       finding and opening a checkpoint, verified reads, the whole model of any layout
    saving.py        a rank's snapshot, its files, every rank's agreement, publishing; model-only checkpoints
    rng_state.py     every random generator's state, captured and restored
    loading.py       loading into the model and optimizer at any layout; the checks that a checkpoint fits the run
    async_save.py    --async-save: the snapshot written and published on a background thread
    checkpointer.py  the trainer's one entry: find the checkpoint to start from, resume, the save policy, save

The trainer (pretrain.py, training.py):
    resume_from = find_resume_checkpoint(config, notes)            # before any process group starts
    checkpointer = Checkpointer(config, layout, model, optimizer, lr_schedule, log)
    iteration, consumed_train_samples = checkpointer.resume(resume_from)
    if checkpointer.is_due(iteration): checkpointer.save(iteration, consumed_train_samples)
    checkpointer.close()

Converters and tools:
    model_config, state_dict, run_config = read_model_checkpoint(load_dir, iteration=None)
    write_model_checkpoint(save_dir, iteration, model_config, state_dict, run_config=None,
                           tensor_parallel_size=1, pipeline_parallel_size=1)
"""
from megatron_llama.checkpoint.checkpointer import Checkpointer, dpo_reference_folder, find_resume_checkpoint
from megatron_llama.checkpoint.files import CheckpointError, iteration_dir, read_tracker, tracker_path
from megatron_llama.checkpoint.loading import load_checkpoint, load_weights
from megatron_llama.checkpoint.reading import open_checkpoint, read_model_checkpoint
from megatron_llama.checkpoint.resharding import split_state_dict
from megatron_llama.checkpoint.restart_in_place import set_aside_unpublished
from megatron_llama.checkpoint.saving import write_model_checkpoint

__all__ = ["CheckpointError", "Checkpointer", "dpo_reference_folder", "find_resume_checkpoint", "iteration_dir",
           "load_checkpoint", "load_weights", "open_checkpoint", "read_model_checkpoint", "read_tracker",
           "set_aside_unpublished", "split_state_dict", "tracker_path", "write_model_checkpoint"]
