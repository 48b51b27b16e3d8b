"""Every random generator a rank draws from, as plain checkpoint data (its rng_dp_{dp:03d}.pt file) and back.

    state = capture_rng_state()     # python, numpy, torch CPU, this rank's CUDA device
    restore_rng_state(state)

loading.py restores them only at the same tensor/pipeline split (docs/formats.md says why).
"""
from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng_state() -> dict:
    """Every random generator this rank draws from: python, numpy, torch CPU and this rank's CUDA device."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": {"version": version, "state": list(python_state), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device only: one GPU per rank
    return state


def restore_rng_state(state: dict):
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch_cpu"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, list):  # written before checkpoints kept one device per rank
            cuda = cuda[torch.cuda.current_device()]
        torch.cuda.set_rng_state(cuda)
