"""Choosing the next token from the logits: greedy, temperature, top-k, top-p (nucleus), from a seeded generator.

    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=1234)
    params.check()                                   # ValueError naming the option to change
    generator = params.generator(device)
    next_ids = sample(logits, params, generator)     # logits [b, vocab] -> [b]

temperature 0 is greedy (argmax; ties go to the lowest id, as transformers does). Otherwise the logits are
divided by the temperature, cut to the top_k highest (0: no cut), then to the smallest set of highest-probability
tokens whose probability reaches top_p (1.0: no cut), and one token is drawn per row. The same seed and the same
logits give the same tokens, on every tensor-parallel rank alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SEED_LIMIT = 2 ** 63
"""Seeds lie in [0, SEED_LIMIT): torch.Generator.manual_seed takes 64-bit values, and a seed it refuses would
fail on every tensor rank at once."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    """0: greedy; otherwise the logits are divided by it before sampling."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0: all tokens."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose probabilities sum to top_p; 1.0: all tokens."""
    seed: int = 1234
    """Seed of the sampling generator: the same seed gives the same completions."""

    def check(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be 0 (greedy) or a finite positive number, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (no cut) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must lie in [0, 2**63), got {self.seed}")

    def generator(self, device: torch.device | str) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """The next token of every row: logits [b, vocab] -> ids [b] (int64)."""
    logits = logits.float()
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth_largest = logits.topk(params.top_k, dim=-1).values[:, -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [b, vocab]
        probabilities = sorted_logits.softmax(dim=-1)
        mass_before = probabilities.cumsum(dim=-1) - probabilities  # mass of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= params.top_p, float("-inf"))  # keeps the first
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probabilities = logits.softmax(dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)
