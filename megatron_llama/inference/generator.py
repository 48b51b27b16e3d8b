"""Batched generation over the KV cache: prefill the prompts, then decode one token per step.

    generator = Generator(model, tokenizer)                       # a LlamaModel (any tensor-parallel size)
    prompts = [encode_prompt(tokenizer, "The capital of France")]  # BOS first, as the Hugging Face export does
    [completion] = generator.generate(prompts, max_new_tokens=32, sampling=SamplingParams(), stop=["\\n\\n"])
    completion.text, completion.tokens, completion.finish_reason   # "stop" | "length" | "cancelled"

    generation = generator.start(prompts, max_new_tokens=32)      # streaming: one list of deltas per step
    for deltas in generation:
        for delta in deltas: print(delta.row, delta.text, delta.finish_reason)
    generation.completions

Prompts of different lengths are left-padded into one batch: padding slots are masked out of attention and each
row's rotary positions count its real tokens only, so a prompt's completion does not depend on its batch. A row
ends at the end-of-document token (kept in `tokens`, not in `text`), at a stop string (the text is cut before it)
or after max_new_tokens. Streamed text holds back what may still become a stop string or an incomplete character.
The loop queues decode step t + 1 on the device before it reads step t's tokens (_HostCopy), so the host's
detokenizing and streaming overlap the device's work.

Tensor parallelism: every rank of the tensor group runs the same generation; the logits are gathered over the
vocabulary, so every rank draws the same token from the same seeded generator. On CUDA the decode step can be
replayed as a CUDA graph (`use_cuda_graph`, cuda_graph.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from megatron_llama.inference.cuda_graph import CudaGraphDecoder
from megatron_llama.inference.kv_cache import KVCache
from megatron_llama.inference.sampling import SamplingParams, sample
from megatron_llama.parallel.mappings import gather_from_tensor_parallel_region

REPLACEMENT_CHARACTER = "\ufffd"  # what a detokenizer shows for the first bytes of an unfinished character


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a plain-text prompt as the exported Hugging Face tokenizer gives them: BOS (when the tokenizer
    has one) followed by the text's tokens."""
    return ([tokenizer.bos] if tokenizer.bos is not None else []) + list(tokenizer.tokenize(text))


@dataclass
class Completion:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    """Generated ids; the end-of-document id included when it ended the completion."""
    text: str = ""
    finish_reason: str | None = None
    """"stop" (end of document or a stop string), "length" (max_new_tokens), "cancelled" (keep_going said no)."""


@dataclass(frozen=True)
class Delta:
    """New text of one row in one step; finish_reason is set on the row's last delta."""

    row: int
    text: str
    finish_reason: str | None = None


