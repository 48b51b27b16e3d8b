"""--data-path parsing, blends that hold their weights at every prefix, and the train/valid/test builder."""
import os

import numpy as np
import pytest
from test_gpt_dataset import document_of, write_corpus

from megatron_llama.data import helpers
from megatron_llama.data.blended_dataset import (BlendedDataset, build_train_valid_test_datasets, member_sample_counts,
                                                 parse_data_path)
from megatron_llama.data.gpt_dataset import GPTDataset

CORPUS_B_BASE = 100_000  # corpus B's tokens start here, so a token tells which corpus it came from


@pytest.fixture
def corpora(tmp_path):
    first = write_corpus(str(tmp_path / "a_text_document"), num_documents=50, seed=1)
    second = write_corpus(str(tmp_path / "b_text_document"), num_documents=30, seed=2, base=CORPUS_B_BASE)
    return first, second


def build(data_path, tmp_path, split="90,10,0", num_samples=(300, 20, 0), seed=4, seq_length=8, **paths):
    return build_train_valid_test_datasets(data_path=data_path, split=split, seq_length=seq_length, seed=seed,
                                           num_samples=num_samples, cache_path=str(tmp_path / "cache"), **paths)


def test_data_path_accepts_one_prefix_or_weight_prefix_pairs(corpora):
    first, second = corpora
    assert parse_data_path([first]) == ([first], [1.0])
    prefixes, weights = parse_data_path(["3", first, "1", second])
    assert prefixes == [first, second] and weights == [0.75, 0.25]
    assert parse_data_path(f"0.5 {first} 0.5 {second}") == ([first, second], [0.5, 0.5])


