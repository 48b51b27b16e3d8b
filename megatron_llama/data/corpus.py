"""Raw corpus reading shared by tools/train_tokenizer.py and tools/preprocess_data.py.

Inputs are files, globs or directories (searched recursively, files taken in sorted order) of JSON lines
(.jsonl, .json, .jsonl.zst, .json.zst, .zst) or plain text (.txt, .txt.zst). Everything streams: a file is
read line by line, a zstandard file through a stream decompressor (multi-frame files included), so memory
stays flat whatever the file size. Lines keep their 1-based numbers so errors can say `file:line`.

A line can be bad in five ways, each a `BadLineError` kind: not UTF-8, malformed JSON (or JSON that is not an
object), a requested key missing, a requested value that is not a string, or a value holding a lone surrogate
escape such as "\\ud800" (valid JSON, but no UTF-8 text: tokenizers cannot take it). Callers decide whether to
stop or to skip and count.

A whole file can be damaged: a .zst file that ends inside a zstd frame (cut short by a failed download or copy)
or holds bytes that are not zstd data. That raises `DamagedFileError`, which is never a bad line: skipping
would silently lose the rest of the file, so no caller skips it.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
from typing import Iterator

import zstandard

from megatron_llama.data.errors import DataError

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".zst")
TEXT_SUFFIXES = (".txt", ".txt.zst")
READ_BUFFER_BYTES = 1 << 20
COMPRESSED_READ_BYTES = 1 << 17  # compressed bytes decoded at a time (a few MB of text at most)
LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")  # json.loads joins valid pairs, so any surrogate left is alone

BAD_LINE_KINDS = {
    "invalid_utf8": "not UTF-8",
    "invalid_json": "malformed JSON",
    "missing_key": "missing key",
    "not_a_string": "value is not a string",
    "lone_surrogate": "not encodable text",
}


class CorpusInputError(DataError):
    """An input pattern that names no usable file; the message says which and what is accepted."""


class DamagedFileError(DataError):
    """A compressed input cut short or corrupt; never skipped (it is not a bad line). The message names
    `file:line`, the line where the damage was found, when the line is known."""

    def __init__(self, path: str, problem: str, line_number: int | None = None):
        location = path if line_number is None else f"{path}:{line_number}"
        super().__init__(f"{location}: {problem}; download or compress the file again")
        self.path, self.problem = path, problem


class BadLineError(DataError):
    """One unusable input line; `kind` is a key of BAD_LINE_KINDS, `detail` says what is wrong."""

    def __init__(self, kind: str, detail: str, location: str | None = None):
        message = f"{BAD_LINE_KINDS[kind]}: {detail}"
        super().__init__(f"{location}: {message}" if location else message)
        self.kind = kind
        self.detail = detail
        self.location = location


def is_json_lines(path: str) -> bool:
    return path.endswith(JSON_SUFFIXES) and not path.endswith(TEXT_SUFFIXES)


def _has_glob_characters(pattern: str) -> bool:
    return any(character in pattern for character in "*?[")


def expand_inputs(patterns: list[str], suffixes: tuple[str, ...] = JSON_SUFFIXES) -> list[str]:
    """Files named by `patterns` (files, globs, directories), in the given order, each directory and glob sorted.

    Raises CorpusInputError for a pattern that matches no file with one of `suffixes`.
    """
    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(folder, name)
                for folder, _, names in os.walk(pattern, followlinks=True)
                for name in names
                if name.endswith(suffixes)
            )
            where = f"directory {pattern}"
        elif _has_glob_characters(pattern):
            found = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path) and path.endswith(suffixes))
            where = f"glob {pattern}"
        elif os.path.isfile(pattern):
            if not pattern.endswith(suffixes):
                raise CorpusInputError(f"input {pattern} is not a supported file type; expected a name ending in {', '.join(suffixes)}")
            found = [pattern]
            where = pattern
        else:
            raise CorpusInputError(f"input {pattern} does not exist")
        if not found:
            raise CorpusInputError(f"{where} holds no file ending in {', '.join(suffixes)}")
        files.extend(found)
    unique = list(dict.fromkeys(files))
    return unique


class ZstdFramesReader(io.RawIOBase):
    """The decompressed bytes of a .zst file of one or more frames, checking that the last frame is complete.

    (zstandard's stream_reader ends quietly where the input ends, even inside a frame, so a cut file would pass
    for a shorter one.) Raises DamagedFileError when the file ends inside a frame or holds bytes that are not
    zstd data.
    """

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "rb")
        self._frame = None  # the decompressor of the frame being read; None between frames
        self._frame_start = 0  # compressed offset where that frame starts
        self._consumed = 0  # compressed bytes handed to decompressors so far
        self._ready = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._ready:
            compressed = self._file.read(COMPRESSED_READ_BYTES)
            if not compressed:
                if self._frame is not None:
                    raise DamagedFileError(self.path, f"truncated: the file ends inside the zstd frame that starts at "
                                                      f"byte {self._frame_start:,} (the file has {self._consumed:,} bytes)")
                return 0
            self._ready = memoryview(self._decode(compressed))
        count = min(len(buffer), len(self._ready))
        buffer[:count] = self._ready[:count]
        self._ready = self._ready[count:]
        return count

    def _decode(self, compressed: bytes) -> bytes:
        """Decompress `compressed`, starting a new frame wherever the previous one ends."""
        pieces = []
        position = self._consumed
        self._consumed += len(compressed)
        while compressed:
            if self._frame is None:
                self._frame, self._frame_start = zstandard.ZstdDecompressor().decompressobj(), position
            try:
                pieces.append(self._frame.decompress(compressed))
            except zstandard.ZstdError as error:
                raise DamagedFileError(self.path, f"not zstd data in the frame that starts at byte "
                                                  f"{self._frame_start:,} ({error})") from None
            if not self._frame.eof:
                break
            leftover = self._frame.unused_data
            position += len(compressed) - len(leftover)
            compressed, self._frame = leftover, None
        return b"".join(pieces)

    def close(self) -> None:
        self._file.close()
        super().close()


def open_binary(path: str) -> io.BufferedReader:
    """A buffered binary stream of the file's (decompressed) bytes; a damaged .zst raises DamagedFileError."""
    raw = ZstdFramesReader(path) if path.endswith(".zst") else open(path, "rb")
    return io.BufferedReader(raw, buffer_size=READ_BUFFER_BYTES)


