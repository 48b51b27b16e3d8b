"""A checkpoint's files on disk: names, atomic checksummed writes, verified reads, the tracker.

    {save}/iter_{iteration:07d}/                      one folder per saved iteration (its content: the package
                                                      docstring, megatron_llama/checkpoint/__init__.py)
    {save}/latest_checkpointed_iteration.txt          the published iteration, written last
    {save}/unpublished_iter_{iteration:07d}/          an interrupted save, set aside by a restart in place
    {save}/writer.lock                                held by the one trainer writing into {save} (writer_lock.py)

Writing: every file goes to a temporary name, is flushed, fsynced and renamed, so its final name only ever holds a
complete file. The sha256 and size of the bytes are computed while they are written (a record,
{"sha256": hex, "bytes": n}); saving.py gathers the records of an iteration into its meta.json.

Reading: `load_tensor_file(path, record=...)` first compares the file with its record (size, then sha256), so a
truncated or corrupted file is named and never unpickled; torch.load(weights_only=True) reads tensors and plain
Python values only, so a checkpoint can never run code.

The tracker is an index of the newest published iteration, not the only record of what is on disk: a restart in
place (restart_in_place.py) goes by the folders' own checksums when it is missing.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import torch

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CONFIG_FILENAME = "config.json"
LEGACY_ARGS_FILENAME = "args.json"  # the flat argument record of checkpoints written before config.json
META_FILENAME = "meta.json"
MODEL_FILENAME = "model.pt"
FILE_RECORDS = "files"  # meta.json's entry: path inside the iteration folder -> {"sha256", "bytes"}
UNPUBLISHED_PREFIX = "unpublished_"
_ITERATION_FOLDER = re.compile(r"iter_(\d{7,})")
_READ_CHUNK_BYTES = 1 << 24


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the run; the message says what to change."""


# ----------------------------------------------------------------------------------------------- names

def iteration_dir(checkpoint_dir: str, iteration: int) -> str:
    return os.path.join(checkpoint_dir, f"iter_{iteration:07d}")


def shard_dir(iter_dir: str, tensor_parallel_rank: int, pipeline_parallel_rank: int) -> str:
    return os.path.join(iter_dir, f"mp_rank_{tensor_parallel_rank:02d}_{pipeline_parallel_rank:03d}")


def optimizer_filename(data_parallel_rank: int) -> str:
    return f"optim_dp_{data_parallel_rank:03d}.pt"


def rng_filename(data_parallel_rank: int) -> str:
    return f"rng_dp_{data_parallel_rank:03d}.pt"


def receipt_filename(data_parallel_rank: int) -> str:
    """The records of the files one rank wrote into its shard folder, until rank 0 moves them into meta.json."""
    return f"checksums_dp_{data_parallel_rank:03d}.json"


def tracker_path(checkpoint_dir: str) -> str:
    return os.path.join(checkpoint_dir, TRACKER_FILENAME)


def saved_iterations(checkpoint_dir: str) -> list[int]:
    """The iterations that have a folder in `checkpoint_dir`, published or not, in increasing order."""
    if not os.path.isdir(checkpoint_dir):
        return []
    found = (_ITERATION_FOLDER.fullmatch(name) for name in os.listdir(checkpoint_dir))
    return sorted(int(match.group(1)) for match in found if match)


# ------------------------------------------------------------------------------------------- writing

class _HashingWriter:
    """A binary file that hashes every byte written through it."""

    def __init__(self, handle):
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        return self.handle.write(view)

    def flush(self):
        self.handle.flush()

    def record(self) -> dict:
        return {"sha256": self.digest.hexdigest(), "bytes": self.size}


def _write_atomically(path: str, write) -> dict:
    """Call write(file) on a temporary file, fsync it, rename it to `path`; the record of the bytes written."""
    temporary = path + ".tmp"
    with open(temporary, "wb") as handle:
        writer = _HashingWriter(handle)
        write(writer)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return writer.record()


def atomic_torch_save(obj, path: str) -> dict:
    """torch.save under a temporary name, fsync, rename: `path` only ever holds a complete file. Returns its record."""
    return _write_atomically(path, lambda writer: torch.save(obj, writer))


def atomic_write_text(path: str, text: str) -> dict:
    return _write_atomically(path, lambda writer: writer.write(text.encode()))


def atomic_write_json(path: str, value: dict) -> dict:
    return atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_tracker(checkpoint_dir: str, iteration: int):
    """Publish `iteration` as the newest complete checkpoint. Call only after every rank's files are written."""
    atomic_write_text(tracker_path(checkpoint_dir), f"{iteration}\n")


# ------------------------------------------------------------------------------------------- reading

def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_file_size(path: str, record: dict):
    """CheckpointError unless `path` has the size recorded when it was written (cheap: no byte is read)."""
    size = os.path.getsize(path)
    if size != record["bytes"]:
        state = "truncated" if size < record["bytes"] else "longer than written"
        raise CheckpointError(f"checkpoint file {path} is {state}: {size} bytes, {record['bytes']} when it was saved")


def verify_file(path: str, record: dict):
    """CheckpointError unless `path` has the size and sha256 recorded when it was written."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete")
    check_file_size(path, record)
    if file_sha256(path) != record["sha256"]:
        raise CheckpointError(f"checkpoint file {path} is corrupt: its sha256 differs from the one recorded when it "
                              f"was saved")


def load_tensor_file(path: str, mmap: bool = False, record: dict | None = None):
    """torch.load restricted to tensors and plain Python values (weights_only=True), after checking the file
    against its `record` when one is given; `mmap` reads lazily."""
    if record is not None:
        verify_file(path, record)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete") from None
    except Exception as error:  # noqa: BLE001 - any unpickling failure means an unreadable file
        raise CheckpointError(f"cannot read checkpoint file {path}: {error}") from error


def read_json(path: str, what: str) -> dict:
    """A JSON file of a checkpoint, or a CheckpointError naming it (missing, or not JSON: cut short or garbled)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path} is missing; the checkpoint is incomplete")
    try:
        with open(path) as handle:
            value = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{what} {path} is not valid JSON ({error}); the file is damaged") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} {path} should hold a JSON object; the file is damaged")
    return value


def read_tracker(checkpoint_dir: str) -> int:
    """The iteration named by the tracker file, with an error saying what is wrong when there is none."""
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointError(f"checkpoint directory {checkpoint_dir} does not exist; check --load")
    path = tracker_path(checkpoint_dir)
    if not os.path.isfile(path):
        found = [os.path.basename(iteration_dir(checkpoint_dir, n)) for n in saved_iterations(checkpoint_dir)]
        hint = (f"; it holds {', '.join(found)} but none was published (a save was interrupted before it "
                f"finished); pass --ckpt-step N to load one of them anyway, or restart with --save equal to --load "
                f"to set them aside and start afresh") if found else "; it holds no checkpoint at all"
        raise CheckpointError(f"no {TRACKER_FILENAME} in {checkpoint_dir}{hint}")
    text = open(path, errors="replace").read().strip()
    try:
        iteration = int(text)
    except ValueError:
        iteration = -1
    if iteration < 0:
        raise CheckpointError(f"{path} should hold an iteration number but holds {text!r} (a number >= 0); "
                              f"write the iteration to resume from into it (or pass --ckpt-step N); nothing was "
                              f"changed")
    return iteration
