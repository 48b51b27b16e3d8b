"""Token files: the .bin/.idx pair, byte-compatible with Megatron-LM's MMapIndexedDataset.

`.bin` holds token ids back to back in one dtype, no header. `.idx` (little-endian, no padding):

    offset 0        9 bytes   b"MMIDIDX\\x00\\x00"
    offset 9        uint64    version = 1
    offset 17       uint8     dtype code (DTYPE_CODES below)
    offset 18       uint64    N = number of sequences
    offset 26       uint64    D = number of documents + 1
    offset 34       int32[N]  sequence lengths in tokens
    offset 34+4N    int64[N]  byte offset of each sequence in .bin
    offset 34+12N   int64[D]  document indices into the sequences: 0 first, N last

Writing: `IndexedDatasetBuilder(prefix + ".bin", dtype)`, then `add_document(tokens)` per document
(or `add_item` per sequence + `end_document()`), optionally `merge_file_(other_prefix)`, then
`finalize(prefix + ".idx")`. Tokens go to a temporary file; `finalize` removes any old .idx, renames the
.bin into place, then writes the .idx under a temporary name and renames it, so a crash never leaves an
.idx beside a partial or foreign .bin.

Reading: `IndexedDataset(prefix)` maps both files with np.memmap; `ds[i]` and `ds.get(i, offset, length)`
return views into the mapped .bin (no copy). A bad file raises IndexedDatasetError naming the path.
`ds.identity()` says what the data is (a hash of the .idx, the .bin size), for the keys of caches built on it;
`ds.token_id_range()` scans the .bin for its smallest and largest token id.
"""
from __future__ import annotations

import array
import hashlib
import os
import shutil
import struct

import numpy as np

from megatron_llama.data.errors import DataError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = 34  # magic (9) + version (8) + dtype code (1) + N (8) + D (8)

DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(dtype): code for code, dtype in DTYPE_CODES.items()}
TEMPORARY_SUFFIX = ".tmp"
SCAN_CHUNK_TOKENS = 1 << 24  # tokens read at a time when scanning the .bin


