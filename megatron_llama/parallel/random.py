"""Random-number state for tensor parallelism, and activation recompute that replays it.

Two kinds of randomness meet in a tensor-parallel model:
- randomness on replicated activations (e.g. dropout on the residual stream) must be the SAME
  on every tensor rank, so it uses the default generator, seeded equally across tensor ranks;
- randomness on split activations (e.g. dropout on local attention heads) must DIFFER across
  tensor ranks, or every shard would drop the same pattern; it runs inside
  `get_rng_tracker().fork()`, which swaps in the "model-parallel" generator state.

`set_random_seeds(seed)` seeds both (Megatron-LM's convention): the default state with
seed + 100 * pipeline rank, the model-parallel state with that + 2718 + tensor rank.
States live on the GPU's generator when CUDA is available, else on the CPU's.

`checkpoint(function, *args)` recomputes `function` during backward instead of keeping its
activations; the default generator and every tracker state are restored first, so the
recomputed forward draws the same random numbers and the gradients equal those without
recompute.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
import torch.utils.checkpoint

from megatron_llama.parallel import state

MODEL_PARALLEL_RNG = "model-parallel"


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _get_device_state() -> torch.Tensor:
    return torch.cuda.get_rng_state() if _device_type() == "cuda" else torch.get_rng_state()


def _set_device_state(rng_state: torch.Tensor) -> None:
    if _device_type() == "cuda":
        torch.cuda.set_rng_state(rng_state)
    else:
        torch.set_rng_state(rng_state)


class RNGStatesTracker:
    """Named generator states; `fork(name)` runs a block on one of them and keeps its advance."""

    def __init__(self):
        self.states: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.states = {}

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"random state {name!r} already exists; reset the tracker before seeding it again")
        self.states[name] = torch.Generator(device=_device_type()).manual_seed(seed).get_state()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: rng_state.clone() for name, rng_state in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {name: rng_state.clone() for name, rng_state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        if name not in self.states:
            raise KeyError(f"random state {name!r} was never seeded; call set_random_seeds(seed) first")
        outside = _get_device_state()
        _set_device_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_device_state()
            _set_device_state(outside)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def set_random_seeds(seed: int) -> None:
    """Seed python, numpy and torch (equal across tensor and data ranks, different per pipeline stage)
    and the tracker's model-parallel state (different per tensor rank)."""
    default_seed = seed + 100 * state.get_pipeline_model_parallel_rank()
    random.seed(default_seed)
    np.random.seed(default_seed % 2**32)
    torch.manual_seed(default_seed)
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, default_seed + 2718 + state.get_tensor_model_parallel_rank())


def _tracker_replay_contexts():
    """(forward context, recompute context): the second restores the tracker states the first saw."""
    at_forward: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def remember():
        at_forward.update(_TRACKER.get_states())
        yield

    @contextlib.contextmanager
    def replay():
        current = _TRACKER.get_states()
        _TRACKER.set_states(at_forward)
        try:
            yield
        finally:
            _TRACKER.set_states(current)

    return remember(), replay()


def checkpoint(function, *args, **kwargs):
    """function(*args, **kwargs) with its activations recomputed in backward, random states replayed."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True,
                                             context_fn=_tracker_replay_contexts, **kwargs)
