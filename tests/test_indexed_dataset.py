"""The .bin/.idx writer and reader: byte layout, round trip, merge, and every corruption we detect."""
import os
import struct

import numpy as np
import pytest

from megatron_llama.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    best_dtype,
    data_file_path,
    index_file_path,
)


def write_dataset(prefix, documents, dtype=np.uint16):
    """documents: list of documents, each a list of sequences (lists of token ids)."""
    builder = IndexedDatasetBuilder(data_file_path(prefix), dtype)
    for document in documents:
        for sequence in document:
            builder.add_item(sequence)
        builder.end_document()
    builder.finalize(index_file_path(prefix))
    return prefix


DOCUMENTS = [[[5, 6, 7]], [[8], [9, 10, 11, 12]], [[13, 14]]]


def test_idx_bytes_match_megatron_layout_field_by_field(tmp_path):
    prefix = write_dataset(str(tmp_path / "corpus"), DOCUMENTS, np.uint16)
    raw = open(index_file_path(prefix), "rb").read()
    assert raw[0:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", raw[9:17]) == (1,)
    assert struct.unpack("<B", raw[17:18]) == (8,)  # uint16
    assert struct.unpack("<Q", raw[18:26]) == (4,)  # N sequences
    assert struct.unpack("<Q", raw[26:34]) == (4,)  # D = 3 documents + 1
    assert struct.unpack("<4i", raw[34:50]) == (3, 1, 4, 2)
    assert struct.unpack("<4q", raw[50:82]) == (0, 6, 8, 16)  # byte offsets: 2 bytes per uint16 token
    assert struct.unpack("<4q", raw[82:114]) == (0, 1, 3, 4)
    assert len(raw) == 114
    tokens = np.frombuffer(open(data_file_path(prefix), "rb").read(), dtype="<u2")
    assert tokens.tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.int64, np.float64, np.float32, np.uint16])
def test_every_dtype_round_trips_with_its_code(tmp_path, dtype):
    expected_code = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8}
    prefix = write_dataset(str(tmp_path / "d"), DOCUMENTS, dtype)
    assert open(index_file_path(prefix), "rb").read()[17] == expected_code[dtype]
    dataset = IndexedDataset(prefix)
    assert dataset.dtype == np.dtype(dtype)
    assert [dataset[i].tolist() for i in range(len(dataset))] == [s for d in DOCUMENTS for s in d]


def test_round_trip_random_documents_and_slices_are_views(tmp_path):
    rng = np.random.default_rng(0)
    documents = [[rng.integers(0, 70000, size=rng.integers(0, 50)) for _ in range(rng.integers(1, 3))] for _ in range(40)]
    prefix = write_dataset(str(tmp_path / "random"), documents, best_dtype(70000))
    dataset = IndexedDataset(prefix)
    flat = [s for d in documents for s in d]
    assert len(dataset) == len(flat)
    assert dataset.sequence_lengths.tolist() == [len(s) for s in flat]
    assert dataset.document_indices.tolist() == np.cumsum([0] + [len(d) for d in documents]).tolist()
    for i, sequence in enumerate(flat):
        np.testing.assert_array_equal(dataset[i], sequence)
    longest = int(np.argmax(dataset.sequence_lengths))
    window = dataset.get(longest, offset=3, length=5)
    np.testing.assert_array_equal(window, flat[longest][3:8])
    assert np.shares_memory(window, dataset[longest])  # zero-copy: both views of the mapped .bin
    assert not window.flags.writeable
    with pytest.raises(IndexError):
        dataset.get(longest, offset=1, length=int(dataset.sequence_lengths[longest]))


def test_best_dtype_switches_at_65500():
    assert best_dtype(32000) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(128256) == np.int32


def test_token_ids_outside_the_dtype_are_refused(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "x.bin"), np.uint16)
    with pytest.raises(IndexedDatasetError, match="uint16"):
        builder.add_item(np.array([1, 70000]))
    builder.abort()
    assert os.listdir(tmp_path) == []


