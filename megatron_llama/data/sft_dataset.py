"""Instruction-tuning (SFT) samples: chat-template records, padded one per row or packed several per row.

Records come from a jsonl file, tokenized on the fly (small files), or from the indexed files that
tools/preprocess_sft.py writes (any size):

    python -m megatron_llama.pretrain --sft --train-data-path sft.jsonl --valid-data-path dev.jsonl \\
        --chat-template openllama --sft-packing \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model --load ckpt --finetune ...
    python tools/preprocess_sft.py --input sft.jsonl --output-prefix data/sft ... ;  ... --train-data-path data/sft

A record is rendered with the chat template and masked so that the loss covers the assistant turns and their end
markers only (data/sft_records.py). Samples are {"text": [seq_length + 1], "loss_mask": [seq_length + 1]}:

- unpacked (default): one record per row, then padding (mask 0);
- packed (--sft-packing): whole records one after another while they fit (data/packing.pack_greedily), then padding;
  the sample adds "document_ids" and "position_ids", so no record attends to another and each starts at position 0:
  every record computes the loss and gradients it would alone, with far less padding.

The trainer turns the mask into labels of -100 and divides by the number of learned tokens of the global batch
(training.loss_token_count). A record longer than seq_length + 1 tokens is cut after its last assistant turn that
fits, or dropped when its first answer does not fit with its end marker; never cut inside an answer. Both are
counted (`truncated`, `dropped`) and logged (`describe`); a file whose every record is dropped is an error.

Sample i depends only on (file, seed, i): epoch e visits the records in an order drawn from (seed, e) (and packs
them in that order). A malformed record raises SFTDataError naming the file and line.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from megatron_llama.data.chat_template import DEFAULT_CHAT_TEMPLATE, get_chat_template
from megatron_llama.data.corpus import iter_raw_lines
from megatron_llama.data.indexed_dataset import IndexedDataset, dataset_exists
from megatron_llama.data.packing import pack_greedily, positions_within_documents
from megatron_llama.data.sft_records import SFTDataError, encode_conversation, fitted_length, parse_record

LOSS_MASK_SUFFIX = "_loss_mask"  # PREFIX holds the tokens, PREFIX_loss_mask the masks (tools/preprocess_sft.py)

__all__ = ["LOSS_MASK_SUFFIX", "SFTDataError", "SFTDataset", "build_sft_datasets", "is_jsonl"]


def is_jsonl(path: str) -> bool:
    """A jsonl file (tokenized on the fly) rather than the prefix of preprocessed files."""
    return not dataset_exists(path)


class _FitRecords:
    """Records cut to a sequence (sft_records.fitted_length), with the counts of those cut and dropped."""

    def __init__(self, limit: int):
        self.limit = limit
        self.truncated = self.dropped = self.longest = 0

    def kept_length(self, turn_ends: tuple[int, ...]) -> int | None:
        """Tokens kept of a record whose assistant turns end at `turn_ends`; None: dropped. Counts both."""
        length = fitted_length(turn_ends, self.limit)
        if turn_ends[-1] > self.limit:
            self.longest = max(self.longest, turn_ends[-1])
            self.dropped += length is None
            self.truncated += length is not None
        return length


class _IndexedRecords:
    """The records of preprocessed files: document d of PREFIX (its sequences: one per assistant turn, each ending
    with the turn) and of PREFIX_loss_mask, each cut to `limit` tokens; `records[i]` -> (ids, mask)."""

    def __init__(self, prefix: str, fitter: _FitRecords):
        self.tokens, self.masks = IndexedDataset(prefix), IndexedDataset(prefix + LOSS_MASK_SUFFIX)
        if not np.array_equal(self.tokens.sequence_lengths, self.masks.sequence_lengths):
            raise SFTDataError(f"{prefix}{LOSS_MASK_SUFFIX} does not match {prefix}: rerun tools/preprocess_sft.py")
        documents = self.tokens.document_indices
        self.spans = []  # (first sequence, kept sequence count, kept tokens) per kept record
        for first, stop in zip(documents[:-1], documents[1:]):
            turn_ends = tuple(int(end) for end in np.cumsum(self.tokens.sequence_lengths[first:stop]))
            length = fitter.kept_length(turn_ends)
            if length is not None:
                self.spans.append((int(first), turn_ends.index(length) + 1, length))

    def __len__(self) -> int:
        return len(self.spans)

    def length(self, index: int) -> int:
        return self.spans[index][2]

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        first, count, _ = self.spans[index]
        ids = np.concatenate([self.tokens.get(sequence) for sequence in range(first, first + count)])
        mask = np.concatenate([self.masks.get(sequence) for sequence in range(first, first + count)])
        return ids.astype(np.int64), mask.astype(np.int64)


class _ListRecords(list):
    """In-memory records (ids, mask) of a jsonl file."""

    def length(self, index: int) -> int:
        return len(self[index][0])


def _read_jsonl(path: str, tokenizer, template_name: str, fitter: _FitRecords) -> _ListRecords:
    template = get_chat_template(template_name)
    records = _ListRecords()
    for line_number, raw_line in iter_raw_lines(path):
        if not raw_line.strip():
            continue
        where = f"{path} line {line_number}"
        record = encode_conversation(parse_record(raw_line, where), template, tokenizer, where)
        length = fitter.kept_length(record.turn_ends)
        if length is not None:
            records.append((record.ids[:length], record.loss_mask[:length].astype(np.int64)))
    return records


class SFTDataset:
    """`num_samples` SFT samples (module docstring) cycling over a jsonl file or preprocessed files at `path`."""

    def __init__(self, path: str, tokenizer, seq_length: int, num_samples: int, seed: int, *,
                 chat_template: str = DEFAULT_CHAT_TEMPLATE, packing: bool = False):
        self.path, self.num_samples, self.seed, self.packing = path, num_samples, seed, packing
        self.row_length = seq_length + 1
        self.pad_id = tokenizer.pad if tokenizer.pad is not None else tokenizer.eod
        self.fitter = _FitRecords(self.row_length)
        self.records = (_read_jsonl(path, tokenizer, chat_template, self.fitter) if is_jsonl(path)
                        else _IndexedRecords(path, self.fitter))
        if not len(self.records):
            if self.fitter.dropped:
                raise SFTDataError(f"{path}: the first answer of all {self.fitter.dropped} records does not fit in "
                                   f"--seq-length + 1 = {self.row_length} tokens (the longest record has "
                                   f"{self.fitter.longest}); raise --seq-length")
            raise SFTDataError(f"{path} holds no records; give a jsonl file with one record per line")
        self._orders: dict[int, np.ndarray] = {}  # epoch -> its record order
        self._epochs: list[list[list[int]]] = []  # packing: per epoch, its rows (the record indices of each)

    @property
    def truncated(self) -> int:
        """Records cut after their last assistant turn that fits."""
        return self.fitter.truncated

    @property
    def dropped(self) -> int:
        """Records left out: their first answer does not fit with its end marker."""
        return self.fitter.dropped

    @property
    def longest(self) -> int:
        """Tokens of the longest record that did not fit whole (0: all fit)."""
        return self.fitter.longest

    def describe(self) -> str:
        """One log line: the records kept, cut and left out for their length."""
        line = f"SFT data {self.path}: {len(self.records):,} records" + (", packed" if self.packing else "")
        if self.truncated:
            line += (f"; {self.truncated:,} longer than --seq-length + 1 = {self.row_length} tokens cut after their "
                     f"last assistant turn that fits")
        if self.dropped:
            line += f"; {self.dropped:,} left out: their first answer does not fit with its end marker"
        if self.longest:
            line += f" (the longest record has {self.longest:,} tokens: --seq-length {self.longest - 1} keeps all whole)"
        return line

    def __len__(self) -> int:
        return self.num_samples

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.records))
        return self._orders[epoch]

    def _row(self, index: int) -> list[int]:
        """The record indices of sample `index`: one record, or (packing) the records packed into its row."""
        if not self.packing:
            epoch, position = divmod(index, len(self.records))
            return [int(self._epoch_order(epoch)[position])]
        while sum(len(rows) for rows in self._epochs) <= index:
            order = np.random.default_rng([self.seed, len(self._epochs)]).permutation(len(self.records))
            rows = pack_greedily([self.records.length(int(record)) for record in order], self.row_length)
            self._epochs.append([[int(order[position]) for position in row] for row in rows])
        for rows in self._epochs:
            if index < len(rows):
                return rows[index]
            index -= len(rows)
        raise AssertionError("unreachable: the epochs above cover the index")

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} is outside the SFT dataset of {self.num_samples} samples")
        pieces = [self.records[record] for record in self._row(index)]
        ids = np.full(self.row_length, self.pad_id, dtype=np.int64)
        mask = np.zeros(self.row_length, dtype=np.int64)
        documents = np.full(self.row_length, len(pieces), dtype=np.int64)  # the padding: a document of its own
        start = 0
        for number, (record_ids, record_mask) in enumerate(pieces):
            ids[start:start + len(record_ids)] = record_ids
            mask[start:start + len(record_ids)] = record_mask
            documents[start:start + len(record_ids)] = number
            start += len(record_ids)
        sample = {"text": ids, "loss_mask": mask}
        if self.packing:
            sample.update(document_ids=documents, position_ids=positions_within_documents(documents))
        return sample


def build_sft_datasets(train_path: str, valid_path: str | None, tokenizer, seq_length: int,
                       num_samples: tuple[int, int], seed: int, log: Callable[[str], None] = print, *,
                       chat_template: str = DEFAULT_CHAT_TEMPLATE, packing: bool = False):
    """(train, valid or None, None) SFT datasets holding the samples the run asks of each; `log` gets a line per
    dataset (SFTDataset.describe)."""
    options = dict(chat_template=chat_template, packing=packing)
    train = SFTDataset(train_path, tokenizer, seq_length, num_samples[0], seed, **options)
    log(train.describe())
    valid = None
    if valid_path is not None and num_samples[1] > 0:
        valid = SFTDataset(valid_path, tokenizer, seq_length, num_samples[1], seed + 1, **options)
        log(valid.describe())
    return train, valid, None
