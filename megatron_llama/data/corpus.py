"""Raw corpus reading shared by tools/train_tokenizer.py and tools/preprocess_data.py.

Inputs are files, globs or directories (searched recursively, files taken in sorted order) of JSON lines
(.jsonl, .json, .jsonl.zst, .json.zst, .zst) or plain text (.txt, .txt.zst). Everything streams: a file is
read line by line, a zstandard file through a stream decompressor (multi-frame files included), so memory
stays flat whatever the file size. Lines keep their 1-based numbers so errors can say `file:line`.

A line can be bad in four ways, each a `BadLineError` kind: not UTF-8, malformed JSON (or JSON that is not an
object), a requested key missing, or a requested value that is not a string. Callers decide whether to stop
or to skip and count.
"""
from __future__ import annotations

import glob
import io
import json
import os
from typing import Iterator

import zstandard

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".zst")
TEXT_SUFFIXES = (".txt", ".txt.zst")
READ_BUFFER_BYTES = 1 << 20

BAD_LINE_KINDS = {
    "invalid_utf8": "not UTF-8",
    "invalid_json": "malformed JSON",
    "missing_key": "missing key",
    "not_a_string": "value is not a string",
}


class CorpusInputError(ValueError):
    """An input pattern that names no usable file; the message says which and what is accepted."""


class BadLineError(ValueError):
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


def open_binary(path: str) -> io.BufferedReader:
    """A buffered binary stream of the file's (decompressed) bytes."""
    raw = open(path, "rb")
    if path.endswith(".zst"):
        decompressed = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(decompressed, buffer_size=READ_BUFFER_BYTES)
    return io.BufferedReader(raw, buffer_size=READ_BUFFER_BYTES)


def iter_raw_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, line bytes without the trailing newline) for every line of the file."""
    with open_binary(path) as stream:
        for line_number, line in enumerate(stream, start=1):
            yield line_number, line.rstrip(b"\r\n")


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
    return value


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