def test_merge_concatenates_and_fixes_pointers_and_document_indices(tmp_path):
    first = write_dataset(str(tmp_path / "a"), DOCUMENTS[:2])
    second = write_dataset(str(tmp_path / "b"), [[[1, 2]], [[3], [4, 4]]])
    builder = IndexedDatasetBuilder(str(tmp_path / "merged.bin"), np.uint16)
    builder.add_document([99])
    builder.merge_file_(first)
    builder.merge_file_(second)
    builder.finalize(str(tmp_path / "merged.idx"))
    merged = IndexedDataset(str(tmp_path / "merged"))
    assert [merged[i].tolist() for i in range(len(merged))] == [[99], [5, 6, 7], [8], [9, 10, 11, 12], [1, 2], [3], [4, 4]]
    assert merged.document_indices.tolist() == [0, 1, 2, 4, 5, 7]
    assert merged.sequence_pointers.tolist() == [0, 2, 8, 10, 18, 22, 24]


def test_merge_refuses_a_different_dtype(tmp_path):
    other = write_dataset(str(tmp_path / "wide"), DOCUMENTS, np.int32)
    builder = IndexedDatasetBuilder(str(tmp_path / "narrow.bin"), np.uint16)
    with pytest.raises(IndexedDatasetError, match="int32"):
        builder.merge_file_(other)
    builder.abort()


def test_no_idx_exists_until_finalize_and_abort_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "partial")
    write_dataset(prefix, DOCUMENTS)  # an older complete pair
    builder = IndexedDatasetBuilder(data_file_path(prefix), np.uint16)
    builder.add_document([1, 2, 3])
    # mid-write, the published pair is still the old one, untouched and readable
    assert IndexedDataset(prefix).sequence_lengths.tolist() == [3, 1, 4, 2]
    builder.finalize(index_file_path(prefix))
    assert IndexedDataset(prefix)[0].tolist() == [1, 2, 3]
    assert sorted(os.listdir(tmp_path)) == ["partial.bin", "partial.idx"]

    aborted = IndexedDatasetBuilder(str(tmp_path / "gone.bin"), np.uint16)
    aborted.add_document([1])
    aborted.abort()
    assert sorted(os.listdir(tmp_path)) == ["partial.bin", "partial.idx"]


def corrupt(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: corrupt(index_file_path(p), 0, b"XXXXXXX"), "magic"),
        (lambda p: corrupt(index_file_path(p), 9, struct.pack("<Q", 2)), "version 2"),
        (lambda p: corrupt(index_file_path(p), 17, struct.pack("<B", 9)), "dtype code 9"),
        (lambda p: os.truncate(index_file_path(p), 60), "truncated"),
        (lambda p: os.truncate(index_file_path(p), 20), "truncated"),
        (lambda p: os.truncate(data_file_path(p), 13), "truncated"),
        (lambda p: open(data_file_path(p), "ab").write(b"\x00\x00"), "longer"),
        (lambda p: os.remove(data_file_path(p)), "does not exist"),
    ],
    ids=["magic", "version", "dtype_code", "idx_truncated", "idx_header_truncated", "bin_truncated", "bin_too_long", "bin_missing"],
)
def test_corrupt_files_raise_an_error_naming_the_path(tmp_path, damage, message):
    prefix = write_dataset(str(tmp_path / "c"), DOCUMENTS)
    damage(prefix)
    with pytest.raises(IndexedDatasetError, match=message) as error:
        IndexedDataset(prefix)
    assert str(tmp_path / "c") in str(error.value)


def test_empty_dataset_reads_back(tmp_path):
    prefix = write_dataset(str(tmp_path / "empty"), [])
    dataset = IndexedDataset(prefix)
    assert len(dataset) == 0 and dataset.document_indices.tolist() == [0]
