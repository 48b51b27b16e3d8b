"""One writer per save directory: {save}/writer.lock, held (fcntl.flock) by the trainer that writes into it.

    notice = claim_save_directory(save)     # rank 0, before anything in `save` is touched; CheckpointError if held
    release_save_directory(save)            # at the end of the run (the process ending releases it as well)

The lock lives as long as the open file: the kernel drops it when the holder exits or is killed, so a lock left by a
dead trainer is free and is taken over with a notice naming the previous holder. The file records the holder (host,
pid, start time) so that a second trainer started on the same --save (a requeued job while the first still runs)
refuses at once, naming it, instead of setting aside the first one's save in progress. A process that claims a
directory it already holds (pretrain.main called again in one process) keeps its lock.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket

from megatron_llama.checkpoint.files import CheckpointError

WRITER_LOCK_FILENAME = "writer.lock"
_held: dict[str, int] = {}  # save directory (absolute) -> the open file descriptor that holds its lock


def _holder_text(record: str) -> str:
    try:
        holder = json.loads(record)
        return f"host {holder['host']} pid {holder['pid']} (started {holder['started']})"
    except (ValueError, KeyError, TypeError):
        return "an unknown process"


def claim_save_directory(save_dir: str) -> str | None:
    """Take the writer lock of `save_dir` (created if absent) for this process; returns a notice when a dead
    holder's lock was taken over. CheckpointError naming the holder when a live process holds it."""
    directory = os.path.abspath(save_dir)
    if directory in _held:
        return None
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, WRITER_LOCK_FILENAME)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_text(open(path).read())
        os.close(descriptor)
        raise CheckpointError(f"--save {save_dir} is in use by another trainer, {holder}, which holds {path}; stop "
                              f"it or give this run another --save") from None
    previous = os.pread(descriptor, 4096, 0).decode(errors="replace").strip()
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(descriptor)
    _held[directory] = descriptor
    if previous:
        return (f"took over {path} from {_holder_text(previous)}, which no longer runs (it stopped without "
                f"releasing it)")
    return None


def release_save_directory(save_dir: str) -> None:
    """Give up this process's writer lock of `save_dir`, if it holds it."""
    descriptor = _held.pop(os.path.abspath(save_dir), None)
    if descriptor is not None:
        os.ftruncate(descriptor, 0)
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)
