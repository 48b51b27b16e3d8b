"""Several documents in one training row: per-token document ids and positions, and greedy packing of records.

A packed sample carries, beside its "text" [seq_length + 1], "document_ids" (which document each token belongs to,
numbered from 0 along the row) and/or "position_ids" (each token's position inside its own document); the data
loader cuts both like the model's inputs (data_loader.collate_micro_batch) and the model keeps attention inside each
document and restarts the rotary positions there (model/llama.py), so each document computes what it would alone.

Two sources of packed rows:

- SFT with --sft-packing (data/sft_dataset.py): `pack_greedily` fills each row with whole records in their
  (shuffled) order; a row's tail that no record fits is padding, its own document, never learned.
- Pretraining with Megatron's flags: `EodDocuments` wraps a token dataset and derives the documents from the
  end-of-document tokens inside each sample (a document ends with its EOD):

      --reset-position-ids     positions restart after every EOD            -> "position_ids"
      --reset-attention-mask   attention never crosses an EOD               -> "document_ids"
      --eod-mask-loss          no loss on the prediction made from an EOD   -> "loss_mask"
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def positions_within_documents(document_ids: np.ndarray) -> np.ndarray:
    """[n] document ids, constant along each document -> [n] positions counting from 0 at each document's start."""
    index = np.arange(len(document_ids))
    starts = np.flatnonzero(np.diff(document_ids, prepend=document_ids[:1] - 1))  # first token of each document
    return index - np.repeat(starts, np.diff(np.append(starts, len(document_ids))))


def documents_from_eod(text: np.ndarray, eod: int) -> np.ndarray:
    """[n] tokens -> [n] document ids: a new document starts right after each EOD token."""
    is_eod = (text == eod).astype(np.int64)
    return np.cumsum(is_eod) - is_eod


def pack_greedily(lengths: list[int], capacity: int) -> list[list[int]]:
    """Positions of `lengths` grouped into rows of at most `capacity` tokens, in order: a record that does not fit
    in the current row starts the next one (every length must be <= capacity)."""
    rows, row, used = [], [], 0
    for position, length in enumerate(lengths):
        if row and used + length > capacity:
            rows.append(row)
            row, used = [], 0
        row.append(position)
        used += length
    if row:
        rows.append(row)
    return rows


@dataclass(frozen=True)
class EodDocuments:
    """A token dataset whose samples gain the fields that Megatron's --reset-position-ids, --reset-attention-mask
    and --eod-mask-loss ask for (module docstring), derived from the `eod` tokens of each sample."""

    dataset: object
    eod: int
    reset_position_ids: bool
    reset_attention_mask: bool
    eod_mask_loss: bool

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.dataset[index])
        text = np.asarray(sample["text"])
        documents = documents_from_eod(text, self.eod)
        if self.reset_position_ids:
            sample["position_ids"] = positions_within_documents(documents)
        if self.reset_attention_mask:
            sample["document_ids"] = documents
        if self.eod_mask_loss:
            # the mask is read against the labels text[1:]: label j is learned unless the input text[j] is an EOD
            sample["loss_mask"] = np.concatenate([[1], text[:-1] != self.eod]).astype(np.int64)
        return sample
