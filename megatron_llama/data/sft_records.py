"""One SFT jsonl record -> a conversation -> token ids, a loss mask and the turn ends where it may be cut.

A line is one record, either

    {"prompt": "What does len() return?", "response": "The number of items in a container."}
    {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}

An empty answer (a "response" or an assistant "content" of "") is refused in either form: it would teach the model to
answer with its end marker alone.

A prompt/response record is the conversation [user: prompt, assistant: response]. The conversation is rendered with
the run's chat template (data/chat_template.py, `--chat-template`, Open-Llama's by default):

    <s>user: {prompt}<s>system: {response}</s>                                   (openllama)

so the ids equal what the exported tokenizer's `apply_chat_template(messages)` tokenizes. The loss mask is 1 on the
tokens of each assistant turn and its end marker (</s> in openllama and llama2, <|im_end|> in chatml) and 0 on
everything else, the assistant's opening ("system: ") included: the first learned token is the first one where the
conversation's ids part from those of the prompt rendered with the generation prompt, the last one is the turn's
last. Messages after the last assistant turn teach nothing and are left out.

Too long for a sequence of `limit` tokens: the record is cut after its last assistant turn that fits whole
(`fitted_length`), so every kept answer keeps its end marker; a record whose first answer does not fit is dropped.
The caller counts both and logs them (data/sft_dataset.py).

    record = parse_record(line_bytes, "sft.jsonl line 3")             # SFTDataError names the file and line
    encoded = encode_conversation(record, get_chat_template("openllama"), tokenizer)
    kept = fitted_length(encoded.turn_ends, limit)                      # tokens kept; None: dropped
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_llama.data.chat_template import ChatTemplate, ChatTemplateError, check_messages, common_prefix_length
from megatron_llama.data.corpus import BadLineError, check_encodable, parse_json_record
from megatron_llama.data.errors import DataError


class SFTDataError(DataError):
    """A record of an SFT jsonl file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class EncodedRecord:
    ids: np.ndarray
    """[n] token ids of the conversation up to its last assistant turn."""
    loss_mask: np.ndarray
    """[n] 1 on assistant tokens and their end markers, else 0."""
    turn_ends: tuple[int, ...]
    """Token counts after each assistant turn, ascending (the last equals n): where the record may be cut."""


def parse_record(raw_line: bytes, where: str) -> list[dict]:
    """The conversation (messages) of one jsonl line; SFTDataError, naming `where`, when it cannot be used."""
    try:
        record = parse_json_record(raw_line)
    except BadLineError as error:
        raise SFTDataError(f"{where}: {error}") from None
    messages = _messages(record, where)
    for number, message in enumerate(messages):
        try:
            check_encodable(message["content"], f"turn {number}")
        except BadLineError as error:
            raise SFTDataError(f"{where}: {error}") from None
    return messages


def _messages(record, where: str) -> list[dict]:
    if not isinstance(record, dict):
        raise SFTDataError(f"{where}: a record must be a JSON object with \"prompt\" and \"response\" or \"messages\"")
    if "messages" in record:
        messages = record["messages"]
        try:
            check_messages(messages)
        except ChatTemplateError as error:
            raise SFTDataError(f"{where}: {error}") from None
        roles = [message["role"] for message in messages]
        if "assistant" not in roles:
            raise SFTDataError(f"{where}: no message has role \"assistant\", so there is nothing to learn")
        if roles.index("assistant") == 0 or roles[:roles.index("assistant")] == ["system"]:
            raise SFTDataError(f"{where}: the first assistant message needs a user message before it")
        empty = [number for number, message in enumerate(messages)
                 if message["role"] == "assistant" and not message["content"]]
        if empty:
            raise SFTDataError(f"{where}: assistant message {empty[0]} has an empty \"content\", which would teach "
                               f"the model to answer with nothing; give it the answer or leave the record out")
        return messages
    prompt, response = record.get("prompt"), record.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str) or not response:
        raise SFTDataError(f"{where}: needs a string \"prompt\" and a non-empty string \"response\" "
                           f"(or a \"messages\" list); found keys {sorted(record)}")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]



def encode_conversation(messages: list[dict], template: ChatTemplate, tokenizer, where: str = "record"
                        ) -> EncodedRecord:
    """Ids, loss mask and turn ends of a conversation (module docstring); SFTDataError when the template cannot
    render it."""
    last_answer = max(index for index, message in enumerate(messages) if message["role"] == "assistant")
    messages = messages[:last_answer + 1]
    try:
        ids = template.encode(messages, tokenizer, add_generation_prompt=False)
        mask = np.zeros(len(ids), dtype=np.uint8)
        turn_ends = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = template.encode(messages[:index], tokenizer, add_generation_prompt=True)
            with_turn = template.encode(messages[:index + 1], tokenizer, add_generation_prompt=False)
            start, end = common_prefix_length(ids, prompt), common_prefix_length(ids, with_turn)
            mask[start:end] = 1
            turn_ends.append(end)
    except ChatTemplateError as error:
        raise SFTDataError(f"{where}: {error}") from None
    return EncodedRecord(np.asarray(ids, dtype=np.int64), mask, tuple(turn_ends))


def fitted_length(turn_ends: tuple[int, ...], limit: int) -> int | None:
    """Tokens kept of a record whose assistant turns end at `turn_ends` (the last: its length): all when they fit in
    `limit`, else up to its last turn that ends within `limit`; None when even the first answer does not fit."""
    fitting = [end for end in turn_ends if end <= limit]
    return fitting[-1] if fitting else None