class _Row:
    """One prompt's completion as it grows: tokens, text (stop strings cut off) and how much was streamed."""

    def __init__(self, index: int, prompt: list[int], tokenizer, stop: list[str]):
        self.index, self.tokenizer, self.stop = index, tokenizer, stop
        self.completion = Completion(prompt_tokens=len(prompt))
        # Decoding the last prompt token along keeps the completion's leading space, which detokenizers drop.
        self.anchor = prompt[-1:]
        self.anchor_text = tokenizer.detokenize(self.anchor)
        self.streamed = 0

    @property
    def finished(self) -> bool:
        return self.completion.finish_reason is not None

    def add(self, token: int) -> Delta | None:
        completion = self.completion
        completion.tokens.append(token)
        if token == self.tokenizer.eod:
            completion.finish_reason = "stop"
        else:
            text = self.tokenizer.detokenize(self.anchor + completion.tokens)[len(self.anchor_text):]
            cuts = [text.find(stop) for stop in self.stop if stop in text]
            if cuts:
                text, completion.finish_reason = text[:min(cuts)], "stop"
            completion.text = text
        return self._delta()

    def finish(self, reason: str) -> Delta | None:
        self.completion.finish_reason = reason
        return self._delta()

    def _delta(self) -> Delta | None:
        text = self.completion.text
        end = len(text) if self.finished else len(text) - self._held_back(text)
        if end <= self.streamed and not self.finished:
            return None
        delta = Delta(self.index, text[self.streamed:max(end, self.streamed)], self.completion.finish_reason)
        self.streamed = max(end, self.streamed)
        return delta

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` not to stream yet: an unfinished character, and before it the longest
        end of the text that begins a stop string. Judged on the text, so it holds however the tokenizer splits a
        stop string's characters (bytes of one character arrive as U+FFFD until the character is complete)."""
        settled = text.rstrip(REPLACEMENT_CHARACTER)
        stop_start = max((size for stop in self.stop for size in range(1, len(stop))
                          if settled.endswith(stop[:size])), default=0)
        return len(text) - len(settled) + stop_start


class Generation:
    """One batch being generated: iterate for the deltas of each step; `completions` holds the results."""

    def __init__(self, generator: Generator, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams,
                 stop: list[str], keep_going: Callable[[], bool] | None):
        self.generator, self.prompts, self.max_new_tokens = generator, prompts, max_new_tokens
        self.sampling, self.keep_going = sampling, keep_going
        self.rows = [_Row(index, prompt, generator.tokenizer, stop) for index, prompt in enumerate(prompts)]

    @property
    def completions(self) -> list[Completion]:
        return [row.completion for row in self.rows]

    @torch.inference_mode()  # around each resumption of this generator, not around the consumer's code
    def __iter__(self) -> Iterator[list[Delta]]:
        generator, device = self.generator, self.generator.device
        batch, prompt_length = len(self.prompts), max(len(prompt) for prompt in self.prompts)
        ids = torch.full((batch, prompt_length), generator.pad_id, dtype=torch.long)
        real = torch.zeros(batch, prompt_length, dtype=torch.bool)
        for row, prompt in enumerate(self.prompts):  # left padding: every prompt ends in the last column
            ids[row, prompt_length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            real[row, prompt_length - len(prompt):] = True
        ids, real = ids.to(device), real.to(device)
        position_ids = (real.long().cumsum(dim=1) - 1).clamp(min=0)  # [b, L]: real tokens before each slot
        cache, decode = generator.cache_and_decoder(batch, prompt_length + self.max_new_tokens)
        random = self.sampling.generator(device)

        cache.begin_step(real)
        logits = generator.model.forward_with_cache(ids, position_ids, cache, last_position_only=True)
        tokens = sample(generator.vocabulary_logits(logits), self.sampling, random)  # [b]
        next_position = real.sum(dim=1, keepdim=True)  # [b, 1]
        for step in range(self.max_new_tokens):
            on_host = _HostCopy(tokens)
            if step < self.max_new_tokens - 1:
                # The next step is queued before this one's tokens are read, so the device decodes while the host
                # turns tokens into text (a row that has just finished makes that step wasted work, nothing else).
                cache.begin_decode_step()
                logits = decode(tokens[:, None], next_position)  # [b, 1] -> [b, 1, padded_vocab / tp]
                next_position = next_position + 1
                tokens = sample(generator.vocabulary_logits(logits), self.sampling, random)
            deltas = [self._add(row, token) for row, token in enumerate(on_host.values())]
            if all(row.finished for row in self.rows):
                yield [delta for delta in deltas if delta is not None]
                return
            if step == self.max_new_tokens - 1:
                deltas = [self._finish(row, delta, "length") for row, delta in enumerate(deltas)]
            elif self.keep_going is not None and not self.keep_going():
                deltas = [self._finish(row, delta, "cancelled") for row, delta in enumerate(deltas)]
            yield [delta for delta in deltas if delta is not None]
            if all(row.finished for row in self.rows):
                return

    def _add(self, row: int, token: int) -> Delta | None:
        return None if self.rows[row].finished else self.rows[row].add(token)

    def _finish(self, row: int, delta: Delta | None, reason: str) -> Delta | None:
        if self.rows[row].finished:
            return delta
        last = self.rows[row].finish(reason)
        text = (delta.text if delta is not None else "") + last.text
        return Delta(row, text, reason)


class _HostCopy:
    """A device tensor's values copied to the host without waiting for work queued after the copy: on CUDA into
    pinned memory behind an event, so reading them waits for the copy only, not for the next decode step."""

    def __init__(self, values: torch.Tensor):
        if values.device.type != "cuda":
            self.host, self.done = values, None
            return
        self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        self.host.copy_(values, non_blocking=True)
        self.done = torch.cuda.Event()
        self.done.record()

    def values(self) -> list:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


class Generator:
    """Generation with `model` (a whole LlamaModel, eval mode) and `tokenizer` on the model's device.

    max_length: the longest prompt + completion (default: the model's max_position_embeddings).
    use_cuda_graph: replay each decode step as a CUDA graph (CUDA only); the cache then spans max_length slots
    and is kept per batch size between generations.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_length: int | None = None,
                 use_cuda_graph: bool = False):
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, model.config
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.max_length = max_length or self.config.max_position_embeddings
        if self.max_length > self.config.max_position_embeddings:
            raise ValueError(f"a maximum length of {self.max_length} tokens exceeds the model's context of "
                             f"{self.config.max_position_embeddings} (max_position_embeddings)")
        if use_cuda_graph and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device; leave them off on CPU")
        self.use_cuda_graph = use_cuda_graph
        self.pad_id = next(token for token in (tokenizer.pad, tokenizer.eod, 0) if token is not None)
        self._graphs: dict[int, tuple[KVCache, CudaGraphDecoder]] = {}

    def check_request(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """ValueError, saying what to change, unless the prompts and max_new_tokens fit the context."""
        if not prompts or any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"the maximum number of new tokens must be at least 1, got {max_new_tokens}")
        longest = max(len(prompt) for prompt in prompts)
        if longest + max_new_tokens > self.max_length:
            raise ValueError(f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the context of "
                             f"{self.max_length} tokens; shorten the prompt or ask for at most "
                             f"{max(self.max_length - longest, 0)} new tokens")
        bad = sorted({token for prompt in prompts for token in prompt if not 0 <= token < self.config.vocab_size})
        if bad:
            raise ValueError(f"token ids {bad[:5]} lie outside the vocabulary of {self.config.vocab_size}")

    def start(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
              stop: list[str] | tuple[str, ...] = (), keep_going: Callable[[], bool] | None = None) -> Generation:
        """A generation to iterate; keep_going (asked once per step, on every tensor rank) may end it early."""
        self.check_request(prompts, max_new_tokens)
        sampling.check()
        return Generation(self, prompts, max_new_tokens, sampling, [text for text in stop if text], keep_going)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                 stop: list[str] | tuple[str, ...] = ()) -> list[Completion]:
        generation = self.start(prompts, max_new_tokens, sampling, stop)
        for _ in generation:
            pass
        return generation.completions

    def warm_up(self) -> None:
        """Two small generations before serving (one row, then two rows of another prompt length), so that a
        server's first requests find most of the compilation and graph capture done: measured on a 7B on one H200,
        the first 64-token completion took 4.5 s instead of 8.3 s and the first streamed chunk 1.2 s instead of
        4.9 s. Every tensor rank calls it."""
        for prompts in ([[self.pad_id]], [[self.pad_id] * 2, [self.pad_id] * 3]):
            self.generate(prompts, max_new_tokens=2)

    def vocabulary_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """This rank's last-position logits [b, 1, padded_vocab / tp] -> the real vocabulary's [b, vocab] (fp32)."""
        full = gather_from_tensor_parallel_region(logits[:, -1], self.model.layout.tensor_group)  # [b, padded_vocab]
        return full[:, :self.config.vocab_size].float()

    def cache_and_decoder(self, batch: int, length: int):
        """A KV cache for `batch` rows of up to `length` tokens, and the decode-step function over it."""
        if not self.use_cuda_graph:
            cache = KVCache.for_model(self.config, self.model.layout, batch, length, device=self.device,
                                      dtype=self.dtype)
            return cache, lambda ids, positions: self.model.forward_with_cache(ids, positions, cache)
        if batch not in self._graphs:
            cache = KVCache.for_model(self.config, self.model.layout, batch, self.max_length, device=self.device,
                                      dtype=self.dtype)
            self._graphs[batch] = (cache, CudaGraphDecoder(self.model, cache))
        cache, decoder = self._graphs[batch]
        cache.reset()
        return cache, decoder
