"""Asynchronous checkpoint saves (--async-save): the training step waits only for a copy of this rank's state in
host memory; a background thread writes the files (with their checksums) and publishes the iteration.

    saver = AsyncCheckpointSaver(agree)         # agree(ok): parallel/comm.all_ranks_true on a group of its own
    saver.save(save_dir, take_snapshot, config, layout)   # waits for the previous save, calls take_snapshot()
                                                          # (a CheckpointSnapshot), returns at once
    saver.wait()                                # before the process ends: the last save is written and published

The background thread runs saving.write_snapshot, the same code a synchronous save runs, on a snapshot
copied with saving.snapshot_checkpoint(copy=True), so both write identical files. Publishing is unchanged:
every rank's files and receipt first, every rank's agreement, then rank 0 writes meta.json and the tracker last. The
agreement runs on the background thread, so it needs a process group that the training thread never uses at the
same time: the Checkpointer builds one (gloo, every rank) for it. A process killed while the thread writes leaves the
tracker naming the previous iteration, and the new folder unpublished (a restart in place sets it aside).

One save is in flight at most: the next save, and the end of training, wait for the previous one first. A
failure of the background write is raised by that wait, as a CheckpointError naming the iteration.
"""
from __future__ import annotations

import threading
from typing import Callable

from megatron_llama.checkpoint.files import CheckpointError
from megatron_llama.checkpoint.saving import CheckpointSnapshot, write_snapshot
from megatron_llama.config import RunConfig
from megatron_llama.parallel.state import ParallelLayout


class AsyncCheckpointSaver:
    """Writes one checkpoint snapshot at a time on a background thread (module docstring)."""

    def __init__(self, agree: Callable[[bool], bool] | None = None):
        self.agree = agree
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._iteration: int | None = None

    def save(self, save_dir: str, take_snapshot: Callable[[], CheckpointSnapshot], config: RunConfig,
             layout: ParallelLayout):
        """Wait for the previous save (so that host memory holds one snapshot at most), take the snapshot, then
        write and publish it in the background."""
        self.wait()
        snapshot = take_snapshot()
        self._iteration = snapshot.iteration
        # A daemon thread: a process that dies mid-write stops it, and leaves the iteration unpublished.
        self._thread = threading.Thread(target=self._write, args=(save_dir, snapshot, config, layout),
                                        name=f"checkpoint-writer-{snapshot.iteration}", daemon=True)
        self._thread.start()

    def _write(self, save_dir: str, snapshot: CheckpointSnapshot, config: RunConfig, layout: ParallelLayout):
        try:
            write_snapshot(save_dir, snapshot, config, layout, self.agree)
        except BaseException as error:  # noqa: BLE001 - handed to the training thread by wait()
            self._failure = error

    def wait(self):
        """Return once the save in flight (if any) is written and published; raise what made it fail."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        failure, self._failure = self._failure, None
        if isinstance(failure, CheckpointError):  # says the iteration and that nothing was published
            raise CheckpointError(f"asynchronous save: {failure}") from failure
        if failure is not None:
            raise CheckpointError(f"the asynchronous save of iteration {self._iteration} failed: {failure}; "
                                  f"the previous checkpoint stays the latest") from failure
