"""Activation recompute (Chen et al. 2016; Korthikanti et al. 2022): keep fewer activations, redo forward in backward.

    --recompute-granularity full --recompute-method uniform --recompute-num-layers N
        the stage's blocks are cut into chunks of N consecutive blocks; each chunk keeps only its input
        and runs its forward again during backward
    --recompute-granularity full --recompute-method block --recompute-num-layers N
        the first N blocks of the stage are recomputed one by one (the rest keep their activations)
    --recompute-granularity selective
        only the core attention softmax(q k^T / sqrt(d)) v of every block is recomputed: its
        activations grow with the square of the sequence length, its FLOPs are a small share

Recompute goes through parallel/random.checkpoint, which replays the random state, so gradients
equal those without recompute bit for bit.

`apply_recompute(model, granularity, method, num_layers)` changes a built LlamaModel in place,
after tensor-parallel construction and before the data-parallel buffers and the optimizer; it adds
no parameters and renames none, so checkpoints do not depend on it. It replaces the `forward` of the
chosen blocks (and core-attention modules) by the same forward run under checkpoint. A uniform
chunk of several blocks runs whole from its first block, whose replacement forward calls the
chunk's blocks in turn; the chunk's other blocks then pass their input through, because
LlamaModel.forward calls every block in order.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from megatron_llama.parallel.random import checkpoint

GRANULARITIES = ("full", "selective")
METHODS = ("uniform", "block")


def _run_blocks(blocks: tuple[nn.Module, ...], hidden: torch.Tensor, *args) -> torch.Tensor:
    for block in blocks:
        hidden = type(block).forward(block, hidden, *args)
    return hidden


def _recomputed_blocks_forward(blocks: tuple[nn.Module, ...], hidden: torch.Tensor, *args) -> torch.Tensor:
    return checkpoint(_run_blocks, blocks, hidden, *args)


def _pass_through(hidden: torch.Tensor, *args) -> torch.Tensor:
    return hidden  # this block ran inside the recomputed forward of its chunk's first block


def _recomputed_module_forward(module: nn.Module, *args) -> torch.Tensor:
    return checkpoint(type(module).forward, module, *args)


def _recompute_chunk(blocks: list[nn.Module]):
    blocks[0].forward = functools.partial(_recomputed_blocks_forward, tuple(blocks))
    for block in blocks[1:]:
        block.forward = _pass_through


def apply_recompute(model: nn.Module, granularity: str | None, method: str | None = None,
                    num_layers: int | None = None) -> None:
    """Make `model` (a LlamaModel or pipeline stage of one) recompute activations as the flags say; None: nothing."""
    if granularity is None:
        return
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown --recompute-granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    if getattr(model, "_recompute", None) is not None:
        raise RuntimeError(f"recompute is already applied to this model ({model._recompute}); apply it once")
    blocks = list(model.layers.values())
    if granularity == "selective":
        if method is not None or num_layers is not None:
            raise ValueError("--recompute-method and --recompute-num-layers apply to --recompute-granularity full "
                             "only; drop them for selective")
        cores = [block.attention.core_attention for block in blocks if hasattr(block.attention, "core_attention")]
        if len(cores) != len(blocks):
            raise NotImplementedError("selective recompute needs each block's attention to call its core through a "
                                      "`core_attention` submodule (model/llama.py SelfAttention)")
        for core in cores:
            core.forward = functools.partial(_recomputed_module_forward, core)
    else:
        if method not in METHODS:
            raise ValueError(f"--recompute-granularity full needs --recompute-method {' or '.join(METHODS)}, "
                             f"got {method!r}")
        if num_layers is None or num_layers < 1:
            raise ValueError(f"--recompute-granularity full needs --recompute-num-layers >= 1, got {num_layers}")
        if method == "uniform":
            for first in range(0, len(blocks), num_layers):
                _recompute_chunk(blocks[first:first + num_layers])
        else:  # block: the first num_layers blocks of this stage (all of them when it holds fewer)
            for block in blocks[:num_layers]:
                _recompute_chunk([block])
    model._recompute = (granularity, method, num_layers)
