"""The run's checkpoints behind one object: where a run starts from, resuming, the save policy, sync and async saves.

Before any process group starts (pretrain.py), the checkpoint to start from is found and checked against the run:

    resume_from = find_resume_checkpoint(config, notes)       # an iteration folder of --load, or None
    reference = dpo_reference_folder(config, resume_from)     # DPO only: the frozen reference's folder

Once the model, optimizer and learning-rate schedule exist, the Checkpointer owns everything else:

    checkpointer = Checkpointer(config, layout, model, optimizer, lr_schedule, log=logger.print)
    iteration, consumed_train_samples = checkpointer.resume(resume_from)    # (0, 0) when resume_from is None
    ...
    if checkpointer.is_due(iteration):                        # --save-interval
        checkpointer.save(iteration, consumed_train_samples)  # sync, or --async-save on a background thread
    ...
    checkpointer.close()                                      # the last background save is published, --save
                                                              # released (writer_lock.py)

Every save ends with every rank's agreement (parallel/comm.all_ranks_true) on a gloo group of its own, built here:
the training thread's collectives never share it, which --async-save needs because the agreement then runs on the
background thread. Resuming loads any checkpoint at any layout (loading.py re-splits the weights and the optimizer
state).
"""
from __future__ import annotations

import functools
import os
import time
from typing import Callable

from megatron_llama.checkpoint.async_save import AsyncCheckpointSaver
from megatron_llama.checkpoint.files import CheckpointError, tracker_path
from megatron_llama.checkpoint.loading import check_resumable, load_checkpoint
from megatron_llama.checkpoint.reading import open_checkpoint
from megatron_llama.checkpoint.restart_in_place import in_place_resume_iteration, set_aside_unpublished
from megatron_llama.checkpoint.saving import save_checkpoint, snapshot_checkpoint
from megatron_llama.checkpoint.writer_lock import claim_save_directory, release_save_directory
from megatron_llama.config import RunConfig
from megatron_llama.optim.lr_schedule import LearningRateSchedule
from megatron_llama.parallel import comm
from megatron_llama.parallel.state import ParallelLayout
from megatron_llama.parallel.world import new_gloo_group, world_rank, world_size


def find_resume_checkpoint(config: RunConfig, notes: list[str]) -> str | None:
    """The iteration folder of --load this run starts from (checked against the run: loading.check_resumable,
    whose warnings and notices join `notes`), or None. The first rank first claims --save for this run
    (writer_lock.py: a second trainer on the same --save is refused). A --load folder that is also the --save folder
    means "resume in place" (restart_in_place.py): the published iteration, or without a tracker the newest one
    whose checksums verify; the first rank sets aside the newer folders that fail verification (an interrupted
    save; it prints what it moved), and with nothing to resume the run starts at iteration 0."""
    load, save, step = config.checkpoint.load, config.checkpoint.save, config.checkpoint.ckpt_step
    claimed = save is not None and world_rank() == 0
    if claimed:
        notice = claim_save_directory(save)
        if notice is not None:
            notes.append(notice)
    try:
        return _checked_resume_folder(config, load, save, step, notes)
    except CheckpointError:
        if claimed:
            release_save_directory(save)
        raise


def _checked_resume_folder(config: RunConfig, load: str | None, save: str | None, step: int | None,
                           notes: list[str]) -> str | None:
    if load is None:
        return None
    if save is not None and os.path.abspath(save) == os.path.abspath(load):
        step, note = in_place_resume_iteration(load, step)
        if note is not None:
            notes.append(note)
        if world_rank() == 0:
            for line in set_aside_unpublished(load, keep=step):
                print(line, flush=True)
        if step is None:
            return None
    try:
        folder, saved, meta = open_checkpoint(load, step)
    except CheckpointError as error:
        raise CheckpointError(f"--load {load}: {error}") from None
    notes.extend(check_resumable(folder, saved, config, bool(meta.get("model_only"))))
    return folder