@pytest.mark.parametrize(
    "make_path, message",
    [
        (lambda a, b: ["0.3", a, "0.7"], "3 entries"),
        (lambda a, b: ["heavy", a, "0.7", b], "weight 'heavy' of prefix .*a_text_document"),
        (lambda a, b: ["0", a, "1", b], "positive"),
        (lambda a, b: ["0.5", a, "0.5", b + "_missing"], "b_text_document_missing"),
        (lambda a, b: [], "empty"),
    ],
    ids=["odd_count", "non_numeric_weight", "zero_weight", "missing_files", "empty"],
)
def test_bad_data_path_gets_a_clear_error(corpora, make_path, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        parse_data_path(make_path(*corpora))


def test_blend_holds_its_weights_within_one_sample_at_every_prefix(corpora, tmp_path):
    first, second = corpora
    train, valid, test = build(["0.3", first, "0.7", second], tmp_path)
    assert isinstance(train, BlendedDataset) and len(train) == 300 and len(valid) == 20 and test is None
    from_b = np.array([train[i]["text"].min() >= CORPUS_B_BASE for i in range(len(train))])
    assert np.all(from_b == (np.asarray(train.dataset_index) == 1))  # the sample comes from the member it names
    realised_b = np.cumsum(from_b)
    targets_b = 0.7 * np.arange(1, len(train) + 1)
    assert np.abs(realised_b - targets_b).max() < 1.0


@pytest.mark.parametrize("weights, size, targets, built", [
    ([0.3, 0.7], 300, [90, 210], [91, 212]),
    ([0.5, 0.25, 0.25], 1001, [501, 251, 251], [504, 253, 253]),
    ([0.999, 0.001], 2000, [1998, 2], [2008, 3]),
])
def test_member_sample_counts_are_megatron_lms(weights, size, targets, built):
    """BlendedMegatronDatasetBuilder: each member targets ceil(size * w) samples and is built with
    ceil(ceil(size * w) * 1.005); the blend holds the sum of the targets."""
    assert member_sample_counts(weights, size) == (targets, built)


def test_blend_builds_its_members_with_megatron_lms_sample_counts(corpora, tmp_path):
    first, second = corpora
    train, _, _ = build(["0.5", first, "0.25", second, "0.25", first], tmp_path, num_samples=(1001, 0, 0))
    assert [member.description["num_samples"] for member in train.datasets] == [504, 253, 253]
    assert len(train) == 1003
    assert np.bincount(np.asarray(train.dataset_index), minlength=3).tolist() == [501, 251, 251]


def test_blend_members_never_run_dry_even_for_a_tiny_weight(corpora, tmp_path):
    first, second = corpora
    train, _, _ = build(["0.999", first, "0.001", second], tmp_path, num_samples=(2000, 0, 0))
    for member, dataset in enumerate(train.datasets):
        assert (np.asarray(train.dataset_index) == member).sum() <= len(dataset)
    assert all(train[i]["text"].shape == (9,) for i in range(0, 2000, 97))


def test_blended_splits_keep_documents_apart(corpora, tmp_path):
    first, second = corpora
    train, valid, _ = build(["1", first, "1", second], tmp_path, split="80,20,0", num_samples=(200, 40, 0))
    documents = []
    for dataset in (train, valid):
        tokens = np.concatenate([dataset[i]["text"] for i in range(len(dataset))])
        documents.append((document_of(tokens[tokens < CORPUS_B_BASE]), document_of(tokens[tokens >= CORPUS_B_BASE], CORPUS_B_BASE)))
    assert not documents[0][0] & documents[1][0] and not documents[0][1] & documents[1][1]
    assert max(documents[0][0]) < 40 <= min(documents[1][0])


def test_blend_order_is_deterministic_and_follows_the_seed(corpora, tmp_path):
    first, second = corpora
    data_path = ["0.4", first, "0.6", second]
    one = build(data_path, tmp_path / "one")[0]
    same = build(data_path, tmp_path / "same")[0]
    other = build(data_path, tmp_path / "other", seed=5)[0]
    texts = lambda d: np.stack([d[i]["text"] for i in range(100)])  # noqa: E731
    np.testing.assert_array_equal(texts(one), texts(same))
    assert not np.array_equal(texts(one), texts(other))


def test_second_blend_build_reads_the_cache(corpora, tmp_path, monkeypatch):
    first, second = corpora
    data_path = ["0.4", first, "0.6", second]
    built = build(data_path, tmp_path)[0]
    monkeypatch.setattr(helpers, "build_blending_indices", lambda *a: pytest.fail("blend indices rebuilt"))
    loaded = build(data_path, tmp_path)[0]
    np.testing.assert_array_equal(loaded.dataset_index, built.dataset_index)


def test_single_prefix_gives_a_plain_gpt_dataset_and_zero_samples_give_none(corpora, tmp_path):
    first, _ = corpora
    train, valid, test = build([first], tmp_path, split="80,10,10", num_samples=(50, 0, 5))
    assert isinstance(train, GPTDataset) and len(train) >= 50 and valid is None
    assert isinstance(test, GPTDataset) and len(test) >= 5 and set(test.doc_idx.tolist()) == set(range(45, 50))
    assert build([first], tmp_path, split="90,0,10", num_samples=(50, 5, 5))[1] is None  # a zero share gives none too


def test_split_without_documents_warns_and_gives_none(corpora, tmp_path):
    first, _ = corpora
    with pytest.warns(UserWarning, match="test split gets no documents"):
        _, _, test = build([first], tmp_path, split="98,1,1", num_samples=(10, 2, 2))  # 1% of 50 rounds to none
    assert test is None


def test_separate_train_valid_test_paths_use_each_corpus_whole(corpora, tmp_path):
    first, second = corpora
    train, valid, test = build(None, tmp_path, split="969,30,1", num_samples=(100, 30, 0),
                               train_data_path=[first], valid_data_path=["1", second])
    assert test is None
    assert set(train.doc_idx.tolist()) == set(range(50)) and set(valid.doc_idx.tolist()) == set(range(30))
    assert all(valid[i]["text"].min() >= CORPUS_B_BASE for i in range(len(valid)))


def test_data_path_and_separate_paths_together_are_refused(corpora, tmp_path):
    first, second = corpora
    with pytest.raises(ValueError, match="not both"):
        build([first], tmp_path, train_data_path=[second])
    with pytest.raises(ValueError, match="--data-path"):
        build(None, tmp_path)


def test_every_cache_file_is_complete_after_a_build(corpora, tmp_path):
    first, second = corpora
    build(["0.4", first, "0.6", second], tmp_path)
    names = os.listdir(tmp_path / "cache")
    assert not any(".tmp" in name for name in names)
    assert sum(name.startswith("blend-train") for name in names) == 3  # 2 arrays + description
