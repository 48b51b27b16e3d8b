"""Regional compilation: the elementwise work of every block (and of the fused cross entropy) in fused kernels.

Between the matmuls of a block sit memory-bound chains of small operations: RMSNorm in fp32, the
residual adds, rotary embeddings, SwiGLU, and in the output head the softmax statistics of the cross
entropy. Run one by one, each reads and writes the whole activation; torch.compile fuses every chain
into one kernel forward and one backward. Only these pure tensor functions are compiled, never the
matmuls, collectives or autograd functions around them, so compilation composes with tensor and
sequence parallelism (regions see local shards), pipeline chunks and activation recompute (a
recomputed forward calls the same compiled regions) without graph breaks.

    ElementwiseKernels   the regions as plain functions; EAGER_KERNELS runs them op by op
    compiled_kernels()   the same regions through torch.compile (built once per process)
    compile_blocks(model, enabled)   switches a LlamaModel (or pipeline chunk) between the two

Default (pretrain.py, --compile-blocks / --no-compile-blocks): compiled on CUDA, eager on CPU.
Compiled results equal the eager ones up to rounding (the fused kernels keep fp32 intermediates
that the eager ops round to bf16).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_llama.model.rotary import apply_rotary
from megatron_llama.parallel.fused_cross_entropy import cross_entropy_statistics, write_cross_entropy_grad


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, the statistics in fp32 (Zhang & Sennrich 2019). [.., h] -> [.., h]"""
    x_fp32 = x.float()
    normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


def add_rms_norm(residual: torch.Tensor, update: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm: (residual + update, rms_norm(residual + update)). [.., h] each."""
    hidden = residual + update
    return hidden, rms_norm(hidden, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Shazeer 2020). [.., ffn] -> [.., ffn]"""
    return F.silu(gate) * up


def rotate_queries_and_keys(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            q_heads_per_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embeddings on the queries and keys of a grouped qkv tensor.

    qkv [b, s, groups, q/g + 2, d] -> q [b, s, groups * q/g, d], k [b, s, groups, d], both contiguous.
    """
    b, s, _, _, d = qkv.shape
    q, k = qkv[:, :, :, :q_heads_per_group], qkv[:, :, :, q_heads_per_group]
    return apply_rotary(q, cos, sin).reshape(b, s, -1, d), apply_rotary(k, cos, sin)


@dataclass(frozen=True)
class ElementwiseKernels:
    """The fused regions a block and the output head call; every field has the signature of its eager function
    (the cross-entropy two are parallel/fused_cross_entropy.py's)."""

    rms_norm: Callable
    add_rms_norm: Callable
    swiglu: Callable
    rotate_queries_and_keys: Callable
    cross_entropy_statistics: Callable
    write_cross_entropy_grad: Callable


EAGER_KERNELS = ElementwiseKernels(rms_norm, add_rms_norm, swiglu, rotate_queries_and_keys,
                                   cross_entropy_statistics, write_cross_entropy_grad)


@functools.cache
def compiled_kernels() -> ElementwiseKernels:
    """EAGER_KERNELS, each through torch.compile (compiled lazily at its first call, shared by every block)."""
    return ElementwiseKernels(**{field.name: torch.compile(getattr(EAGER_KERNELS, field.name))
                                 for field in fields(ElementwiseKernels)})


def compile_blocks(model: nn.Module, enabled: bool = True) -> None:
    """Make `model` (a LlamaModel or a pipeline chunk of one) run its elementwise regions compiled (or eager again).

    Apply after tensor-parallel construction and recompute, in any order with the data-parallel buffers: it adds
    no parameters and changes no names, so checkpoints do not depend on it.
    """
    model.kernels = compiled_kernels() if enabled else EAGER_KERNELS


def default_on_cuda(requested: bool | None, device: torch.device) -> bool:
    """A --X / --no-X switch of the fusions (--compile-blocks, --gradient-accumulation-fusion) as given, else on
    for CUDA and off elsewhere."""
    return requested if requested is not None else torch.device(device).type == "cuda"
