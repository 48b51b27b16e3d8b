"""Dataset index builders: the compiled csrc/helpers.cpp when built, else numpy code with identical output.

`BACKEND` says which is in use ("cpp" or "numpy"). Tests reach each implementation directly through
`build_sample_idx_numpy` / `build_blending_indices_numpy` and `compiled_helpers` (None when not built).
Build the compiled module in place with: python setup.py build_ext --inplace

build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch) -> int64 [num_samples + 1, 2]
    The documents listed in doc_idx (one entry per document per epoch, already shuffled) form one token
    stream; tokens_per_epoch is the token count of one epoch's documents. Sample i covers stream positions
    [i * seq_length, (i + 1) * seq_length] inclusive: seq_length + 1 tokens (inputs and shifted labels),
    sharing its last token with the next sample, packed across document boundaries.
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length. Row i = (position in doc_idx, token
    offset in that document) of stream position i * seq_length; zero-length documents are stepped over
    (row 0 is always (0, 0)).

build_blending_indices(weights, size) -> (dataset_index, dataset_sample_index)
    Interleaves datasets so that every prefix of length t holds within one sample of weights[i] * t samples
    of dataset i. The rule is Tijdeman's solution of the chairman assignment problem (Discrete Math. 32,
    1980): at step t (1-based) a dataset is eligible when its deficit weights[i] * t - taken[i] is at least
    1/(2K-2); among those, the one whose deficit would reach 1 - 1/(2K-2) soonest, i.e. the smallest
    (taken[i] + 1 - 1/(2K-2)) / weights[i], is chosen (lowest index on ties). Deviations stay within
    1 - 1/(2K-2). dataset_index is uint8 for up to 255 datasets, else int16; dataset_sample_index (int64)
    counts the earlier picks of the same dataset. Weights are normalised to sum to 1 first.
"""
from __future__ import annotations

import numpy as np

try:
    from megatron_llama.data import _helpers as compiled_helpers
except ImportError:
    compiled_helpers = None

BACKEND = "cpp" if compiled_helpers is not None else "numpy"


def _check_sample_arguments(seq_length: int, num_epochs: int, tokens_per_epoch: int) -> None:
    if seq_length < 1:
        raise ValueError(f"seq_length must be at least 1, got {seq_length}")
    if num_epochs < 1 or tokens_per_epoch < 1:
        raise ValueError(f"num_epochs and tokens_per_epoch must be at least 1, got {num_epochs} and {tokens_per_epoch}")


def build_sample_idx_numpy(sizes, doc_idx, seq_length: int, num_epochs: int, tokens_per_epoch: int) -> np.ndarray:
    """Vectorised twin of the compiled build_sample_idx (see the module docstring)."""
    _check_sample_arguments(seq_length, num_epochs, tokens_per_epoch)
    sizes = np.asarray(sizes)
    doc_idx = np.asarray(doc_idx)
    total_tokens = int(num_epochs) * int(tokens_per_epoch)
    num_samples = (total_tokens - 1) // seq_length
    if doc_idx.size and (doc_idx.min() < 0 or doc_idx.max() >= sizes.size):
        bad = int(np.flatnonzero((doc_idx < 0) | (doc_idx >= sizes.size))[0])
        raise ValueError(f"doc_idx[{bad}] = {int(doc_idx[bad])} is not a document of sizes (length {sizes.size})")
    stream_starts = np.zeros(doc_idx.size + 1, dtype=np.int64)  # stream position where each doc_idx entry starts
    np.cumsum(sizes[doc_idx], dtype=np.int64, out=stream_starts[1:])
    if num_samples and stream_starts[-1] < num_samples * seq_length + 1:
        raise ValueError(f"doc_idx holds fewer tokens than num_epochs * tokens_per_epoch = {total_tokens}")
    sample_idx = np.zeros((num_samples + 1, 2), dtype=np.int64)
    positions = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    # the last doc_idx entry starting at or before the position is the non-empty document holding it
    entries = np.searchsorted(stream_starts, positions, side="right") - 1
    sample_idx[1:, 0] = entries
    sample_idx[1:, 1] = positions - stream_starts[entries]
    return sample_idx


def _normalised_weights(weights) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64).ravel()
    if weights.size < 1 or weights.size > np.iinfo(np.int16).max:
        raise ValueError(f"blending needs 1 to 32767 datasets, got {weights.size}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"blending weights must be finite, non-negative and not all zero, got {weights.tolist()}")
    return weights / weights.sum()


def build_blending_indices_numpy(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Twin of the compiled build_blending_indices: the same float operations in the same order."""
    weights = _normalised_weights(weights)
    if size < 0:
        raise ValueError(f"size must be non-negative, got {size}")
    num_datasets = weights.size
    weight_list = weights.tolist()
    taken = [0.0] * num_datasets
    eligibility = 1.0 / float(2 * num_datasets - 2) if num_datasets > 1 else 0.0
    index_dtype = np.uint8 if num_datasets <= np.iinfo(np.uint8).max else np.int16
    dataset_index = np.empty(size, dtype=index_dtype)
    choices = [0] * size
    for step in range(size):
        t = float(step + 1)
        best, best_deadline = -1, 0.0
        most_behind, largest_deficit = 0, -np.inf
        for i, weight in enumerate(weight_list):
            deficit = weight * t - taken[i]
            if deficit > largest_deficit:
                most_behind, largest_deficit = i, deficit
            if weight > 0.0 and deficit >= eligibility:
                deadline = (taken[i] + 1.0 - eligibility) / weight
                if best < 0 or deadline < best_deadline:
                    best, best_deadline = i, deadline
        if best < 0:
            best = most_behind
        choices[step] = best
        taken[best] += 1.0
    dataset_index[:] = choices
    return dataset_index, _running_count_per_dataset(dataset_index, num_datasets)


def _running_count_per_dataset(dataset_index: np.ndarray, num_datasets: int) -> np.ndarray:
    """For each step, how many earlier steps chose the same dataset."""
    dataset_sample_index = np.empty(dataset_index.size, dtype=np.int64)
    for dataset in range(num_datasets):
        steps = np.flatnonzero(dataset_index == dataset)
        dataset_sample_index[steps] = np.arange(steps.size, dtype=np.int64)
    return dataset_sample_index


def build_sample_idx(sizes, doc_idx, seq_length: int, num_epochs: int, tokens_per_epoch: int) -> np.ndarray:
    """int64 [num_samples + 1, 2] sample boundaries (module docstring); compiled when available."""
    if compiled_helpers is None:
        return build_sample_idx_numpy(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    doc_idx = np.ascontiguousarray(doc_idx)
    if doc_idx.dtype not in (np.int32, np.int64):
        doc_idx = doc_idx.astype(np.int64)
    return compiled_helpers.build_sample_idx(sizes, doc_idx, int(seq_length), int(num_epochs), int(tokens_per_epoch))


def build_blending_indices(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index) of a blend within one sample of the weights at every prefix."""
    if compiled_helpers is None:
        return build_blending_indices_numpy(weights, size)
    return compiled_helpers.build_blending_indices(_normalised_weights(weights), int(size))
