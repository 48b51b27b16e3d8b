"""Weighted blends of GPT datasets and the train/valid/test builder the trainer calls.

`--data-path` follows Megatron-LM: one prefix (`--data-path corpus_text_document`) or weight/prefix pairs
(`--data-path 0.3 pile_text_document 0.7 wudao_text_document`); weights are normalised to sum to 1.
Each prefix is split by `--split` into train/valid/test document ranges; alternatively
`--train-data-path`, `--valid-data-path` and `--test-data-path` give each split its own (possibly blended)
data, used whole.

BlendedDataset serves sample i from dataset dataset_index[i] (its dataset_sample_index[i]-th sample), where
the two arrays come from helpers.build_blending_indices: every prefix of the stream holds each dataset
within one sample of its weight. The sizes follow Megatron-LM's BlendedMegatronDatasetBuilder, so a member builds
the epochs (and shuffles) Megatron's would: member i targets ceil(size * weight_i) samples and is built with
ceil(ceil(size * weight_i) * 1.005) (member_sample_counts); the blend holds the sum of the targets (at least the
size asked). The blending arrays are cached beside the GPT indices.

Bad data raises DataError naming the prefix: a missing file, a dataset of 0 documents, a train split that gets
no documents, token ids beyond the model's vocabulary (given `vocab_size`).
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from megatron_llama.data import helpers
from megatron_llama.data.errors import DataError
from megatron_llama.data.gpt_dataset import (
    INDEX_FORMAT_VERSION,
    SPLIT_NAMES,
    GPTDataset,
    empty_dataset_message,
    parse_split,
    split_document_ranges,
)
from megatron_llama.data.index_cache import cached_index_arrays, default_cache_path
from megatron_llama.data.indexed_dataset import IndexedDataset, dataset_exists, data_file_path, index_file_path

MEMBER_SURPLUS = 0.005  # Megatron-LM's mid_level_dataset_surplus: extra samples built so no member runs dry


def member_sample_counts(weights: list[float], size: int) -> tuple[list[int], list[int]]:
    """(samples each member gives the blend, samples each member is built with) for a blend of `size` samples, in
    Megatron-LM's float operations: target ceil(size * w), built ceil(target * (1 + surplus))."""
    targets = [int(math.ceil(size * weight)) for weight in weights]
    return targets, [int(math.ceil(target * (1 + MEMBER_SURPLUS))) for target in targets]


def parse_data_path(data_path, flag: str = "--data-path") -> tuple[list[str], list[float]]:
    """["prefix"] or ["w1", "prefix1", "w2", "prefix2", ...] -> (prefixes, normalised weights); files checked."""
    if isinstance(data_path, str):
        data_path = data_path.split()
    data_path = list(data_path)
    if not data_path:
        raise DataError(f"{flag} is empty; give a prefix or weight/prefix pairs such as {flag} 0.3 A 0.7 B")
    if len(data_path) == 1:
        prefixes, weights = data_path, [1.0]
    else:
        if len(data_path) % 2:
            raise DataError(f"{flag} has {len(data_path)} entries; with several datasets give weight/prefix pairs, "
                            f"e.g. {flag} 0.3 A 0.7 B")
        prefixes, weights = data_path[1::2], []
        for weight, prefix in zip(data_path[0::2], prefixes):
            try:
                weights.append(float(weight))
            except ValueError:
                raise DataError(f"{flag}: weight {weight!r} of prefix {prefix} is not a number; pairs are 'weight prefix'") from None
            if not math.isfinite(weights[-1]) or weights[-1] <= 0:
                raise DataError(f"{flag}: weight {weight} of prefix {prefix} must be a positive number")
    for prefix in prefixes:
        if not dataset_exists(prefix):
            raise DataError(f"{flag}: prefix {prefix} needs {data_file_path(prefix)} and {index_file_path(prefix)}; "
                            f"at least one is missing (see tools/preprocess_data.py --output-prefix)")
    total = sum(weights)
    return prefixes, [weight / total for weight in weights]


class BlendedDataset:
    """Interleaves datasets by weight; dataset[i] -> the member's sample, len = size."""

    def __init__(self, datasets: list, weights: list[float], size: int, *, cache_path: str, split_name: str,
                 member_keys: list[str]):
        self.datasets = datasets
        self.weights = list(weights)
        self.size = size
        description = {
            "format_version": INDEX_FORMAT_VERSION,
            "class": "BlendedDataset",
            "members": list(member_keys),
            "weights": self.weights,
            "size": size,
        }
        arrays = cached_index_arrays(
            cache_path, f"blend-{split_name}", description,
            lambda: dict(zip(("dataset_index", "dataset_sample_index"), helpers.build_blending_indices(self.weights, size))),
        )
        self.dataset_index, self.dataset_sample_index = arrays["dataset_index"], arrays["dataset_sample_index"]
        picks_per_member = np.bincount(self.dataset_index, minlength=len(datasets))
        for member, (picks, dataset) in enumerate(zip(picks_per_member, datasets)):
            if picks > len(dataset):
                raise DataError(f"blend member {member} is asked for {picks} samples but holds {len(dataset)}")

    def __len__(self) -> int:
        return self.size

    def samples_per_dataset(self, start: int, stop: int) -> dict[str, int]:
        """How many of samples [start, stop) each member gives, by the member's data prefix (the training log's
        distribution of data categories per interval)."""
        counts = np.bincount(self.dataset_index[start:stop], minlength=len(self.datasets))
        return {dataset.prefix: int(count) for dataset, count in zip(self.datasets, counts)}

    def __getitem__(self, index: int) -> dict:
        if not -self.size <= index < self.size:
            raise IndexError(f"sample {index} out of range for a blend of {self.size} samples")
        return self.datasets[int(self.dataset_index[index])][int(self.dataset_sample_index[index])]


