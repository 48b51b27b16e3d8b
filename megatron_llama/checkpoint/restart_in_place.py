"""A restart in place (--load equal to --save): the iteration it resumes, and the leftovers of interrupted saves
set aside so that the run can write again.

    iteration, note = in_place_resume_iteration(save, ckpt_step)   # None: start at iteration 0
    for line in set_aside_unpublished(save, keep=iteration): print(line)

The tracker is an index, not the only truth. When it is present it must name an existing iteration (else the
restart is refused and nothing is touched); when it is missing, the newest iteration whose files all verify against
their meta.json checksums (and hold finite values) is resumed, and the note says so. Only folders newer than the
resumed iteration that fail verification (no meta.json, a missing, truncated or corrupt file: a save that was
killed) are renamed unpublished_iter_..., each with the reason; a folder whose checksums verify is never renamed or
deleted.
"""
from __future__ import annotations

import os

from megatron_llama.checkpoint.files import (TRACKER_FILENAME, UNPUBLISHED_PREFIX, CheckpointError, iteration_dir,
                                             read_tracker, saved_iterations, tracker_path)
from megatron_llama.checkpoint.reading import newest_intact_iteration, verification_problem


def in_place_resume_iteration(checkpoint_dir: str, ckpt_step: int | None) -> tuple[int | None, str | None]:
    """The iteration a restart in place resumes (--ckpt-step, else the tracker's, else the newest intact one; None:
    none, start at iteration 0) and a note for the log when the tracker was missing. CheckpointError, with nothing
    changed, when the tracker is unreadable or names an iteration that has no folder."""
    if os.path.isfile(tracker_path(checkpoint_dir)):
        published = read_tracker(checkpoint_dir)
        if not os.path.isdir(iteration_dir(checkpoint_dir, published)):
            raise CheckpointError(f"{tracker_path(checkpoint_dir)} names iteration {published}, but "
                                  f"{iteration_dir(checkpoint_dir, published)} does not exist; write the iteration "
                                  f"to resume from into it (or pass --ckpt-step N); nothing was changed")
        return (published if ckpt_step is None else ckpt_step), None
    if ckpt_step is not None:
        return ckpt_step, None
    newest = newest_intact_iteration(checkpoint_dir)
    if newest is None:
        return None, f"no checkpoint published in {checkpoint_dir} yet: starting from iteration 0"
    return newest, (f"no {TRACKER_FILENAME} in {checkpoint_dir}: resuming from {iteration_dir(checkpoint_dir, newest)}, "
                    f"the newest checkpoint whose files verify against their checksums")


def set_aside_unpublished(checkpoint_dir: str, keep: int | None = None) -> list[str]:
    """Rename each folder of an iteration newer than the published one and than `keep` that fails verification to
    unpublished_iter_... (what a save left when it was killed before publishing); returns a log line per folder,
    moved or left in place. Call on one rank only, before the run writes anything."""
    has_tracker = os.path.isfile(tracker_path(checkpoint_dir))
    published = read_tracker(checkpoint_dir) if has_tracker else -1
    newest_kept = max(published, -1 if keep is None else keep)
    what = f"the published iteration is {published}" if has_tracker else "no iteration was published"
    lines = []
    for iteration in saved_iterations(checkpoint_dir):
        if iteration <= newest_kept:
            continue
        folder = iteration_dir(checkpoint_dir, iteration)
        problem = verification_problem(folder)
        if problem is None:
            lines.append(f"kept {folder}: it is intact but newer than the iteration resumed ({newest_kept}); this "
                         f"run's save of iteration {iteration} will replace it")
            continue
        target = os.path.join(checkpoint_dir, UNPUBLISHED_PREFIX + os.path.basename(folder))
        attempt = 1
        while os.path.exists(target):
            attempt += 1
            target = os.path.join(checkpoint_dir, f"{UNPUBLISHED_PREFIX}{os.path.basename(folder)}_{attempt}")
        os.rename(folder, target)
        lines.append(f"set aside {folder} as {target}: its save was interrupted before it was published ({what}; "
                     f"{problem}); delete it once you no longer need it")
    return lines