def iter_raw_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, line bytes without the trailing newline) for every line of the file.

    A damaged .zst raises DamagedFileError naming the line where the damage begins; the partial line at a cut
    is never yielded.
    """
    line_number = 0
    with open_binary(path) as stream:
        try:
            for line_number, line in enumerate(stream, start=1):
                yield line_number, line.rstrip(b"\r\n")
        except DamagedFileError as error:
            raise DamagedFileError(path, error.problem, line_number + 1) from None


def decode_utf8(raw_line: bytes) -> str:
    try:
        return raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadLineError("invalid_utf8", f"byte {error.start} ({raw_line[error.start:error.start + 1]!r}) is not valid UTF-8") from None


def parse_json_record(raw_line: bytes) -> dict:
    """The JSON object on one line; BadLineError for bytes that are not UTF-8 or not a JSON object."""
    text = decode_utf8(raw_line)
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadLineError("invalid_json", f"{error.msg} at column {error.colno}") from None
    if not isinstance(record, dict):
        hint = " (a JSON array file must be rewritten as one object per line)" if isinstance(record, list) else ""
        raise BadLineError("invalid_json", f"expected a JSON object, got {type(record).__name__}{hint}")
    return record


def record_text(record: dict, key: str) -> str:
    """The string under `key`; BadLineError when it is absent or not a string."""
    if key not in record:
        present = ", ".join(list(record)[:8])
        raise BadLineError("missing_key", f"no key {key!r} (keys present: {present or 'none'})")
    value = record[key]
    if not isinstance(value, str):
        raise BadLineError("not_a_string", f"key {key!r} holds {type(value).__name__}, not a string")
    check_encodable(value, f"key {key!r}")
    return value


def check_encodable(text: str, what: str) -> None:
    """BadLineError when `text` (named `what` in the message) holds a lone surrogate, which no UTF-8 text can."""
    surrogate = LONE_SURROGATE.search(text)
    if surrogate:
        raise BadLineError("lone_surrogate", f"{what} holds the lone surrogate escape \\u{ord(surrogate.group()):04x} at "
                                             f"character {surrogate.start()}: valid JSON, but not text")


def iter_texts(paths: list[str], json_keys: list[str], skip_bad_lines: bool = False, bad_line_counts: dict | None = None) -> Iterator[str]:
    """Every text of the corpus: each requested key of each JSON line, or each line of a .txt file.

    A bad line raises BadLineError with `file:line` in its message, or, with skip_bad_lines, is counted in
    `bad_line_counts[kind]` and skipped. Blank lines are passed over.
    """
    for path in paths:
        json_lines = is_json_lines(path)
        for line_number, raw_line in iter_raw_lines(path):
            if not raw_line.strip():
                continue
            try:
                if json_lines:
                    record = parse_json_record(raw_line)
                    texts = [record_text(record, key) for key in json_keys]
                else:
                    texts = [decode_utf8(raw_line)]
            except BadLineError as error:
                if not skip_bad_lines:
                    raise BadLineError(error.kind, error.detail, f"{path}:{line_number}") from None
                if bad_line_counts is not None:
                    bad_line_counts[error.kind] = bad_line_counts.get(error.kind, 0) + 1
                continue
            yield from texts
