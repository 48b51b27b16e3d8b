"""Preference pairs for DPO (--dpo) from a jsonl file, rendered with the shared chat template on the fly.

Each line is one record, a prompt and two answers to it, the preferred one first:

    {"prompt": "What does len() return?", "chosen": "The number of items.", "rejected": "A string."}
    {"messages": [{"role": "user", "content": ...}, ...], "chosen": "...", "rejected": "..."}
    {"prompt": [{"role": "user", "content": ...}], "chosen": [{"role": "assistant", "content": "..."}],
     "rejected": [{"role": "assistant", "content": "..."}]}                                     (TRL's form)

A prompt is a string (one user turn) or a list of messages ("messages" is the same list under another name);
an answer is a string, an assistant message, or a list holding one assistant message: the final turn. Both
conversations are rendered with the chat template (data/chat_template.py, --chat-template) and tokenized:

    chosen   = template(prompt + [chosen turn])        loss mask 1 on the answer's tokens and its end marker
    rejected = template(prompt + [rejected turn])      the same

The answer's tokens are those after the longest common prefix of the rendered prompt (with the opening of the
assistant's turn) and the whole conversation, as TRL's DPOTrainer takes them, so a token that merges across the
boundary is counted with the answer. A sample is the pair, padded to seq_length + 1 tokens:

    {"text": int64 [2, seq_length + 1], "loss_mask": int64 [2, seq_length + 1]}      row 0 chosen, row 1 rejected

so the pair stays together in one micro-batch on one data-parallel rank (data_loader.collate flattens it to two
rows in order). A pair whose longer conversation exceeds seq_length + 1 tokens is left out, never cut (a cut
answer loses its end marker); left-out pairs are counted and logged, and a file whose every pair is too long is
an error. A pair whose chosen and rejected conversations render to the same tokens teaches nothing (its loss
stays at ln 2 with no gradient): such pairs are kept, counted and logged (`identical`), and a file whose every kept
pair is one is an error. A malformed record raises PreferenceDataError naming the file and line.

    python -m megatron_llama.pretrain --dpo --train-data-path prefs.jsonl --load sft_ckpt --finetune \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizer.model --dpo-beta 0.1 ...

A dataset of n pairs serves any number of samples: epoch e visits the pairs in an order drawn from (seed, e).
With --dpo-precompute-reference the reference policy's log-probabilities of every pair are computed once
(dpo.precompute_reference_logps) into `reference_logps` [n, 2]; samples then carry theirs, "reference_logps" [2].
"""
from __future__ import annotations


import numpy as np

from megatron_llama.data.chat_template import ChatTemplate, ChatTemplateError, check_messages, common_prefix_length
from megatron_llama.data.corpus import BadLineError, check_encodable, iter_raw_lines, parse_json_record
from megatron_llama.data.errors import DataError


class PreferenceDataError(DataError):
    """A record of a preference jsonl file that cannot be used; the message names the file and line."""


def _prompt_messages(record: dict, where: str) -> list[dict]:
    prompt = record.get("messages", record.get("prompt"))
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise PreferenceDataError(f"{where}: needs a \"prompt\" (a string or a list of messages) or a \"messages\" "
                                  f"list, and \"chosen\" and \"rejected\"; found keys {sorted(record)}")
    return prompt


def _final_turn(record: dict, key: str, where: str) -> dict:
    answer = record.get(key)
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    if isinstance(answer, str):
        answer = {"role": "assistant", "content": answer}
    if not (isinstance(answer, dict) and answer.get("role") == "assistant" and isinstance(answer.get("content"), str)
            and answer["content"]):
        raise PreferenceDataError(f"{where}: \"{key}\" must be a non-empty string or one assistant message "
                                  f"{{\"role\": \"assistant\", \"content\": ...}}")
    return answer


def parse_pair(record, where: str) -> tuple[list[dict], dict, dict]:
    """(prompt messages, chosen turn, rejected turn) of one parsed record, every text checked to be encodable."""
    if not isinstance(record, dict):
        raise PreferenceDataError(f"{where}: a record must be a JSON object with \"prompt\", \"chosen\" and "
                                  f"\"rejected\"")
    prompt = _prompt_messages(record, where)
    chosen, rejected = _final_turn(record, "chosen", where), _final_turn(record, "rejected", where)
    try:
        check_messages(prompt)
        for number, message in enumerate(prompt + [chosen, rejected]):
            check_encodable(message["content"], f"message {number}")
    except (ChatTemplateError, BadLineError) as error:
        raise PreferenceDataError(f"{where}: {error}") from None
    return prompt, chosen, rejected