def open_indexed_datasets(prefixes: list[str], flag: str) -> list[IndexedDataset]:
    """The .bin/.idx pair of each prefix, opened once for every split; DataError for one of 0 documents."""
    opened = [IndexedDataset(prefix) for prefix in prefixes]
    for indexed in opened:
        if len(indexed.document_indices) == 1:
            raise DataError(f"{flag}: {empty_dataset_message(indexed.prefix)}")
    return opened


def _build_split(indexed_datasets: list[IndexedDataset], weights: list[float], split_fractions: list[float],
                 split_index: int, num_samples: int, *, seq_length: int, seed: int, cache_path: str | None,
                 vocab_size: int | None, flag: str):
    """One split (train/valid/test) over the given datasets, or None when it gets no samples, or no documents
    when it is not the train split."""
    split_name = SPLIT_NAMES[split_index]
    if num_samples <= 0:
        return None
    if split_fractions[split_index] == 0:
        if split_index == 0:
            raise DataError(f"{flag}: --split gives the train split no share of the data; give it a positive first "
                            f"part, e.g. --split 969,30,1")
        return None
    members = []
    empty_prefixes = []
    targets, built_sizes = member_sample_counts(weights, num_samples)
    for indexed, built_size in zip(indexed_datasets, built_sizes):
        prefix = indexed.prefix
        num_documents = len(indexed.document_indices) - 1
        start, end = split_document_ranges(num_documents, split_fractions)[split_index]
        if start == end:
            empty_prefixes.append(f"{prefix} ({num_documents} documents)")
            continue
        member_samples = num_samples if len(weights) == 1 else built_size
        members.append(GPTDataset(prefix, (start, end), seq_length=seq_length, num_samples=member_samples, seed=seed,
                                  cache_path=cache_path, split_name=split_name, indexed_dataset=indexed,
                                  vocab_size=vocab_size))
    if empty_prefixes and not members and split_index > 0:
        warnings.warn(f"{flag}: the {split_name} split gets no documents of {', '.join(empty_prefixes)} with these split "
                      f"fractions {split_fractions}; no {split_name} dataset is built")
        return None
    if empty_prefixes:
        what = "the blend cannot hold its weights" if members else "there is nothing to train on"
        raise DataError(f"{flag}: the {split_name} split gets no documents of {', '.join(empty_prefixes)}, so {what}; "
                        f"change --split or give that data more documents")
    if len(members) == 1:
        return members[0]
    blend_cache = cache_path or default_cache_path(indexed_datasets[0].prefix)
    return BlendedDataset(members, weights, sum(targets), cache_path=blend_cache, split_name=split_name,
                          member_keys=[member.cache_key for member in members])


def build_train_valid_test_datasets(*, data_path: list[str] | None, split: str, seq_length: int, seed: int,
                                    num_samples: tuple[int, int, int], cache_path: str | None,
                                    train_data_path=None, valid_data_path=None, test_data_path=None,
                                    vocab_size: int | None = None):
    """(train, valid, test) datasets, each a map dataset or None when it gets 0 samples. Call on every rank.
    With `vocab_size` (the model's), data holding larger token ids is refused when opened."""
    separate_paths = (train_data_path, valid_data_path, test_data_path)
    common = dict(seq_length=seq_length, seed=seed, cache_path=cache_path, vocab_size=vocab_size)
    if data_path and any(separate_paths):
        raise DataError("give either --data-path (split by --split) or --train/valid/test-data-path, not both")
    if data_path:
        prefixes, weights = parse_data_path(data_path)
        fractions = parse_split(split)
        indexed_datasets = open_indexed_datasets(prefixes, "--data-path")
        return tuple(_build_split(indexed_datasets, weights, fractions, i, num_samples[i], flag="--data-path", **common)
                     for i in range(3))
    if not any(separate_paths):
        raise DataError("no training data: pass --data-path, or --train-data-path (and optionally --valid/--test-data-path)")
    datasets = []
    for i, path in enumerate(separate_paths):
        flag = f"--{SPLIT_NAMES[i]}-data-path"
        if not path or num_samples[i] <= 0:
            datasets.append(None)
            continue
        prefixes, weights = parse_data_path(path, flag)
        whole = [0.0, 0.0, 0.0]
        whole[i] = 1.0  # this split uses every document of its own data
        datasets.append(_build_split(open_indexed_datasets(prefixes, flag), weights, whole, i, num_samples[i],
                                     flag=flag, **common))
    return tuple(datasets)
