"""Instruction-tuning (SFT) samples from a jsonl file, tokenized on the fly with the run's tokenizer.

Each line is one record, either

    {"prompt": "What does len() return?", "response": "The number of items in a container."}
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}

A record becomes one sequence of seq_length + 1 tokens

    [BOS] prompt response EOD  pad pad ...      (truncated at seq_length + 1)

with a loss mask that is 1 on the response tokens and the EOD and 0 on BOS, prompt and padding, so
only the answer is learned. In a "messages" record the assistant turns are the response and every
other turn is prompt; each turn is tokenized on its own and joined in order. The trainer turns the
mask into labels of -100 (ignored by the cross entropy) and divides by the number of response tokens
of the global batch (training.loss_token_count).

    python -m megatron_llama.pretrain --sft --train-data-path sft.jsonl --valid-data-path dev.jsonl \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model --load ckpt --finetune ...

A dataset of n records serves any number of samples: epoch e visits the records in an order drawn
from (seed, e), so sample i depends only on (file, seed, i). A malformed record raises SFTDataError
naming the file and line.
"""
from __future__ import annotations

import json

import numpy as np


class SFTDataError(ValueError):
    """A record of an SFT jsonl file that cannot be used; the message names the file and line."""


def _record_turns(record, where: str) -> list[tuple[str, bool]]:
    """(text, is_response) pieces of one parsed record, in order."""
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


def encode_record(turns: list[tuple[str, bool]], tokenizer, length: int, where: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss mask, both [length], of one record: BOS? + turns + EOD, truncated or padded."""
    ids, mask = ([tokenizer.bos], [0]) if tokenizer.bos is not None else ([], [])
    for text, is_response in turns:
        piece = tokenizer.tokenize(text)
        ids += piece
        mask += [int(is_response)] * len(piece)
    ids.append(tokenizer.eod)
    mask.append(1)
    ids, mask = ids[:length], mask[:length]
    if not any(mask[1:]):  # mask[0] would be the label of nothing: labels start at position 1
        raise SFTDataError(f"{where}: the prompt fills all {length} tokens, leaving no response token to learn; "
                           f"raise --seq-length or shorten the prompt")
    padding = length - len(ids)
    pad_id = tokenizer.pad if tokenizer.pad is not None else tokenizer.eod
    return (np.array(ids + [pad_id] * padding, dtype=np.int64), np.array(mask + [0] * padding, dtype=np.int64))


class SFTDataset:
    """`num_samples` samples {"text": [seq_length + 1], "loss_mask": [seq_length + 1]} cycling over a jsonl file."""

    def __init__(self, path: str, tokenizer, seq_length: int, num_samples: int, seed: int):
        self.path, self.num_samples, self.seed = path, num_samples, seed
        self.records = []  # (ids, mask) per record
        with open(path, encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {line_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise SFTDataError(f"{where}: not valid JSON ({error})") from None
                self.records.append(encode_record(_record_turns(record, where), tokenizer, seq_length + 1, where))
        if not self.records:
            raise SFTDataError(f"{path} holds no records; give a jsonl file with one record per line")
        self._orders: dict[int, np.ndarray] = {}

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
                       num_samples: tuple[int, int], seed: int):
    """(train, valid or None, None) SFT datasets holding the samples the run asks of each."""
    train = SFTDataset(train_path, tokenizer, seq_length, num_samples[0], seed)
    valid = None
    if valid_path is not None and num_samples[1] > 0:
        valid = SFTDataset(valid_path, tokenizer, seq_length, num_samples[1], seed + 1)
    return train, valid, None