def dpo_reference_folder(config: RunConfig, resume_from: str | None) -> str | None:
    """The iteration folder whose weights are a DPO run's frozen reference (None: the run's initial weights):
    --dpo-reference; else the folder --load --finetune (or a model-only checkpoint) starts from; else, resuming a
    DPO run, the reference its checkpoint records. CheckpointError when it cannot be known."""
    if config.data.dpo_reference is not None:
        reference = os.path.abspath(config.data.dpo_reference)
        if os.path.isfile(tracker_path(reference)):  # a run's folder: its published iteration
            reference = open_checkpoint(reference)[0]
        return reference
    if resume_from is None:
        return None
    _, saved, meta = open_checkpoint(config.checkpoint.load, config.checkpoint.ckpt_step)
    if config.checkpoint.finetune or meta.get("model_only"):
        return os.path.abspath(resume_from)
    if not saved.data.dpo:
        raise CheckpointError(f"--load {resume_from} is not a DPO run's checkpoint; add --finetune to start DPO from "
                              f"its weights (they become the frozen reference)")
    if saved.data.dpo_reference is None:
        raise CheckpointError(f"--load {resume_from} is a DPO run's checkpoint that records no reference (the run "
                              f"started from its initial weights); pass --dpo-reference ITER_DIR")
    return saved.data.dpo_reference


class Checkpointer:
    """This rank's part of the run's checkpoints: resume, the --save-interval policy, saves (module docstring).

    `config` is what every checkpoint records as config.json (with a DPO run's reference already filled in);
    `model`, `optimizer` and `lr_schedule` are what is saved and restored; `log` prints a line on the logging rank.
    Building it is a collective when --save is given in a run of several processes (its agreement group)."""

    def __init__(self, config: RunConfig, layout: ParallelLayout, model, optimizer,
                 lr_schedule: LearningRateSchedule, log: Callable[[str], None]):
        self.config, self.layout, self.log = config, layout, log
        self.model, self.optimizer, self.lr_schedule = model, optimizer, lr_schedule
        self.enabled = bool(config.checkpoint.save)
        group = new_gloo_group() if self.enabled and world_size() > 1 else None
        self._agree = functools.partial(comm.all_ranks_true, group=group) if group is not None else None
        self._async_saver = AsyncCheckpointSaver(self._agree) if self.enabled and config.checkpoint.async_save else None

    def resume(self, resume_from: str | None) -> tuple[int, int]:
        """Load the checkpoint iteration folder `resume_from` (find_resume_checkpoint's) into the model, optimizer and
        loss scaler, at this run's layout whatever layout it was saved at, and log what was loaded; returns
        (iteration, consumed_train_samples) to go on from: (0, 0) when `resume_from` is None or only its weights are
        loaded (--finetune, a model-only checkpoint)."""
        if resume_from is None:
            return 0, 0
        resumed, message = load_checkpoint(resume_from, model=self.model, optimizer=self.optimizer, config=self.config,
                                           layout=self.layout)
        if resumed.loss_scaler is not None and self.optimizer.loss_scaler is not None:
            self.optimizer.loss_scaler.load_state_dict(resumed.loss_scaler)
        self.log(message)
        return resumed.iteration, resumed.consumed_train_samples

    def is_due(self, iteration: int) -> bool:
        """Whether `iteration` is to be saved by the --save-interval policy (never without --save)."""
        interval = self.config.checkpoint.save_interval
        return self.enabled and bool(interval) and iteration % interval == 0

    def save(self, iteration: int, consumed_train_samples: int) -> None:
        """Save `iteration` to --save: published before this returns, or with --async-save copied to host memory
        and written in the background (after the previous background save is published). The log line gives the
        seconds the training loop stood still for it. Call on every rank, once the parameters are up to date and
        checked finite."""
        started = time.perf_counter()
        loss_scaler = self.optimizer.loss_scaler
        state = dict(model=self.model, optimizer=self.optimizer, consumed_train_samples=consumed_train_samples,
                     lr_schedule_state=self.lr_schedule.state_dict(),
                     loss_scaler_state=loss_scaler.state_dict() if loss_scaler else None, layout=self.layout)
        save_dir = self.config.checkpoint.save
        if self._async_saver is not None:
            self._async_saver.save(save_dir, lambda: snapshot_checkpoint(iteration, copy=True, **state), self.config,
                                   self.layout)
            self.log(f"saving checkpoint of iteration {iteration} to {save_dir} in the background "
                     f"(training stalled {time.perf_counter() - started:.2f} s)")
            return
        save_checkpoint(save_dir, iteration, config=self.config, agree=self._agree, **state)
        self.log(f"saved checkpoint of iteration {iteration} to {save_dir} "
                 f"(training stalled {time.perf_counter() - started:.2f} s)")

    def close(self) -> None:
        """Return once a background save in flight is written and published (raise what made it fail), then give
        up the writer lock of --save."""
        try:
            if self._async_saver is not None:
                self._async_saver.wait()
        finally:
            if self.enabled:
                release_save_directory(self.config.checkpoint.save)
