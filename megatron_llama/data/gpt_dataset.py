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
(seed, data prefix, split, seq_length, requested samples). The arrays are cached (data/index_cache.py) in
cache_path (default: an `index_cache` folder beside the data) under a name hashing the data's identity (a
hash of the .idx and the .bin size: a dataset rebuilt at the same prefix gets a fresh index) and every
parameter that shapes them. Cached arrays that do not fit the data (a stale entry copied or edited by hand)
raise IndexCacheError naming the entry, when opened or at the first sample they would misplace.

Given the model's vocabulary size, the dataset also refuses a .bin holding a token id outside
[0, vocab_size) when it is opened (the .bin is scanned once per data identity; the range is cached too),
instead of an embedding's IndexError mid-run. A file of 0 documents is refused by name.
"""
from __future__ import annotations

import math
import os

import numpy as np

from megatron_llama.data import helpers
from megatron_llama.data.errors import DataError
from megatron_llama.data.index_cache import (IndexCacheError, cache_entry, cached_index_arrays, default_cache_path,
                                             delete_advice, description_hash)
from megatron_llama.data.indexed_dataset import IndexedDataset, data_file_path, index_file_path

INDEX_FORMAT_VERSION = 2
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


def check_token_ids(indexed_dataset: IndexedDataset, vocab_size: int, cache_path: str) -> None:
    """DataError naming the .bin when it holds a token id outside [0, vocab_size), which no embedding can look up.

    The scan of the .bin runs once per data identity (on rank 0; every rank must call this) and is cached.
    """
    prefix = indexed_dataset.prefix
    description = {"format_version": INDEX_FORMAT_VERSION, "class": "TokenIdRange", "prefix": os.path.abspath(prefix),
                   "data_identity": indexed_dataset.identity()}
    arrays = cached_index_arrays(cache_path, "tokens", description,
                                 lambda: {"token_id_range": np.array(indexed_dataset.token_id_range(), dtype=np.int64)})
    low, high = (int(value) for value in arrays["token_id_range"])
    if high >= low and (low < 0 or high >= vocab_size):
        raise DataError(f"{data_file_path(prefix)} holds token ids from {low} to {high}, but the model's vocabulary has "
                        f"{vocab_size} entries (ids 0 to {vocab_size - 1}): it was made with another tokenizer; "
                        f"preprocess it again with the run's --tokenizer-model, or train with the tokenizer that made it")


def empty_dataset_message(prefix: str) -> str:
    return (f"{prefix} holds 0 documents ({index_file_path(prefix)}): its corpus gave no text; preprocess one that "
            f"does (tools/preprocess_data.py prints the documents it wrote) or leave the prefix out")


def build_gpt_indices(sequence_lengths: np.ndarray, first_sequence: int, end_sequence: int, seq_length: int,
                      num_samples: int, seed: int) -> dict:
    """doc_idx, sample_idx and shuffle_idx (module docstring) for sequences [first_sequence, end_sequence)."""
    tokens_per_epoch = int(np.sum(sequence_lengths[first_sequence:end_sequence], dtype=np.int64))
    if tokens_per_epoch == 0:
        raise DataError(f"sequences [{first_sequence}, {end_sequence}) hold no tokens; nothing to sample from")
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

    dataset[i] -> {"text": int64 array [seq_length + 1]}; len(dataset) >= num_samples. With `vocab_size`, a .bin
    holding token ids outside [0, vocab_size) is refused here (check_token_ids).
    """

    def __init__(self, prefix: str, document_range: tuple[int, int], *, seq_length: int, num_samples: int, seed: int,
                 cache_path: str | None = None, split_name: str = "train", indexed_dataset: IndexedDataset | None = None,
                 vocab_size: int | None = None):
        if seq_length < 1 or num_samples < 1:
            raise ValueError(f"{prefix}: seq_length ({seq_length}) and num_samples ({num_samples}) must be at least 1")
        self.prefix = prefix
        self.indexed_dataset = indexed_dataset if indexed_dataset is not None else IndexedDataset(prefix)
        num_documents = len(self.indexed_dataset.document_indices) - 1
        if num_documents == 0:
            raise DataError(empty_dataset_message(prefix))
        start, end = document_range
        if not 0 <= start < end <= num_documents:
            raise DataError(f"{prefix}: {split_name} document range [{start}, {end}) is empty or outside the "
                            f"{num_documents} documents of the file; change --split")
        self.seq_length = seq_length
        self.cache_path = cache_path or default_cache_path(prefix)
        if vocab_size is not None:
            check_token_ids(self.indexed_dataset, vocab_size, self.cache_path)
        first_sequence = int(self.indexed_dataset.document_indices[start])
        end_sequence = int(self.indexed_dataset.document_indices[end])
        self.description = {
            "format_version": INDEX_FORMAT_VERSION,
            "class": "GPTDataset",
            "prefix": os.path.abspath(prefix),
            "data_identity": self.indexed_dataset.identity(),
            "split": split_name,
            "document_range": [start, end],
            "seq_length": seq_length,
            "num_samples": num_samples,
            "seed": seed,
        }
        self.cache_key = description_hash(self.description)
        stem = f"gpt-{split_name}"
        self.cache_entry = cache_entry(self.cache_path, stem, self.description)
        arrays = cached_index_arrays(
            self.cache_path, stem, self.description,
            lambda: build_gpt_indices(self.indexed_dataset.sequence_lengths, first_sequence, end_sequence,
                                      seq_length, num_samples, seed),
        )
        self.doc_idx, self.sample_idx, self.shuffle_idx = arrays["doc_idx"], arrays["sample_idx"], arrays["shuffle_idx"]
        self._check_index_shapes(end_sequence - first_sequence, num_samples)

    def _check_index_shapes(self, sequences: int, num_samples: int) -> None:
        """IndexCacheError when the cached arrays cannot index this split (checks that cost O(1), not a scan)."""
        doc_idx, sample_idx, shuffle_idx = self.doc_idx, self.sample_idx, self.shuffle_idx
        problems = []
        if doc_idx.ndim != 1 or not len(doc_idx) or len(doc_idx) % sequences:
            problems.append(f"doc_idx has shape {doc_idx.shape}, not a multiple of the split's {sequences} sequences")
        if sample_idx.ndim != 2 or sample_idx.shape[1:] != (2,) or len(sample_idx) < 2:
            problems.append(f"sample_idx has shape {sample_idx.shape}, not [samples + 1, 2]")
        elif not 0 <= int(sample_idx[-1][0]) < len(doc_idx):
            problems.append(f"sample_idx ends at doc_idx entry {int(sample_idx[-1][0])} of {len(doc_idx)}")
        if shuffle_idx.ndim != 1 or len(shuffle_idx) != len(sample_idx) - 1 or len(shuffle_idx) < num_samples:
            problems.append(f"shuffle_idx has shape {shuffle_idx.shape} for {len(sample_idx) - 1} samples "
                            f"({num_samples} asked)")
        if problems:
            raise IndexCacheError(f"index cache {self.cache_entry} does not fit {self.prefix}: {'; '.join(problems)}; "
                                  f"{delete_advice(self.cache_entry)}")

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for a dataset of {len(self)} samples")
        try:
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
        except IndexError as error:  # only indices built for other data point outside the files
            raise IndexCacheError(f"sample {index}: index cache {self.cache_entry} does not fit {self.prefix} ({error}); "
                                  f"{delete_advice(self.cache_entry)}") from None
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
