"""Dataset index helpers: the compiled module and the numpy fallback agree, and both mean what they say.

Tests of the compiled module skip when it is not built, or fail instead where MEGATRON_LLAMA_REQUIRE_CPP_HELPERS=1
(.ci/run sets it, so CI never passes having tested only the numpy path).
"""
import os

import numpy as np
import pytest

from megatron_llama.data import helpers
from megatron_llama.data.helpers import build_blending_indices_numpy, build_sample_idx_numpy, compiled_helpers

REQUIRE_COMPILED = "MEGATRON_LLAMA_REQUIRE_CPP_HELPERS"
NOT_BUILT = "C++ helpers not built (python setup.py build_ext --inplace)"


def compiled_required() -> bool:
    return os.environ.get(REQUIRE_COMPILED) == "1"


@pytest.fixture
def compiled():
    """csrc/helpers.cpp's module; a skip without it, a failure where REQUIRE_COMPILED=1."""
    if compiled_helpers is None:
        if compiled_required():
            pytest.fail(f"{NOT_BUILT}, and {REQUIRE_COMPILED}=1 requires them: install a C++ compiler and pybind11, "
                        f"reinstall (pip install --no-build-isolation -e .) and read setup.py's message")
        pytest.skip(NOT_BUILT)
    return compiled_helpers


def random_epochs(rng, num_documents, num_epochs, max_size=20, doc_idx_dtype=np.int32):
    sizes = rng.integers(0, max_size, size=num_documents).astype(np.int32)
    sizes[rng.integers(num_documents)] += 1  # at least one token per epoch
    doc_idx = np.concatenate([rng.permutation(num_documents) for _ in range(num_epochs)]).astype(doc_idx_dtype)
    return sizes, doc_idx, int(sizes.sum())


def samples_from_index(sizes, doc_idx, sample_idx):
    """Rebuild each sample's tokens, using the stream position of every token as its value."""
    starts = np.concatenate([[0], np.cumsum(sizes[doc_idx], dtype=np.int64)])
    samples = []
    for (first_entry, first_offset), (last_entry, last_offset) in zip(sample_idx[:-1], sample_idx[1:]):
        assert first_offset < sizes[doc_idx[first_entry]] and last_offset < sizes[doc_idx[last_entry]]
        samples.append(np.arange(starts[first_entry] + first_offset, starts[last_entry] + last_offset + 1))
    return samples


@pytest.mark.parametrize("seq_length", [1, 3, 8, 40])
def test_samples_are_consecutive_windows_overlapping_by_one_token(seq_length):
    rng = np.random.default_rng(seq_length)
    sizes, doc_idx, tokens_per_epoch = random_epochs(rng, num_documents=25, num_epochs=3)
    sample_idx = build_sample_idx_numpy(sizes, doc_idx, seq_length, 3, tokens_per_epoch)
    assert sample_idx.dtype == np.int64
    assert len(sample_idx) - 1 == (3 * tokens_per_epoch - 1) // seq_length
    assert tuple(sample_idx[0]) == (0, 0)
    for i, sample in enumerate(samples_from_index(sizes, doc_idx, sample_idx)):
        np.testing.assert_array_equal(sample, np.arange(i * seq_length, (i + 1) * seq_length + 1))


