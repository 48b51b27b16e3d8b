"""The tokenizer a token dataset was made with, recorded beside its .bin/.idx, so a run cannot read ids made by
another tokenizer of the same vocabulary size (the ids would mean other pieces, and nothing would look wrong).

tools/preprocess_data.py writes `{prefix}.tokenizer.json` before the token files, atomically:

    {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": "tok/llama.model", "tokenizer_hash": "<sha256>"}

(`tokenizer_hash`: data/tokenizer.tokenizer_hash, the sha256 of the tokenizer's files). The .bin/.idx pair keeps
Megatron-LM's byte layout; datasets made elsewhere, or before this record existed, have none and are read as
they are. The trainer checks every prefix it reads against its own tokenizer:

    check_dataset_tokenizer(["data/pile_text_document"], tokenizer_hash(tokenizer), "tok/llama.model")
"""
from __future__ import annotations

import json
import os

from megatron_llama.data.errors import DataError

RECORD_SUFFIX = ".tokenizer.json"


def tokenizer_record_path(prefix: str) -> str:
    return prefix + RECORD_SUFFIX


def write_tokenizer_record(prefix: str, tokenizer_type: str, tokenizer_model: str, tokenizer_hash: str) -> None:
    """Record the tokenizer of the dataset at `prefix` (written under a temporary name, then renamed)."""
    path = tokenizer_record_path(prefix)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({"tokenizer_type": tokenizer_type, "tokenizer_model": os.path.abspath(tokenizer_model),
                   "tokenizer_hash": tokenizer_hash}, handle, indent=2)
        handle.write("\n")
    os.replace(temporary, path)


def read_tokenizer_record(prefix: str) -> dict | None:
    """The record of the dataset at `prefix`, or None when it has none."""
    path = tokenizer_record_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            recorded = json.load(handle)
        if not all(isinstance(recorded.get(key), str) for key in ("tokenizer_type", "tokenizer_model",
                                                                 "tokenizer_hash")):
            raise ValueError("tokenizer_type, tokenizer_model and tokenizer_hash must be strings")
    except (OSError, ValueError, AttributeError) as error:
        raise DataError(f"{path}: cannot read the dataset's tokenizer record ({error}); remove it or run "
                        f"tools/preprocess_data.py again") from None
    return recorded


def common_tokenizer_record(prefixes: list[str]) -> dict | None:
    """The record all of `prefixes` share (tools/merge_datasets.py gives it to the merged dataset); None when none
    has one; DataError naming two prefixes made by different tokenizers, or a recorded and an unrecorded one."""
    records = {prefix: read_tokenizer_record(prefix) for prefix in prefixes}
    first_prefix, first = next(iter(records.items()))
    for prefix, record in records.items():
        if (record is None) != (first is None) or (record and record["tokenizer_hash"] != first["tokenizer_hash"]):
            described = {name: value["tokenizer_model"] if value else "no tokenizer record"
                         for name, value in ((first_prefix, first), (prefix, record))}
            raise DataError(f"{first_prefix} ({described[first_prefix]}) and {prefix} ({described[prefix]}) were not "
                            f"tokenized by the same tokenizer; merge only datasets made with one tokenizer")
    return first


def check_dataset_tokenizer(prefixes: list[str], tokenizer_hash: str, tokenizer_model: str) -> None:
    """DataError naming the first prefix whose recorded tokenizer is not this run's (`tokenizer_hash`)."""
    for prefix in prefixes:
        recorded = read_tokenizer_record(prefix)
        if recorded is None:
            continue
        recorded_hash, recorded_model = recorded["tokenizer_hash"], recorded["tokenizer_model"]
        if recorded_hash != tokenizer_hash:
            raise DataError(f"{prefix} was tokenized with {recorded_model} (sha256 {recorded_hash[:12]}) but this run "
                            f"reads it with {tokenizer_model} (sha256 {tokenizer_hash[:12]}): its ids would mean other "
                            f"pieces; pass the tokenizer that made it, or preprocess the data again with this one")
