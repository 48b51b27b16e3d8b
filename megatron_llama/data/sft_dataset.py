"""Instruction-tuning (SFT) samples from a jsonl file, tokenized on the fly with the run's tokenizer.

Each line is one record, either

    {"prompt": "What does len() return?", "response": "The number of items in a container."}
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}

A record becomes one sequence of seq_length + 1 tokens

    [BOS] prompt response EOD  pad pad ...

with a loss mask that is 1 on the response tokens and the EOD and 0 on BOS, prompt and padding, so
only the answer is learned. In a "messages" record the assistant turns are the response and every
other turn is prompt; each turn is tokenized on its own and joined in order. The trainer turns the
mask into labels of -100 (ignored by the cross entropy) and divides by the number of response tokens
of the global batch (training.loss_token_count).

A record longer than seq_length + 1 tokens is left out, never cut: a cut would drop its EOD, the token that
teaches the model where an answer ends, and train it on an answer that stops nowhere. Left-out records are
counted (`SFTDataset.too_long`) and the count is logged, with the length to give --seq-length to keep them all;
a file whose every record is too long is an error.

    python -m megatron_llama.pretrain --sft --train-data-path sft.jsonl --valid-data-path dev.jsonl \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model --load ckpt --finetune ...

A dataset of n records serves any number of samples: epoch e visits the records in an order drawn
from (seed, e), so sample i depends only on (file, seed, i). A malformed record (not UTF-8, not JSON, missing
fields, a lone surrogate escape such as "\\ud800") raises SFTDataError naming the file and line.
"""
from __future__ import annotations

import json
from typing import Callable

import numpy as np

from megatron_llama.data.corpus import BadLineError, check_encodable, decode_utf8, iter_raw_lines
from megatron_llama.data.errors import DataError


class SFTDataError(DataError):
    """A record of an SFT jsonl file that cannot be used; the message names the file and line."""


def _record_turns(record, where: str) -> list[tuple[str, bool]]:
    """(text, is_response) pieces of one parsed record, in order; each text checked to be encodable."""
    turns = _parse_turns(record, where)
    for number, (text, _) in enumerate(turns):
        try:
            check_encodable(text, f"turn {number}")
        except BadLineError as error:
            raise SFTDataError(f"{where}: {error}") from None
    return turns


def _parse_turns(record, where: str) -> list[tuple[str, bool]]:
    if not isinstance(record, dict):
        raise SFTDataError(f"{where}: a record must be a JSON object with \"prompt\" and \"response\" or \"messages\"")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise SFTDataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
        turns = []
        for number, message in enumerate(messages):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise SFTDataError(f"{where}: message {number} needs a string \"role\" and a string \"content\"")
            turns.append((message["content"], message["role"] == "assistant"))
        if not any(is_response for _, is_response in turns):
            raise SFTDataError(f"{where}: no message has role \"assistant\", so there is nothing to learn")
        return turns
    prompt, response = record.get("prompt"), record.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str) or not response:
        raise SFTDataError(f"{where}: needs a string \"prompt\" and a non-empty string \"response\" "
                           f"(or a \"messages\" list); found keys {sorted(record)}")
    return [(prompt, False), (response, True)]


def encode_record(turns: list[tuple[str, bool]], tokenizer, length: int
                  ) -> tuple[np.ndarray, np.ndarray] | int:
    """Token ids and loss mask, both [length], of one record: BOS? + turns + EOD, padded; or, when the record
    does not fit in `length` tokens, its token count (the record is left out: module docstring)."""
    ids, mask = ([tokenizer.bos], [0]) if tokenizer.bos is not None else ([], [])
    for text, is_response in turns:
        piece = tokenizer.tokenize(text)
        ids += piece
        mask += [int(is_response)] * len(piece)
    ids.append(tokenizer.eod)
    mask.append(1)  # the EOD is learned: it ends the answer
    if len(ids) > length:
        return len(ids)
    padding = length - len(ids)
    pad_id = tokenizer.pad if tokenizer.pad is not None else tokenizer.eod
    return (np.array(ids + [pad_id] * padding, dtype=np.int64), np.array(mask + [0] * padding, dtype=np.int64))


class SFTDataset:
    """`num_samples` samples {"text": [seq_length + 1], "loss_mask": [seq_length + 1]} cycling over a jsonl file.

    Records longer than seq_length + 1 tokens are left out: `too_long` counts them, `longest` is the longest.
    """

    def __init__(self, path: str, tokenizer, seq_length: int, num_samples: int, seed: int):
        self.path, self.num_samples, self.seed = path, num_samples, seed
        self.records = []  # (ids, mask) per record
        self.too_long = self.longest = 0
        for line_number, raw_line in iter_raw_lines(path):
            if not raw_line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                record = json.loads(decode_utf8(raw_line))
            except BadLineError as error:
                raise SFTDataError(f"{where}: {error}") from None
            except json.JSONDecodeError as error:
                raise SFTDataError(f"{where}: not valid JSON ({error})") from None
            encoded = encode_record(_record_turns(record, where), tokenizer, seq_length + 1)
            if isinstance(encoded, int):
                self.too_long += 1
                self.longest = max(self.longest, encoded)
            else:
                self.records.append(encoded)
        if not self.records:
            if self.too_long:
                raise SFTDataError(f"{path}: all {self.too_long} records are longer than --seq-length + 1 = "
                                   f"{seq_length + 1} tokens (the longest has {self.longest}); raise --seq-length")
            raise SFTDataError(f"{path} holds no records; give a jsonl file with one record per line")
        self._orders: dict[int, np.ndarray] = {}

    def describe(self) -> str:
        """One log line: the records kept, and those left out for their length."""
        line = f"SFT data {self.path}: {len(self.records):,} records"
        if self.too_long:
            line += (f"; {self.too_long:,} longer than --seq-length + 1 tokens left out (the longest has "
                     f"{self.longest:,} tokens: --seq-length {self.longest - 1} would keep them)")
        return line

    def __len__(self) -> int:
        return self.num_samples

    def _record_index(self, index: int) -> int:
        epoch, position = divmod(index, len(self.records))
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.records))
        return int(self._orders[epoch][position])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} is outside the SFT dataset of {self.num_samples} samples")
        ids, mask = self.records[self._record_index(index)]
        return {"text": ids, "loss_mask": mask}


def build_sft_datasets(train_path: str, valid_path: str | None, tokenizer, seq_length: int,
                       num_samples: tuple[int, int], seed: int, log: Callable[[str], None] = print):
    """(train, valid or None, None) SFT datasets holding the samples the run asks of each; `log` gets a line per
    dataset (SFTDataset.describe)."""
    train = SFTDataset(train_path, tokenizer, seq_length, num_samples[0], seed)
    log(train.describe())
    valid = None
    if valid_path is not None and num_samples[1] > 0:
        valid = SFTDataset(valid_path, tokenizer, seq_length, num_samples[1], seed + 1)
        log(valid.describe())
    return train, valid, None