@pytest.mark.parametrize("doc_idx_dtype", [np.int32, np.int64])
def test_compiled_sample_index_equals_numpy_on_random_inputs(compiled, doc_idx_dtype):
    rng = np.random.default_rng(7)
    for _ in range(60):
        num_epochs = int(rng.integers(1, 4))
        sizes, doc_idx, tokens_per_epoch = random_epochs(
            rng, int(rng.integers(1, 40)), num_epochs, max_size=int(rng.integers(1, 30)), doc_idx_dtype=doc_idx_dtype
        )
        seq_length = int(rng.integers(1, 50))
        expected = build_sample_idx_numpy(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
        actual = compiled.build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
        assert actual.dtype == np.int64
        np.testing.assert_array_equal(actual, expected)


def test_stream_positions_beyond_int32_stay_exact():
    # 6 documents of ~2**31 tokens, 4 epochs: ~3e10 stream positions, far past int32, yet only ~6k samples
    sizes = np.array([2**31 - 1, 2**31 - 7, 5, 2**31 - 100, 1, 2**30], dtype=np.int32)
    tokens_per_epoch = int(sizes.astype(np.int64).sum())
    rng = np.random.default_rng(3)
    doc_idx = np.concatenate([rng.permutation(len(sizes)) for _ in range(4)]).astype(np.int64)
    seq_length = 2**23 + 3
    implementations = [build_sample_idx_numpy] + ([compiled_helpers.build_sample_idx] if compiled_helpers else [])
    results = [build(sizes, doc_idx, seq_length, 4, tokens_per_epoch) for build in implementations]
    num_samples = (4 * tokens_per_epoch - 1) // seq_length
    assert num_samples * seq_length > 2**34
    starts = np.concatenate([[0], np.cumsum(sizes[doc_idx], dtype=np.int64)])
    for sample_idx in results:
        np.testing.assert_array_equal(sample_idx, results[0])
        assert len(sample_idx) == num_samples + 1
        stream_positions = starts[sample_idx[:, 0]] + sample_idx[:, 1]
        np.testing.assert_array_equal(stream_positions, np.arange(num_samples + 1, dtype=np.int64) * seq_length)


def test_too_few_tokens_for_the_epochs_is_an_error():
    sizes = np.array([4, 4], dtype=np.int32)
    doc_idx = np.array([0, 1], dtype=np.int32)  # one epoch listed, two claimed
    with pytest.raises(ValueError, match="fewer tokens"):
        build_sample_idx_numpy(sizes, doc_idx, 3, 2, 8)
    if compiled_helpers is not None:
        with pytest.raises(ValueError, match="fewer tokens"):
            compiled_helpers.build_sample_idx(sizes, doc_idx, 3, 2, 8)


def largest_prefix_deviation(dataset_index, weights):
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    counts = np.cumsum(np.eye(len(weights), dtype=np.int64)[dataset_index], axis=0)  # [size, K]
    targets = np.arange(1, len(dataset_index) + 1)[:, None] * weights[None, :]
    return np.abs(counts - targets).max()


@pytest.mark.parametrize("weights", [[0.3, 0.7], [1, 1, 1], [0.5, 0.01, 0.2, 0.29], [5.0], [0.9, 0.0, 0.1], list(range(1, 12))])
def test_blend_is_within_one_sample_of_the_weights_at_every_prefix(weights):
    dataset_index, dataset_sample_index = build_blending_indices_numpy(weights, 3000)
    assert largest_prefix_deviation(dataset_index, weights) < 1.0
    for dataset in range(len(weights)):
        picks = dataset_sample_index[dataset_index == dataset]
        np.testing.assert_array_equal(picks, np.arange(len(picks)))  # each dataset read in order, none skipped


def test_blend_index_dtype_grows_past_255_datasets():
    assert build_blending_indices_numpy([1.0] * 255, 10)[0].dtype == np.uint8
    many, _ = build_blending_indices_numpy([1.0] * 300, 600)
    assert many.dtype == np.int16 and sorted(set(many.tolist())) == list(range(300))


def test_compiled_blend_equals_numpy_on_random_weights(compiled):
    rng = np.random.default_rng(11)
    for trial in range(40):
        weights = rng.random(int(rng.integers(1, 9))) ** 3
        if trial % 4 == 0 and len(weights) > 1:
            weights[0] = 0.0
        expected = build_blending_indices_numpy(weights, 700)
        actual = helpers.build_blending_indices(weights, 700)
        assert actual[0].dtype == expected[0].dtype and actual[1].dtype == np.int64
        np.testing.assert_array_equal(actual[0], expected[0])
        np.testing.assert_array_equal(actual[1], expected[1])
    actual = compiled.build_blending_indices(np.full(300, 1 / 300), 900)
    np.testing.assert_array_equal(actual[0], build_blending_indices_numpy([1.0] * 300, 900)[0])


@pytest.mark.parametrize("weights", [[], [-1.0, 2.0], [0.0, 0.0], [float("nan"), 1.0]])
def test_bad_blend_weights_are_refused(weights):
    with pytest.raises(ValueError, match="blending"):
        helpers.build_blending_indices(weights, 10)


def test_backend_names_the_implementation_in_use():
    assert helpers.BACKEND == ("cpp" if compiled_helpers is not None else "numpy")
    if compiled_required():
        assert helpers.BACKEND == "cpp", f"{NOT_BUILT}, and {REQUIRE_COMPILED}=1 requires them"


def test_without_the_compiled_module_the_builders_fall_back_to_numpy(monkeypatch):
    monkeypatch.setattr(helpers, "compiled_helpers", None)  # the path of an install that built no C++
    sizes, doc_idx, tokens_per_epoch = random_epochs(np.random.default_rng(5), num_documents=20, num_epochs=2)
    np.testing.assert_array_equal(helpers.build_sample_idx(sizes, doc_idx, 7, 2, tokens_per_epoch),
                                  build_sample_idx_numpy(sizes, doc_idx, 7, 2, tokens_per_epoch))
    for actual, expected in zip(helpers.build_blending_indices([0.2, 0.5, 0.3], 200),
                                build_blending_indices_numpy([0.2, 0.5, 0.3], 200)):
        np.testing.assert_array_equal(actual, expected)
