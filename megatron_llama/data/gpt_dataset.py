"""GPT pretraining samples from one .bin/.idx pair: split, epochs, shuffling and the on-disk index cache.

A split (train, valid or test) owns a contiguous range of documents, chosen from `--split 969,30,1`
(weights, or fractions such as 0.9,0.1,0), so no document appears in two splits. Its sequences form one
token stream per epoch (EOD tokens are already in the files when preprocessing used --append-eod); a
sample is seq_length + 1 consecutive tokens of that stream (model inputs and shifted labels), packed across
document boundaries and sharing its last token with the next sample. Three index arrays describe the split:

    doc_idx      [epochs * sequences]      sequence ids, each epoch in its own seeded shuffled order
    sample_idx   [samples + 1, 2]          (position in doc_idx, token offset) where each sample starts
    shuffle_idx  [samples]                 the order samples are served in; the samples of the full epochs
                                           come first, shuffled together, then those of the last epoch,
                                           shuffled on their own, so a partial last epoch is spread evenly

Epochs are added until the split yields at least the requested samples. Shuffling uses
numpy.random.RandomState(seed), whose streams numpy never changes, so the order is a pure function of
(seed, data prefix, split, seq_length, requested samples). The arrays are cached as .npy files in
cache_path (default: an `index_cache` folder beside the data) under a name hashing every input that shapes
them; rank 0 builds them once and writes each atomically, the other ranks wait at a barrier and all
ranks memory-map the files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from typing import Callable

import numpy as np

from megatron_llama.data import helpers
from megatron_llama.data.indexed_dataset import IndexedDataset, data_file_path

logger = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """'969,30,1' or '0.9,0.1,0' -> three fractions summing to 1 (missing trailing parts count as 0)."""
    parts = [part.strip() for part in str(split).replace("/", ",").split(",")]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise ValueError(f"--split {split!r}: every part must be a number, e.g. --split 969,30,1") from None
    if len(values) > 3 or any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(
            f"--split {split!r}: give up to three non-negative numbers (train,valid,test) that are not all zero, "
            f"e.g. --split 969,30,1 or --split 0.9,0.1,0"
        )
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [value / total for value in values]


def split_document_ranges(num_documents: int, fractions: list[float]) -> list[tuple[int, int]]:
    """Contiguous [start, end) document ranges for train/valid/test; boundaries are rounded cumulative shares."""
    boundaries = [0]
    cumulative = 0.0
    for fraction in fractions:
        cumulative += fraction
        boundaries.append(min(num_documents, int(round(cumulative * num_documents))))
    boundaries[-1] = num_documents
    return [(boundaries[i], boundaries[i + 1]) for i in range(len(fractions))]


def default_cache_path(prefix: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "index_cache")


def description_hash(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


def _distributed():
    """torch.distributed when a process group is up; torch is only consulted if something imported it."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed
    return None


def _save_atomically(path: str, write: Callable) -> None:
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "wb") as handle:
        write(handle)
    os.replace(temporary, path)


def cached_index_arrays(cache_path: str, stem: str, description: dict, build: Callable[[], dict]) -> dict:
    """Load the arrays named by `build`'s result from cache_path, building them on rank 0 if missing.

    Files: {stem}-{hash}-{name}.npy per array, then {stem}-{hash}-description.json written last, so the
    description's presence means the set is complete. Every rank must call this (it holds a barrier when
    torch.distributed is initialized).
    """
    key = f"{stem}-{description_hash(description)}"
    description_path = os.path.join(cache_path, f"{key}-description.json")
    distributed = _distributed()
    rank = distributed.get_rank() if distributed else 0
    if rank == 0 and not os.path.isfile(description_path):
        started = time.perf_counter()
        arrays = build()
        try:
            os.makedirs(cache_path, exist_ok=True)
            for name, values in arrays.items():
                _save_atomically(os.path.join(cache_path, f"{key}-{name}.npy"), lambda h, v=values: np.save(h, v))
            listing = dict(description, arrays=sorted(arrays))
            _save_atomically(description_path, lambda h: h.write(json.dumps(listing, indent=2, sort_keys=True).encode()))
        except OSError as error:
            raise OSError(f"cannot write the dataset index cache in {cache_path} ({error}); pass a writable --data-cache-path") from error
        logger.info("built %s in %.2f s (helpers: %s) -> %s", key, time.perf_counter() - started, helpers.BACKEND, cache_path)
    if distributed:
        distributed.barrier()
    if not os.path.isfile(description_path):
        raise FileNotFoundError(
            f"{description_path} is missing after rank 0 built it; --data-cache-path must be a folder every node shares"
        )
    with open(description_path) as handle:
        names = json.load(handle)["arrays"]
    return {name: np.load(os.path.join(cache_path, f"{key}-{name}.npy"), mmap_mode="r") for name in names}


