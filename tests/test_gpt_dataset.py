"""GPTDataset: token windows, epochs, split disjointness, determinism and the on-disk index cache."""
import os
import pickle

import numpy as np
import pytest

from megatron_llama.data import gpt_dataset
from megatron_llama.data.blended_dataset import build_train_valid_test_datasets
from megatron_llama.data.gpt_dataset import GPTDataset, parse_split, split_document_ranges
from megatron_llama.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

TOKENS_PER_DOCUMENT_ID = 64  # token = base + document * 64 + position, so a token names its document


def write_corpus(prefix, num_documents, seed=0, base=0, max_length=30):
    """A .bin/.idx pair whose every token tells which document it came from."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    for document in range(num_documents):
        length = int(rng.integers(1, max_length))
        builder.add_document(base + document * TOKENS_PER_DOCUMENT_ID + np.arange(length))
    builder.finalize(prefix + ".idx")
    return prefix


def document_of(tokens, base=0):
    return set(((np.asarray(tokens) - base) // TOKENS_PER_DOCUMENT_ID).tolist())


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(str(tmp_path / "corpus_text_document"), num_documents=60)


def make(prefix, tmp_path, document_range=(0, 60), seq_length=16, num_samples=50, seed=1234, cache="cache"):
    return GPTDataset(prefix, document_range, seq_length=seq_length, num_samples=num_samples, seed=seed,
                      cache_path=str(tmp_path / cache))


def test_samples_are_seq_length_plus_one_windows_of_the_shuffled_stream(corpus, tmp_path):
    dataset = make(corpus, tmp_path, document_range=(5, 45), seq_length=16, num_samples=200)
    indexed = IndexedDataset(corpus)
    stream = np.concatenate([indexed[int(sequence)] for sequence in dataset.doc_idx])
    assert len(dataset) >= 200
    for i in range(len(dataset)):
        text = dataset[i]["text"]
        assert text.dtype == np.int64 and text.shape == (17,)
        sample = int(dataset.shuffle_idx[i])
        np.testing.assert_array_equal(text, stream[sample * 16 : sample * 16 + 17])


def test_enough_epochs_each_a_permutation_and_full_epochs_served_first(corpus, tmp_path):
    indexed = IndexedDataset(corpus)
    tokens_per_epoch = int(indexed.sequence_lengths[10:30].sum())
    wanted = 3 * tokens_per_epoch // 8  # needs 4 epochs of 8-token samples
    dataset = make(corpus, tmp_path, document_range=(10, 30), seq_length=8, num_samples=wanted)
    epochs = len(dataset.doc_idx) // 20
    assert epochs == -(-(wanted * 8 + 1) // tokens_per_epoch) and len(dataset) >= wanted
    for epoch in range(epochs):
        assert sorted(dataset.doc_idx[epoch * 20 : (epoch + 1) * 20].tolist()) == list(range(10, 30))
    assert not all(np.array_equal(dataset.doc_idx[:20], dataset.doc_idx[e * 20 : (e + 1) * 20]) for e in range(1, epochs))
    in_full_epochs = ((epochs - 1) * tokens_per_epoch - 1) // 8
    assert sorted(dataset.shuffle_idx[:in_full_epochs].tolist()) == list(range(in_full_epochs))


@pytest.mark.parametrize("split, expected", [("969,30,1", [0.969, 0.03, 0.001]), ("0.9,0.1,0", [0.9, 0.1, 0.0]),
                                             ("1", [1.0, 0.0, 0.0]), ("8/1/1", [0.8, 0.1, 0.1])])
def test_split_strings_become_fractions(split, expected):
    np.testing.assert_allclose(parse_split(split), expected)


@pytest.mark.parametrize("split", ["a,b,c", "-1,2,0", "0,0,0", "1,2,3,4", ""])
def test_bad_split_strings_name_the_flag(split):
    with pytest.raises(ValueError, match="--split"):
        parse_split(split)


def test_split_ranges_tile_the_documents():
    for num_documents in (1, 7, 100, 12345):
        ranges = split_document_ranges(num_documents, parse_split("969,30,1"))
        assert ranges[0][0] == 0 and ranges[-1][1] == num_documents
        assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(ranges, ranges[1:]))


def test_no_document_is_in_two_splits(corpus, tmp_path):
    splits = build_train_valid_test_datasets(data_path=[corpus], split="70,20,10", seq_length=8, seed=3,
                                             num_samples=(100, 30, 10), cache_path=str(tmp_path / "cache"))
    seen = []
    for dataset in splits:
        from_index = set(dataset.doc_idx.tolist())
        from_tokens = set().union(*(document_of(dataset[i]["text"]) for i in range(len(dataset))))
        assert from_tokens <= from_index  # single-sequence documents: sequence id == document id
        seen.append(from_index)
    assert seen[0] == set(range(0, 42)) and seen[1] == set(range(42, 54)) and seen[2] == set(range(54, 60))


def test_same_seed_same_order_other_seed_other_order(corpus, tmp_path):
    first = make(corpus, tmp_path, seed=5, cache="a")
    again = make(corpus, tmp_path, seed=5, cache="b")  # fresh cache: rebuilt from scratch
    other = make(corpus, tmp_path, seed=6, cache="c")
    samples = lambda d: np.stack([d[i]["text"] for i in range(50)])  # noqa: E731
    np.testing.assert_array_equal(samples(first), samples(again))
    assert not np.array_equal(samples(first), samples(other))


def test_second_build_loads_the_cache_instead_of_rebuilding(corpus, tmp_path, monkeypatch):
    first = make(corpus, tmp_path)
    cache_files = sorted(os.listdir(tmp_path / "cache"))
    assert len(cache_files) == 4 and not any(".tmp" in name for name in cache_files)

    def refuse(*args, **kwargs):
        raise AssertionError("indices rebuilt although the cache holds them")

    monkeypatch.setattr(gpt_dataset, "build_gpt_indices", refuse)
    second = make(corpus, tmp_path)
    assert isinstance(second.sample_idx, np.memmap)
    np.testing.assert_array_equal(second.shuffle_idx, first.shuffle_idx)
    assert sorted(os.listdir(tmp_path / "cache")) == cache_files


def test_cache_without_its_description_counts_as_unfinished_and_is_rebuilt(corpus, tmp_path):
    first = make(corpus, tmp_path)
    description = [n for n in os.listdir(tmp_path / "cache") if n.endswith("description.json")][0]
    os.remove(tmp_path / "cache" / description)  # as if the build died before its last write
    rebuilt = make(corpus, tmp_path)
    np.testing.assert_array_equal(rebuilt.shuffle_idx, first.shuffle_idx)
    assert os.path.exists(tmp_path / "cache" / description)


def test_cache_name_changes_with_every_input_that_shapes_the_indices(corpus, tmp_path):
    other_corpus = write_corpus(str(tmp_path / "other"), num_documents=60)
    base = make(corpus, tmp_path).cache_key
    variants = [
        make(corpus, tmp_path, seq_length=12), make(corpus, tmp_path, seed=99), make(corpus, tmp_path, num_samples=51),
        make(corpus, tmp_path, document_range=(0, 59)), make(other_corpus, tmp_path),
    ]
    keys = [dataset.cache_key for dataset in variants]
    assert base not in keys and len(set(keys)) == len(keys)
    assert make(corpus, tmp_path).cache_key == base


def test_default_cache_lives_beside_the_data(corpus, tmp_path):
    GPTDataset(corpus, (0, 60), seq_length=8, num_samples=5, seed=0)
    assert any(name.endswith("description.json") for name in os.listdir(tmp_path / "index_cache"))


def test_pickled_dataset_reopens_its_files_and_serves_the_same_samples(corpus, tmp_path):
    dataset = make(corpus, tmp_path)
    payload = pickle.dumps(dataset)
    assert len(payload) < 2000  # paths, not array contents
    copy = pickle.loads(payload)
    np.testing.assert_array_equal(copy[7]["text"], dataset[7]["text"])


def test_empty_document_range_is_refused(corpus, tmp_path):
    with pytest.raises(ValueError, match="change --split"):
        make(corpus, tmp_path, document_range=(30, 30))


def _distributed_build(rank, init_file, prefix, cache_path, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    if rank == 1:
        def refuse(*args, **kwargs):
            raise AssertionError("rank 1 built indices; only rank 0 may")
        gpt_dataset.build_gpt_indices = refuse
    dataset = GPTDataset(prefix, (0, 60), seq_length=8, num_samples=40, seed=2, cache_path=cache_path)
    np.save(os.path.join(results, f"rank{rank}.npy"), np.stack([dataset[i]["text"] for i in range(len(dataset))]))
    dist.destroy_process_group()


def test_rank_zero_builds_and_the_other_rank_loads_after_the_barrier(corpus, tmp_path):
    import torch.multiprocessing as mp

    arguments = (str(tmp_path / "init"), corpus, str(tmp_path / "cache"), str(tmp_path))
    mp.start_processes(_distributed_build, args=arguments, nprocs=2, start_method="fork")
    np.testing.assert_array_equal(np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy"))
