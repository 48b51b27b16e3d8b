"""tools/merge_datasets.py: several .bin/.idx pairs -> one, in order, with clear errors."""
import os

import numpy as np
import pytest

from megatron_llama.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from test_tokenizer import load_tool

merge_tool = load_tool("merge_datasets")


def write_dataset(prefix, documents, dtype=np.uint16):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype)
    for tokens in documents:
        builder.add_document(np.array(tokens, dtype=dtype))
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def read_documents(prefix):
    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))], dataset.document_indices.tolist()


def test_merge_keeps_every_document_in_input_order(tmp_path):
    first = write_dataset(tmp_path / "first", [[1, 2, 3], [4]])
    second = write_dataset(tmp_path / "second", [[5, 6], [7, 8, 9], [10]])
    assert merge_tool.main(["--input", first, second, "--output-prefix", str(tmp_path / "merged" / "all")]) == 0
    documents, document_indices = read_documents(tmp_path / "merged" / "all")
    assert documents == [[1, 2, 3], [4], [5, 6], [7, 8, 9], [10]]
    assert document_indices == [0, 1, 2, 3, 4, 5]


def test_directory_input_merges_its_pairs_in_name_order(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_dataset(shards / "b", [[3]])
    write_dataset(shards / "a", [[1], [2]])
    assert merge_tool.main(["--input", str(shards), "--output-prefix", str(tmp_path / "all")]) == 0
    assert read_documents(tmp_path / "all")[0] == [[1], [2], [3]]


def test_different_dtypes_fail_and_leave_no_output(tmp_path, capsys):
    small = write_dataset(tmp_path / "small", [[1, 2]], np.uint16)
    large = write_dataset(tmp_path / "large", [[70000]], np.int32)
    assert merge_tool.main(["--input", small, large, "--output-prefix", str(tmp_path / "out")]) == 1
    assert "dtype" in capsys.readouterr().err
    assert [name for name in os.listdir(tmp_path) if name.startswith("out")] == []


@pytest.mark.parametrize("case", ["missing input", "output is an input"])
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, case):
    existing = write_dataset(tmp_path / "existing", [[1]])
    inputs, output, message = {
        "missing input": ([existing, str(tmp_path / "absent")], str(tmp_path / "out"), "absent.bin and"),
        "output is an input": ([existing], existing, "is also an input"),
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        merge_tool.main(["--input", *inputs, "--output-prefix", output])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out.bin")