def encode_answer(prompt: list[dict], answer: dict, template: ChatTemplate, tokenizer) -> tuple[list[int], int]:
    """Token ids of the conversation prompt + [answer] and where its answer starts (module docstring)."""
    prompt_ids = template.encode(prompt, tokenizer, add_generation_prompt=True)
    ids = template.encode(prompt + [answer], tokenizer, add_generation_prompt=False)
    return ids, common_prefix_length(prompt_ids, ids)


def pad_pair(encoded: list[tuple[list[int], int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss masks, both [2, length], of the (ids, answer start) of the chosen and rejected answer."""
    text = np.full((2, length), pad_id, dtype=np.int64)
    mask = np.zeros((2, length), dtype=np.int64)
    for row, (ids, start) in enumerate(encoded):
        text[row, :len(ids)] = ids
        mask[row, start:len(ids)] = 1
    return text, mask


class PreferenceDataset:
    """`num_samples` pairs {"text": [2, seq_length + 1], "loss_mask": [2, seq_length + 1]} cycling over a file.

    Pairs longer than seq_length + 1 tokens are left out: `too_long` counts them, `longest` is the longest.
    Pairs whose chosen and rejected tokens are equal are kept and counted in `identical` (`first_identical`: the
    line of the first).
    """

    def __init__(self, path: str, tokenizer, template: ChatTemplate, seq_length: int, num_samples: int, seed: int):
        self.path, self.num_samples, self.seed = path, num_samples, seed
        self.pairs = []  # (text, mask) per pair
        self.too_long = self.longest = self.identical = 0
        self.first_identical: str | None = None
        pad_id = tokenizer.pad if tokenizer.pad is not None else tokenizer.eod
        for line_number, raw_line in iter_raw_lines(path):
            if not raw_line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                record = parse_json_record(raw_line)
            except BadLineError as error:
                raise PreferenceDataError(f"{where}: {error}") from None
            prompt, chosen, rejected = parse_pair(record, where)
            encoded = [encode_answer(prompt, answer, template, tokenizer) for answer in (chosen, rejected)]
            for ids, start in encoded:
                if start == len(ids):
                    raise PreferenceDataError(f"{where}: an answer renders to no tokens after its prompt")
            length = max(len(ids) for ids, _ in encoded)
            if length > seq_length + 1:
                self.too_long += 1
                self.longest = max(self.longest, length)
                continue
            if encoded[0][0] == encoded[1][0]:
                self.identical += 1
                self.first_identical = self.first_identical or where
            self.pairs.append(pad_pair(encoded, seq_length + 1, pad_id))
        if self.pairs and self.identical == len(self.pairs):
            raise PreferenceDataError(f"{path}: in all {self.identical} pairs the chosen and rejected answers are the "
                                      f"same, so DPO has nothing to learn (its loss stays at ln 2 = 0.6931); give "
                                      f"pairs whose answers differ")
        if not self.pairs:
            if self.too_long:
                raise PreferenceDataError(f"{path}: all {self.too_long} pairs are longer than --seq-length + 1 = "
                                          f"{seq_length + 1} tokens (the longest has {self.longest}); raise "
                                          f"--seq-length")
            raise PreferenceDataError(f"{path} holds no records; give a jsonl file with one pair per line")
        self._orders: dict[int, np.ndarray] = {}
        self.reference_logps: np.ndarray | None = None  # [pairs, 2] float32 (chosen, rejected), when precomputed

    def describe(self) -> str:
        """One log line: the pairs kept, those left out for their length, and those whose answers are the same."""
        line = f"DPO data {self.path}: {len(self.pairs):,} preference pairs"
        if self.too_long:
            line += (f"; {self.too_long:,} longer than --seq-length + 1 tokens left out (the longest has "
                     f"{self.longest:,} tokens: --seq-length {self.longest - 1} would keep them)")
        if self.identical:
            line += (f"; WARNING: in {self.identical:,} of them (the first at {self.first_identical}) chosen equals "
                     f"rejected, which teaches nothing")
        return line

    def __len__(self) -> int:
        return self.num_samples

    def _pair_index(self, index: int) -> int:
        epoch, position = divmod(index, len(self.pairs))
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        return int(self._orders[epoch][position])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} is outside the preference dataset of {self.num_samples} samples")
        pair = self._pair_index(index)
        sample = self.pair_sample(pair)
        if self.reference_logps is not None:
            sample["reference_logps"] = self.reference_logps[pair]
        return sample

    def pair_sample(self, pair: int) -> dict:
        """Pair number `pair` of the file (of the pairs kept) as a sample {"text", "loss_mask"}."""
        text, mask = self.pairs[pair]
        return {"text": text, "loss_mask": mask}