class IndexedDatasetError(DataError):
    """A .bin/.idx pair that cannot be read or written; the message names the file."""


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def best_dtype(vocab_size: int) -> type:
    """The smallest token dtype for a vocabulary: uint16 below 65500 entries, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(data_file_path(prefix)) and os.path.isfile(index_file_path(prefix))


def _dtype_code(dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype not in CODE_OF_DTYPE:
        allowed = ", ".join(np.dtype(d).name for d in DTYPE_CODES.values())
        raise IndexedDatasetError(f"token dtype {dtype.name} has no .idx code; use one of {allowed}")
    return CODE_OF_DTYPE[dtype]


def _as_tokens(tokens, dtype: np.dtype) -> np.ndarray:
    """Tokens as a 1-D array of `dtype`, refusing values the dtype cannot hold (no silent wrap-around)."""
    values = np.asarray(tokens)
    if values.ndim != 1:
        raise IndexedDatasetError(f"a sequence must be 1-D token ids, got shape {values.shape}")
    if values.dtype == dtype:
        return values
    if values.size and np.issubdtype(dtype, np.integer):
        limits = np.iinfo(dtype)
        low, high = values.min(), values.max()
        if low < limits.min or high > limits.max:
            raise IndexedDatasetError(
                f"token ids span [{low}, {high}] but the .bin dtype {dtype.name} holds [{limits.min}, {limits.max}]; "
                f"pick the dtype with best_dtype(vocab_size)"
            )
    return values.astype(dtype)


class IndexedDatasetBuilder:
    """Appends sequences to a temporary .bin; `finalize(idx_path)` publishes the .bin and writes the .idx."""

    def __init__(self, bin_path: str, dtype=np.int32):
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype)
        self._dtype_code = _dtype_code(self.dtype)
        self._temporary_bin_path = bin_path + TEMPORARY_SUFFIX
        self._bin_file = open(self._temporary_bin_path, "wb")
        self._sequence_lengths = array.array("q")
        self._document_indices = array.array("q", [0])

    @property
    def num_sequences(self) -> int:
        return len(self._sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self._document_indices) - 1

    def add_item(self, tokens) -> None:
        """Append one sequence (a 1-D array or list of token ids)."""
        values = _as_tokens(tokens, self.dtype)
        if values.size > np.iinfo(np.int32).max:
            raise IndexedDatasetError(f"a sequence of {values.size} tokens exceeds the int32 length field; split it")
        self._bin_file.write(np.ascontiguousarray(values).tobytes(order="C"))
        self._sequence_lengths.append(int(values.size))

    def end_document(self) -> None:
        """Mark the sequences added since the previous document end as one document."""
        self._document_indices.append(self.num_sequences)

    def add_document(self, tokens, lengths=None) -> None:
        """Append one document: a single sequence, or `tokens` split into sequences of `lengths`."""
        values = _as_tokens(tokens, self.dtype)
        if lengths is None:
            self.add_item(values)
        else:
            if sum(lengths) != values.size:
                raise IndexedDatasetError(f"sequence lengths sum to {sum(lengths)} but the document has {values.size} tokens")
            start = 0
            for length in lengths:
                self.add_item(values[start : start + length])
                start += length
        self.end_document()

    def merge_file_(self, prefix: str) -> None:
        """Append every sequence and document of the dataset at `prefix` (same dtype), fixing indices."""
        if self._document_indices[-1] != self.num_sequences:
            raise IndexedDatasetError(
                f"{self.bin_path}: call end_document() before merging {prefix}; "
                f"{self.num_sequences - self._document_indices[-1]} sequences are not in a document yet"
            )
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"cannot merge {data_file_path(prefix)} (dtype {other.dtype.name}) into {self.bin_path} "
                f"(dtype {self.dtype.name}); all merged files need one dtype"
            )
        sequences_before = self.num_sequences
        self._sequence_lengths.extend(other.sequence_lengths.astype(np.int64).tolist())
        self._document_indices.extend((other.document_indices[1:] + sequences_before).tolist())
        other.close()
        self._bin_file.flush()
        with open(data_file_path(prefix), "rb") as source:
            shutil.copyfileobj(source, self._bin_file, length=16 * 1024 * 1024)

    def finalize(self, idx_path: str) -> None:
        """Close an open document, publish the .bin, then write the .idx atomically."""
        if self._document_indices[-1] != self.num_sequences:
            self.end_document()
        self._bin_file.flush()
        os.fsync(self._bin_file.fileno())
        self._bin_file.close()
        if os.path.exists(idx_path):
            os.remove(idx_path)  # never let an old .idx sit beside the new .bin
        os.replace(self._temporary_bin_path, self.bin_path)

        lengths = np.frombuffer(self._sequence_lengths, dtype=np.int64)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        document_indices = np.frombuffer(self._document_indices, dtype=np.int64)
        temporary_idx_path = idx_path + TEMPORARY_SUFFIX
        with open(temporary_idx_path, "wb") as index_file:
            index_file.write(INDEX_MAGIC)
            index_file.write(struct.pack("<Q", INDEX_VERSION))
            index_file.write(struct.pack("<B", self._dtype_code))
            index_file.write(struct.pack("<Q", len(lengths)))
            index_file.write(struct.pack("<Q", len(document_indices)))
            index_file.write(lengths.astype("<i4").tobytes(order="C"))
            index_file.write(pointers.astype("<i8").tobytes(order="C"))
            index_file.write(document_indices.astype("<i8").tobytes(order="C"))
            index_file.flush()
            os.fsync(index_file.fileno())
        os.replace(temporary_idx_path, idx_path)

    def abort(self) -> None:
        """Drop everything written so far (e.g. after a bad input line); no output file is left."""
        self._bin_file.close()
        if os.path.exists(self._temporary_bin_path):
            os.remove(self._temporary_bin_path)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None and not self._bin_file.closed:
            self.abort()


class IndexedDataset:
    """Zero-copy reader of a .bin/.idx pair: `ds[i]` is the i-th sequence as a view into the mapped .bin."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._open()

    def _open(self) -> None:
        idx_path, bin_path = index_file_path(self.prefix), data_file_path(self.prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"{path} does not exist; expected the .bin/.idx pair of prefix {self.prefix}")
        idx_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as index_file:
            header = index_file.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE:
            raise IndexedDatasetError(f"{idx_path} is truncated: {idx_size} bytes, shorter than the {HEADER_SIZE}-byte header")
        if header[:9] != INDEX_MAGIC:
            raise IndexedDatasetError(
                f"{idx_path} is not an MMIDIDX index: magic {header[:9]!r}, expected {INDEX_MAGIC!r} "
                f"(older Megatron 'lazy'/'cached' formats are not supported; re-run tools/preprocess_data.py)"
            )
        (version,) = struct.unpack("<Q", header[9:17])
        if version != INDEX_VERSION:
            raise IndexedDatasetError(f"{idx_path} has index version {version}; only version {INDEX_VERSION} is supported")
        (code,) = struct.unpack("<B", header[17:18])
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_path} has unknown dtype code {code}; valid codes are {sorted(DTYPE_CODES)}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        num_sequences, num_document_indices = struct.unpack("<QQ", header[18:34])
        expected_idx_size = HEADER_SIZE + 12 * num_sequences + 8 * num_document_indices
        if idx_size != expected_idx_size:
            state = "truncated" if idx_size < expected_idx_size else "longer than its header says"
            raise IndexedDatasetError(
                f"{idx_path} is {state}: {idx_size} bytes, but N={num_sequences} sequences and "
                f"D={num_document_indices} document indices need {expected_idx_size}"
            )
        if num_document_indices < 1:
            raise IndexedDatasetError(f"{idx_path} has D=0 document indices; a valid index holds at least the leading 0")

        self._index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        self.sequence_lengths = np.frombuffer(self._index, dtype="<i4", count=num_sequences, offset=HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(
            self._index, dtype="<i8", count=num_sequences, offset=HEADER_SIZE + 4 * num_sequences
        )
        self.document_indices = np.frombuffer(
            self._index, dtype="<i8", count=num_document_indices, offset=HEADER_SIZE + 12 * num_sequences
        )
        if self.document_indices[0] != 0 or self.document_indices[-1] != num_sequences:
            raise IndexedDatasetError(
                f"{idx_path}: document indices run from {self.document_indices[0]} to {self.document_indices[-1]}, "
                f"expected 0 to N={num_sequences}"
            )

        bin_size = os.path.getsize(bin_path)
        expected_bin_size = 0
        if num_sequences:
            expected_bin_size = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
        if bin_size != expected_bin_size:
            state = "truncated" if bin_size < expected_bin_size else "longer than its .idx says"
            raise IndexedDatasetError(
                f"{bin_path} is {state}: {bin_size} bytes, but {idx_path} places the last token ending at byte "
                f"{expected_bin_size} ({num_sequences} sequences of {self.dtype.name}); the pair does not belong together "
                f"or the write was interrupted"
            )
        if bin_size:
            self._tokens = np.memmap(bin_path, dtype=self.dtype, mode="r")
        else:
            self._tokens = np.empty(0, dtype=self.dtype)
        self._identity = None

    def identity(self) -> dict:
        """What this data is, for cache keys: the SHA-256 of the .idx and the .bin size (computed once per open).

        Sample indices depend only on what the .idx holds (every sequence length and document boundary), so its
        hash decides whether a cached index fits: a dataset rebuilt at the same prefix with other lines or in
        another order gets a fresh one, and one whose .idx comes out byte-identical may keep it, which is then
        still right. The .bin size ties the pair together. Modification times are left out, so copies of the
        data on several nodes share one identity (and one cache).
        """
        if self._identity is None:
            self._identity = {
                "idx_sha256": hashlib.sha256(self._index).hexdigest(),
                "bin_bytes": int(self._tokens.size) * self.dtype.itemsize,
            }
        return self._identity

    def token_id_range(self) -> tuple[int, int]:
        """(smallest, largest) token id in the .bin, read in chunks; (0, -1) for an empty file."""
        low, high = 0, -1
        for start in range(0, self._tokens.size, SCAN_CHUNK_TOKENS):
            chunk = self._tokens[start : start + SCAN_CHUNK_TOKENS]
            chunk_low, chunk_high = int(chunk.min()), int(chunk.max())
            low, high = (chunk_low, chunk_high) if high < low else (min(low, chunk_low), max(high, chunk_high))
        return low, high

    def close(self) -> None:
        """Drop the memory maps (views handed out earlier keep their own reference)."""
        self._index = self._tokens = None

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self._tokens.size)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.get(i) for i in range(*index.indices(len(self)))]
        return self.get(index)

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence `index` as a read-only view (length None: to the end)."""
        count = len(self)
        if not -count <= index < count:
            raise IndexError(f"sequence {index} out of range for {self.prefix} with {count} sequences")
        index %= count
        sequence_length = int(self.sequence_lengths[index])
        if length is None:
            length = sequence_length - offset
        if offset < 0 or length < 0 or offset + length > sequence_length:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) out of range for sequence {index} of {self.prefix} "
                f"with {sequence_length} tokens"
            )
        start = int(self.sequence_pointers[index]) // self.dtype.itemsize + offset
        return self._tokens[start : start + length]
