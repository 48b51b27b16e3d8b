"""Random tokens for smoke tests and benchmarks without a corpus (--mock-data): sample i depends only on (seed, i).

    dataset = MockGPTDataset(num_samples=1000, seq_length=2048, vocab_size=32000, seed=1234)
    dataset[7]["text"]      # int64 [seq_length + 1], the same for every run and rank
"""
from __future__ import annotations

import numpy as np


class MockGPTDataset:
    """`num_samples` random token sequences; sample i depends only on (seed, i)."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        self.num_samples, self.seq_length, self.vocab_size, self.seed = num_samples, seq_length, vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} is outside the mock dataset of {self.num_samples}")
        generator = np.random.default_rng([self.seed, index])
        return {"text": generator.integers(0, self.vocab_size, size=self.seq_length + 1, dtype=np.int64)}