def build_gpt_indices(sequence_lengths: np.ndarray, first_sequence: int, end_sequence: int, seq_length: int,
                      num_samples: int, seed: int) -> dict:
    """doc_idx, sample_idx and shuffle_idx (module docstring) for sequences [first_sequence, end_sequence)."""
    tokens_per_epoch = int(np.sum(sequence_lengths[first_sequence:end_sequence], dtype=np.int64))
    if tokens_per_epoch == 0:
        raise ValueError(f"sequences [{first_sequence}, {end_sequence}) hold no tokens; nothing to sample from")
    num_epochs = max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))  # ceil: enough tokens for the samples
    random_state = np.random.RandomState(seed)
    id_dtype = np.int32 if end_sequence <= np.iinfo(np.int32).max else np.int64
    sequence_ids = np.arange(first_sequence, end_sequence, dtype=id_dtype)
    doc_idx = np.concatenate([random_state.permutation(sequence_ids) for _ in range(num_epochs)])
    sample_idx = helpers.build_sample_idx(sequence_lengths, doc_idx, seq_length, num_epochs, tokens_per_epoch)
    total_samples = len(sample_idx) - 1
    samples_in_full_epochs = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length if num_epochs > 1 else 0
    shuffle_idx = np.concatenate([
        random_state.permutation(np.arange(samples_in_full_epochs, dtype=np.int64)),
        random_state.permutation(np.arange(samples_in_full_epochs, total_samples, dtype=np.int64)),
    ])
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}


class GPTDataset:
    """Samples of seq_length + 1 tokens from documents [start, end) of one indexed dataset.

    dataset[i] -> {"text": int64 array [seq_length + 1]}; len(dataset) >= num_samples.
    """

    def __init__(self, prefix: str, document_range: tuple[int, int], *, seq_length: int, num_samples: int, seed: int,
                 cache_path: str | None = None, split_name: str = "train", indexed_dataset: IndexedDataset | None = None):
        if seq_length < 1 or num_samples < 1:
            raise ValueError(f"{prefix}: seq_length ({seq_length}) and num_samples ({num_samples}) must be at least 1")
        self.prefix = prefix
        self.indexed_dataset = indexed_dataset if indexed_dataset is not None else IndexedDataset(prefix)
        num_documents = len(self.indexed_dataset.document_indices) - 1
        start, end = document_range
        if not 0 <= start < end <= num_documents:
            raise ValueError(f"{prefix}: {split_name} document range [{start}, {end}) is empty or outside the "
                             f"{num_documents} documents of the file; change --split")
        self.seq_length = seq_length
        self.cache_path = cache_path or default_cache_path(prefix)
        first_sequence = int(self.indexed_dataset.document_indices[start])
        end_sequence = int(self.indexed_dataset.document_indices[end])
        self.description = {
            "format_version": INDEX_FORMAT_VERSION,
            "class": "GPTDataset",
            "prefix": os.path.abspath(prefix),
            "data_fingerprint": {
                "sequences": len(self.indexed_dataset),
                "documents": num_documents,
                "bin_bytes": os.path.getsize(data_file_path(prefix)),
            },
            "split": split_name,
            "document_range": [start, end],
            "seq_length": seq_length,
            "num_samples": num_samples,
            "seed": seed,
        }
        self.cache_key = description_hash(self.description)
        arrays = cached_index_arrays(
            self.cache_path, f"gpt-{split_name}", self.description,
            lambda: build_gpt_indices(self.indexed_dataset.sequence_lengths, first_sequence, end_sequence,
                                      seq_length, num_samples, seed),
        )
        self.doc_idx, self.sample_idx, self.shuffle_idx = arrays["doc_idx"], arrays["sample_idx"], arrays["shuffle_idx"]

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for a dataset of {len(self)} samples")
        sample = int(self.shuffle_idx[index])
        first_entry, first_offset = (int(v) for v in self.sample_idx[sample])
        last_entry, last_offset = (int(v) for v in self.sample_idx[sample + 1])
        read = self.indexed_dataset.get
        if first_entry == last_entry:
            pieces = [read(int(self.doc_idx[first_entry]), first_offset, last_offset - first_offset + 1)]
        else:
            pieces = [read(int(self.doc_idx[first_entry]), first_offset)]
            pieces += [read(int(self.doc_idx[entry])) for entry in range(first_entry + 1, last_entry)]
            pieces.append(read(int(self.doc_idx[last_entry]), 0, last_offset + 1))
        text = np.concatenate(pieces).astype(np.int64)  # [seq_length + 1]
        return {"text": text}

    def __getstate__(self):
        state = dict(self.__dict__)
        for name in ("doc_idx", "sample_idx", "shuffle_idx"):
            state[name] = state[name].filename  # reopen the memory map instead of pickling its contents
        return state

    def __setstate__(self, state):
        for name in ("doc_idx", "sample_idx", "shuffle_idx"):
            state[name] = np.load(state[name], mmap_mode="r")
        self.__dict__.update(state)
