"""Merge several .bin/.idx token files into one, in the order given.

    python tools/merge_datasets.py --input data/shard_00_text_document data/shard_01_text_document \
        --output-prefix data/all_text_document
    python tools/merge_datasets.py --input data/shards/ --output-prefix data/all_text_document

--input takes dataset prefixes (the path without .bin/.idx) or directories, whose .idx files are merged in
sorted name order. Every input must hold the same token dtype. The output is written under temporary
names and renamed when complete, so a failed or interrupted merge leaves no output behind; a failed write (disk
full, no permission) stops with one line naming the file and the system's reason, and removes every partial file.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_llama.data.dataset_tokenizer import common_tokenizer_record, write_tokenizer_record  # noqa: E402
from megatron_llama.data.errors import DataError  # noqa: E402
from megatron_llama.data.indexed_dataset import (  # noqa: E402
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    data_file_path,
    dataset_exists,
    index_file_path,
)
from megatron_llama.data.output_files import OutputWriteError, remove_outputs, writing  # noqa: E402


def expand_prefixes(inputs: list[str]) -> list[str]:
    """Dataset prefixes named by `inputs` (prefixes, or directories searched for .idx files)."""
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, name[: -len(".idx")]) for name in os.listdir(item) if name.endswith(".idx"))
            if not found:
                raise ValueError(f"directory {item} holds no .idx file")
            prefixes.extend(found)
        else:
            prefix = item[: -len(".bin")] if item.endswith((".bin", ".idx")) else item
            prefixes.append(prefix)
    for prefix in prefixes:
        if not dataset_exists(prefix):
            raise ValueError(f"{data_file_path(prefix)} and {index_file_path(prefix)} must both exist to merge dataset {prefix}")
    return prefixes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="dataset prefixes or directories of .bin/.idx pairs")
    parser.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    args = parser.parse_args(argv)
    try:
        args.prefixes = expand_prefixes(args.input)
    except ValueError as error:
        parser.error(str(error))
    output = os.path.abspath(args.output_prefix)
    if output in {os.path.abspath(prefix) for prefix in args.prefixes}:
        parser.error(f"--output-prefix {args.output_prefix} is also an input; write the merge to a new prefix")
    return args


def merge(prefixes: list[str], output_prefix: str) -> tuple[int, int]:
    """Write the concatenation of `prefixes` to `output_prefix`, with their common tokenizer record; returns
    (documents, tokens)."""
    record = common_tokenizer_record(prefixes)
    first = IndexedDataset(prefixes[0])
    dtype = first.dtype
    first.close()
    builders = []
    try:
        with writing(data_file_path(output_prefix)):
            os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
            builders.append(IndexedDatasetBuilder(data_file_path(output_prefix), dtype))
            if record is not None:
                write_tokenizer_record(output_prefix, record["tokenizer_type"], record["tokenizer_model"],
                                       record["tokenizer_hash"])
            for prefix in prefixes:
                builders[0].merge_file_(prefix)
        documents = builders[0].num_documents
        with writing(f"{output_prefix}.bin/.idx"):
            builders[0].finalize(index_file_path(output_prefix))
    except BaseException:  # a bad input, a failed write, Ctrl-C: nothing of the merge is left
        remove_outputs(builders, [output_prefix])
        raise
    merged = IndexedDataset(output_prefix)
    return documents, merged.num_tokens


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    try:
        documents, tokens = merge(args.prefixes, args.output_prefix)
    except (IndexedDatasetError, DataError) as error:
        print(f"error: {error}; no output written", file=sys.stderr)
        return 1
    except OutputWriteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"merged {len(args.prefixes)} datasets into {args.output_prefix}: {documents:,} documents, {tokens:,} tokens "
        f"in {time.time() - started:.1f}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
