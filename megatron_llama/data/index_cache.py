"""The on-disk cache of dataset index arrays (GPT sample indices, blending indices, token-id ranges).

An entry is a set of .npy arrays plus a description (a JSON object of everything that shapes the arrays: the
identity of the data they index, see IndexedDataset.identity, and every parameter), stored under a name that
hashes the description:

    {cache_path}/{stem}-{hash}-{array}.npy      one file per array, each written atomically
    {cache_path}/{stem}-{hash}-description.json  written last: its presence means the entry is complete

    arrays = cached_index_arrays(cache_path, "gpt-train", description, build)   # every rank calls it

Rank 0 builds a missing entry, the other ranks wait at a barrier, and all ranks memory-map the files. An
entry found under the name but describing something else (copied by hand, edited, half-deleted) raises
IndexCacheError naming its files, never serves arrays silently.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Callable

import numpy as np

from megatron_llama.data import helpers
from megatron_llama.data.errors import DataError
from megatron_llama.parallel import world

logger = logging.getLogger(__name__)


class IndexCacheError(DataError):
    """A cache entry that does not fit the data or parameters it was found for; the message names its files."""


def default_cache_path(prefix: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "index_cache")


def description_hash(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


def cache_entry(cache_path: str, stem: str, description: dict) -> str:
    """The path prefix of the entry's files: {cache_path}/{stem}-{hash}."""
    return os.path.join(cache_path, f"{stem}-{description_hash(description)}")


def delete_advice(entry: str) -> str:
    return f"delete {entry}-* (or pass another --data-cache-path) and run again to rebuild it"


def _save_atomically(path: str, write: Callable) -> None:
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "wb") as handle:
        write(handle)
    os.replace(temporary, path)


def _write_entry(entry: str, description: dict, arrays: dict) -> None:
    cache_path = os.path.dirname(entry)
    try:
        os.makedirs(cache_path, exist_ok=True)
        for name, values in arrays.items():
            _save_atomically(f"{entry}-{name}.npy", lambda h, v=values: np.save(h, v))
        listing = dict(description, arrays=sorted(arrays))
        _save_atomically(f"{entry}-description.json",
                         lambda h: h.write(json.dumps(listing, indent=2, sort_keys=True).encode()))
    except OSError as error:
        raise IndexCacheError(f"cannot write the dataset index cache in {cache_path} ({error}); "
                              f"pass a writable --data-cache-path") from error


def _read_entry(entry: str, description: dict) -> dict:
    """The arrays of a complete entry, memory-mapped; IndexCacheError when it does not match `description`."""
    description_path = f"{entry}-description.json"
    try:
        with open(description_path) as handle:
            stored = json.load(handle)
        names = stored.pop("arrays")
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise IndexCacheError(f"index cache {description_path} is unreadable ({error!r}); {delete_advice(entry)}") from None
    expected = json.loads(json.dumps(description))  # the JSON form: tuples become lists
    if stored != expected:
        differing = sorted(key for key in set(stored) | set(expected) if stored.get(key) != expected.get(key))
        raise IndexCacheError(f"index cache {description_path} was built for other data or parameters "
                              f"({', '.join(differing)} differ from this run's); {delete_advice(entry)}")
    try:
        return {name: np.load(f"{entry}-{name}.npy", mmap_mode="r") for name in names}
    except (OSError, ValueError) as error:
        raise IndexCacheError(f"index cache {entry}: an array file is missing or unreadable ({error}); "
                              f"{delete_advice(entry)}") from None


def cached_index_arrays(cache_path: str, stem: str, description: dict, build: Callable[[], dict]) -> dict:
    """Load the arrays named by `build`'s result from cache_path, building them on rank 0 if missing.

    Every rank must call this (it holds a barrier of every rank when the default process group is started:
    parallel/world.py).
    """
    entry = cache_entry(cache_path, stem, description)
    description_path = f"{entry}-description.json"
    rank = world.world_rank() if world.is_distributed() else 0  # without a group every process builds its own
    if rank == 0 and not os.path.isfile(description_path):
        started = time.perf_counter()
        _write_entry(entry, description, build())
        logger.info("built %s in %.2f s (helpers: %s)", entry, time.perf_counter() - started, helpers.BACKEND)
    world.barrier()
    if not os.path.isfile(description_path):
        raise IndexCacheError(
            f"{description_path} is missing after rank 0 built it; --data-cache-path must be a folder every node shares"
        )
    return _read_entry(entry, description)
