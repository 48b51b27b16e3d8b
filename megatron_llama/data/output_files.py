"""What a preprocessing tool does when writing its token files fails (disk full, permissions, file size limit):
name the file, and remove what the run left: every temporary file, and a half-published dataset (a .bin without
its .idx, as a failure inside the builder's finalize leaves). A complete dataset already at the prefix, from an
earlier run, stays.

    try:
        with writing(path):                    # an OSError inside becomes OutputWriteError naming the file
            builder.add_document(tokens)
    except OutputWriteError as error:
        remove_outputs(builders, [prefix])     # the temporary files, and any half-published dataset
        print(f"error: {error}", file=sys.stderr)

tools/preprocess_data.py, tools/preprocess_sft.py and tools/merge_datasets.py use it; a failed run leaves nothing.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable

from megatron_llama.data.dataset_tokenizer import tokenizer_record_path
from megatron_llama.data.indexed_dataset import (TEMPORARY_SUFFIX, IndexedDatasetBuilder, data_file_path,
                                                 dataset_exists, index_file_path)


class OutputWriteError(Exception):
    """Writing an output file failed; the message names the file and the system's reason."""


@contextlib.contextmanager
def writing(path: str):
    """An OSError inside (EFBIG, ENOSPC, EACCES...) leaves as OutputWriteError naming its file, else `path`."""
    try:
        yield
    except OSError as error:
        raise OutputWriteError(f"cannot write {error.filename or path}: {error.strerror or error}; "
                               f"no output written") from None


def remove_outputs(builders: Iterable[IndexedDatasetBuilder], prefixes: Iterable[str]) -> None:
    """Close the builders' files (a write that failed once may fail again on close; that is ignored) and remove the
    temporary files of the dataset `prefixes`; where no complete .bin/.idx pair is left, its .bin, .idx and
    tokenizer record as well."""
    for builder in builders:
        with contextlib.suppress(OSError):
            builder.abort()
    for prefix in prefixes:
        published = [data_file_path(prefix), index_file_path(prefix), tokenizer_record_path(prefix)]
        doomed = [path + TEMPORARY_SUFFIX for path in published]
        if not dataset_exists(prefix):
            doomed += published
        for path in doomed:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # never written
                os.remove(path)
