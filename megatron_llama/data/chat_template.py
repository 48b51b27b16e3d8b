"""Chat formats: conversations -> prompt text or token ids, and the same format as a Jinja chat template.

One module renders conversations for generation, the chat server and the Hugging Face export (whose
tokenizer_config.json carries `jinja()` as "chat_template", so transformers' `tokenizer.apply_chat_template`
renders the same text and ids). Templates, selected by name (`--chat-template`):

    openllama (default)  <s>user: {prompt}<s>system: {completion}</s>user: ...<s>system:        (Open-Llama)
    llama2               <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{prompt} [/INST] {completion} </s><s>[INST] ...
    chatml               <s><|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n...

Every conversation starts with BOS, as plain prompts do. A message is {"role": "user" | "assistant" | "system",
"content": str}; add_generation_prompt appends the opening of the assistant's turn.

    template = get_chat_template("openllama")
    text = template.render(messages, bos_token="<s>", eos_token="</s>")
    ids = template.encode(messages, tokenizer)        # BOS/EOS as the tokenizer's ids, the rest tokenized
    tokenizer_config["chat_template"] = template.jinja()

`encode` tokenizes each stretch of text between special tokens on its own, as Hugging Face tokenizers do, so the
ids equal transformers' even where our tokenizer would read "<s>" inside a text as plain characters.
"""
from __future__ import annotations

from dataclasses import dataclass

BOS, EOS, CONTENT = "{bos}", "{eos}", "{content}"  # markers in a template's parts; every other part is literal text
ROLES = ("system", "user", "assistant")
DEFAULT_CHAT_TEMPLATE = "openllama"


class ChatTemplateError(ValueError):
    """A conversation the template cannot render; the message says what to change."""


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    user: tuple[str, ...]
    assistant: tuple[str, ...]
    system: tuple[str, ...] | None
    """Parts of a system message; None: the first system message is put in front of the first user message through
    `system_into_user` (Llama 2 has no turn of its own for it)."""
    generation_prompt: tuple[str, ...]
    start: tuple[str, ...] = (BOS,)
    system_into_user: str = ""
    stop: tuple[str, ...] = ()
    """Stop strings a completion in this format ends with (besides the end-of-document token)."""

    def parts(self, messages: list[dict], add_generation_prompt: bool = True) -> list[str]:
        """The conversation as literal texts and BOS/EOS markers, in order."""
        check_messages(messages)
        system_prefix = ""
        if self.system is None and messages and messages[0]["role"] == "system":
            system_prefix = self.system_into_user.replace(CONTENT, messages[0]["content"])
            messages = messages[1:]
        parts = list(self.start)
        for index, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role == "system" and self.system is None:
                raise ChatTemplateError(f"the {self.name} chat template takes a system message only as the first one")
            if role == "user" and index == 0:
                content = system_prefix + content
            parts += [content if part == CONTENT else part for part in getattr(self, role)]
        if add_generation_prompt:
            parts += list(self.generation_prompt)
        return parts

    def render(self, messages: list[dict], bos_token: str | None, eos_token: str | None,
               add_generation_prompt: bool = True) -> str:
        """The conversation as text, with the tokenizer's BOS/EOS spelled out (what apply_chat_template renders)."""
        tokens = {BOS: bos_token or "", EOS: eos_token or ""}
        return "".join(tokens.get(part, part) for part in self.parts(messages, add_generation_prompt))

    def encode(self, messages: list[dict], tokenizer, add_generation_prompt: bool = True) -> list[int]:
        """Token ids: BOS/EOS as the tokenizer's ids (left out when it has none), each stretch of text between
        them tokenized as a whole."""
        specials = {BOS: tokenizer.bos, EOS: tokenizer.eod}
        ids, text = [], ""
        for part in self.parts(messages, add_generation_prompt):
            if part not in specials:
                text += part
                continue
            ids += tokenizer.tokenize(text) if text else []
            text = ""
            ids += [specials[part]] if specials[part] is not None else []
        return ids + (tokenizer.tokenize(text) if text else [])

    def jinja(self) -> str:
        """This template in Jinja, for tokenizer_config.json's "chat_template" (transformers' apply_chat_template)."""
        def emit(parts: tuple[str, ...], content: str = "message['content']") -> str:
            rendered = {BOS: "bos_token", EOS: "eos_token", CONTENT: content}
            return "".join("{{ " + rendered.get(part, _jinja_string(part)) + " }}" for part in parts)

        source = emit(self.start)
        loop = "messages"
        if self.system is None:
            prefix = self.system_into_user.split(CONTENT)
            source += ("{% set system_prefix = '' %}{% if messages and messages[0]['role'] == 'system' %}"
                       "{% set system_prefix = " + _jinja_string(prefix[0]) + " + messages[0]['content'] + "
                       + _jinja_string(prefix[1]) + " %}{% endif %}")
            loop = "(messages[1:] if messages and messages[0]['role'] == 'system' else messages)"
        source += "{% for message in " + loop + " %}"
        user_content = "((system_prefix if loop.first else '') + message['content'])" if self.system is None else None
        branches = [("user", emit(self.user, user_content or "message['content']")),
                    ("assistant", emit(self.assistant))]
        if self.system is not None:
            branches.append(("system", emit(self.system)))
        for number, (role, body) in enumerate(branches):
            source += ("{% if" if number == 0 else "{% elif") + f" message['role'] == '{role}' %}}" + body
        source += ("{% else %}{{ raise_exception('the " + self.name + " chat template has no role ' + message['role']"
                   ") }}{% endif %}{% endfor %}")
        source += "{% if add_generation_prompt %}" + emit(self.generation_prompt) + "{% endif %}"
        return source


def _jinja_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


def check_messages(messages) -> None:
    """ChatTemplateError unless `messages` is a non-empty list of {"role": one of ROLES, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError('"messages" must be a non-empty list of {"role", "content"} objects')
    for number, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise ChatTemplateError(f"message {number} needs a \"role\" ({', '.join(ROLES)}) and a string "
                                    f"\"content\", got {message!r:.200}")


CHAT_TEMPLATES = {
    "openllama": ChatTemplate("openllama", user=("user: ", CONTENT, BOS), assistant=("system: ", CONTENT, EOS),
                              system=(CONTENT, "\n"), generation_prompt=("system: ",)),
    "llama2": ChatTemplate("llama2", user=(BOS, "[INST] ", CONTENT, " [/INST]"), assistant=(" ", CONTENT, " ", EOS),
                           system=None, generation_prompt=(), start=(),
                           system_into_user="<<SYS>>\n" + CONTENT + "\n<</SYS>>\n\n"),
    "chatml": ChatTemplate("chatml", user=("<|im_start|>user\n", CONTENT, "<|im_end|>\n"),
                           assistant=("<|im_start|>assistant\n", CONTENT, "<|im_end|>\n"),
                           system=("<|im_start|>system\n", CONTENT, "<|im_end|>\n"),
                           generation_prompt=("<|im_start|>assistant\n",), stop=("<|im_end|>",)),
}


def common_prefix_length(first: list[int], second: list[int]) -> int:
    """How many leading ids two renderings share: where a turn's tokens start in the rendering that adds it (the
    template renders a conversation's prefix as the prefix of the whole, up to the turn's opening)."""
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def get_chat_template(name: str) -> ChatTemplate:
    if name not in CHAT_TEMPLATES:
        raise ChatTemplateError(f"unknown chat template {name!r} (--chat-template); choose one of "
                                f"{', '.join(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[name]
