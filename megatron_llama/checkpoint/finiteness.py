"""Finiteness of a checkpoint's state: the first floating-point tensor holding NaN/Inf, by its name.

    problem = first_non_finite(state, "weight")     # None, or "weight layers.0.mlp.up.weight holds 3 NaN/Inf values"

`state` is what one checkpoint file holds (nested dicts, lists and tuples of tensors and plain values); a name is the
path of keys to the tensor, joined by dots. Loading checks every file it reads (reading.read_checkpoint_file) and a
save checks the state it is about to write (saving.write_snapshot), so a NaN is neither resumed from nor published.
"""
from __future__ import annotations

import torch


def _tensors(value, name: str):
    """(name, tensor) of every floating-point tensor inside `value`."""
    if torch.is_tensor(value):
        if value.is_floating_point():
            yield name, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{name}.{key}" if name else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{name}.{index}" if name else str(index))


def first_non_finite(state, what: str) -> str | None:
    """None when every floating-point tensor in `state` is finite, else a phrase naming the first that is not
    (`what` says what the file holds: "weight", "optimizer state")."""
    for name, tensor in _tensors(state, ""):
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            return f"{what} {name} holds {int(finite.numel() - finite.sum())} NaN/Inf values"
    return None
