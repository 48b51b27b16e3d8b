"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding.

The model is written only against these classes (Shoeybi et al. 2019, "Megatron-LM",
section 3). Each takes the `ParallelLayout` (parallel/state.py) it is built for, `layout=`
(default: the installed one, state.current_layout()), and keeps it: its tensor size and rank
shape the weight, its tensor group and sequence-parallel switch serve every forward. So the
model's constructor calls are the same at every layout; at tensor-parallel size 1 each is a
plain linear or embedding layer.

    layer                   weight split         input                    output
    ColumnParallelLinear    rows (out / tp)      copied (f), or all-      local columns [.., out / tp]
                                                 gathered along s (SP)
    RowParallelLinear       columns (in / tp)    local [.., in / tp]      all-reduced (g), or
                                                                          reduce-scattered along s (SP)
    VocabParallelEmbedding  rows (vocab / tp)    token ids [b, s]         all-reduced, or reduce-
                                                                          scattered along s (SP)

With sequence parallelism (SP, Korthikanti et al. 2022) the activations between layers are
sequence shards [b, s / tp, h]: norms and residual adds run on 1/tp of the tokens. A
parameter that is not split across tensor ranks (norm weights, row-parallel biases) then
sees only its rank's tokens, so its gradient is a partial sum:
`allreduce_sequence_parallel_grads(model, layout)` completes it after backward.

Gradient-accumulation fusion (Megatron's --gradient-accumulation-fusion; `set_gradient_accumulation_fusion`):
a linear layer whose weight has an fp32 `main_grad` adds its weight gradient straight into it (one GEMM
accumulating in fp32, torch.addmm with out_dtype on CUDA) instead of writing a model-dtype `.grad` that the
post-accumulate-grad hook then adds. It still hands autograd an uninitialised placeholder gradient so the hook
(`accumulate_grad_into_main_grad`, called by the main-grad owners) fires and marks the parameter ready; the
flag `grad_added_to_main_grad` tells the hook the sum is already done. A weight used twice in one graph (a tied
embedding) is never fused: the placeholder would be summed with a real gradient.

FP8 GEMMs (--fp8-format; `set_fp8_recipe`): a Column/RowParallelLinear whose `fp8_recipe` is set multiplies
through parallel/fp8.fp8_linear instead of F.linear, keeping gradient-accumulation fusion. Column-parallel with
sequence parallelism hands fp8_linear the tensor group, which casts the sequence shard once (its tensorwise amax
agreed over the group) and all-gathers the fp8 bytes; without it the f operator comes first, as in bf16.
Row-parallel casts its local input, then reduces (or reduce-scatters) in the model's dtype as before. Each rank
scales its own weight shard. Biases are added in the model's dtype after the GEMM.

Layout-independent initialisation (`initialize_parameters`): a weight with `init_std` is
drawn in blocks of INIT_BLOCK_ROWS rows of its full (unpartitioned) shape, each block from
a generator seeded by (seed, parameter name, block index); the rank keeps its slice along
`tensor_parallel_dim`. So initial values depend only on the seed and the parameter's place
in the full model, never on tp, pp or dp, and the rows below the real vocabulary are the
same whatever the vocabulary padding (which grows with tp). Parameters without `init_std`
keep their constructor values (norm weights ones, biases zeros).
"""
from __future__ import annotations

import zlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_llama.parallel import comm, state
from megatron_llama.parallel.fp8 import Fp8Recipe, fp8_linear
from megatron_llama.parallel.mappings import (copy_to_tensor_parallel_region, gather_from_sequence_parallel_region,
                                              reduce_from_tensor_parallel_region,
                                              reduce_scatter_to_sequence_parallel_region)
from megatron_llama.parallel.state import ParallelLayout

INIT_BLOCK_ROWS = 128


def _mark(param: nn.Parameter, tensor_parallel_dim: int | None, full_shape: tuple[int, ...], init_std: float | None):
    param.tensor_parallel_dim = tensor_parallel_dim  # None: replicated on every tensor rank
    param.full_shape = full_shape
    param.init_std = init_std
    return param


def _local_size(full_size: int, what: str, layout: ParallelLayout) -> int:
    tp = layout.tensor_size
    if full_size % tp:
        raise ValueError(f"{what} {full_size} is not divisible by the tensor-parallel size {tp} "
                         f"(--tensor-model-parallel-size); choose sizes that are multiples of {tp}")
    return full_size // tp


def enter_column_parallel_region(x: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """The input of a column-parallel matmul: all-gathered along s (sequence parallelism; backward reduce-scatters)
    or copied (the f operator; backward all-reduces). [b, s / tp, in] or [b, s, in] -> [b, s, in]"""
    if layout.sequence_parallel:
        return gather_from_sequence_parallel_region(x, layout.tensor_group)
    return copy_to_tensor_parallel_region(x, layout.tensor_group)


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, layout: ParallelLayout,
                           bias: torch.Tensor | None = None, *, gradient_accumulation_fusion: bool = False,
                           fp8_recipe: Fp8Recipe | None = None) -> torch.Tensor:
    """x A^T + b for a weight A whose rows are split across the tensor ranks of `layout`.

    x: [b, s, in] (or the sequence shard [b, s / tp, in] with sequence parallelism) -> [b, s, out / tp].
    A tied output head calls this with the embedding's weight.
    gradient_accumulation_fusion (no bias, or fp8): dL/dA goes straight into A.main_grad (module docstring).
    fp8_recipe: the GEMMs in fp8 (module docstring).
    """
    if fp8_recipe is not None:
        if layout.sequence_parallel:  # fp8_linear casts the shard and gathers the fp8 bytes itself
            y = fp8_linear(x, weight, fp8_recipe, main_grad_fusion=gradient_accumulation_fusion,
                           sequence_parallel_group=layout.tensor_group)  # [b, s / tp, in] -> [b, s, out / tp]
        else:
            y = fp8_linear(copy_to_tensor_parallel_region(x, layout.tensor_group), weight, fp8_recipe,
                           main_grad_fusion=gradient_accumulation_fusion)  # [b, s, out / tp]
        return y + bias if bias is not None else y
    x = enter_column_parallel_region(x, layout)  # [b, s, in]
    if gradient_accumulation_fusion and bias is None:
        return linear_into_main_grad(x, weight)  # [b, s, out / tp]
    return F.linear(x, weight, bias)  # [b, s, out / tp]


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A's output rows split across tensor ranks. [.., in] -> [.., out/tp]."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, init_std: float = 0.02,
                 layout: ParallelLayout | None = None):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.layout = layout if layout is not None else state.current_layout()
        self.gradient_accumulation_fusion = False
        self.fp8_recipe: Fp8Recipe | None = None  # set_fp8_recipe
        local_out = _local_size(output_size, "ColumnParallelLinear output size", self.layout)
        self.weight = _mark(nn.Parameter(torch.empty(local_out, input_size)), 0, (output_size, input_size), init_std)
        self.bias = _mark(nn.Parameter(torch.zeros(local_out)), 0, (output_size,), None) if bias else None

    def forward(self, x: torch.Tensor, weight_consumer: Callable | None = None) -> torch.Tensor:
        """x A^T + b; or, with `weight_consumer`, weight_consumer(x in the tensor-parallel region, A) in its place:
        a caller that needs the weight itself (the fused output head + cross entropy) still calls this module, so
        its forward pre-hooks run (the data-parallel buffers' wait for an overlapped all-gather of A)."""
        if weight_consumer is not None:
            return weight_consumer(enter_column_parallel_region(x, self.layout), self.weight)
        return column_parallel_linear(x, self.weight, self.layout, self.bias,
                                      gradient_accumulation_fusion=self.gradient_accumulation_fusion,
                                      fp8_recipe=self.fp8_recipe)


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A's input columns split across tensor ranks. [.., in/tp] -> [.., out]
    ([b, s / tp, out] with sequence parallelism)."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, init_std: float = 0.02,
                 layout: ParallelLayout | None = None):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.layout = layout if layout is not None else state.current_layout()
        self.gradient_accumulation_fusion = False
        self.fp8_recipe: Fp8Recipe | None = None  # set_fp8_recipe
        local_in = _local_size(input_size, "RowParallelLinear input size", self.layout)
        self.weight = _mark(nn.Parameter(torch.empty(output_size, local_in)), 1, (output_size, input_size), init_std)
        # The bias is added after the reduction, so it is replicated (a sequence-parallel partial-gradient parameter).
        self.bias = _mark(nn.Parameter(torch.zeros(output_size)), None, (output_size,), None) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [b, s, in / tp] -> [b, s, out], a partial sum over tensor ranks
        if self.fp8_recipe is not None:
            partial = fp8_linear(x, self.weight, self.fp8_recipe, main_grad_fusion=self.gradient_accumulation_fusion)
        elif self.gradient_accumulation_fusion:
            partial = linear_into_main_grad(x, self.weight)
        else:
            partial = F.linear(x, self.weight)
        group = self.layout.tensor_group
        if self.layout.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(partial, group)  # [b, s, out] -> [b, s / tp, out]
        else:
            y = reduce_from_tensor_parallel_region(partial, group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary rows split across tensor ranks. [b, s] -> [b, s, h]
    ([b, s / tp, h] with sequence parallelism).

    Each rank looks up the ids inside its row range [vocab_start, vocab_end) and writes zeros for
    the others; the sum over tensor ranks is then the full lookup.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init_std: float = 0.02,
                 layout: ParallelLayout | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.layout = layout if layout is not None else state.current_layout()
        local_rows = _local_size(num_embeddings, "VocabParallelEmbedding vocabulary (padded) size", self.layout)
        self.vocab_start = self.layout.tensor_rank * local_rows
        self.vocab_end = self.vocab_start + local_rows
        self.weight = _mark(nn.Parameter(torch.empty(local_rows, embedding_dim)), 0,
                            (num_embeddings, embedding_dim), init_std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.layout.tensor_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)  # [b, s]
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # [b, s, h]
        if self.layout.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial, self.layout.tensor_group)  # -> [b, s / tp, h]
        return reduce_from_tensor_parallel_region(partial, self.layout.tensor_group)


class _LinearIntoMainGrad(torch.autograd.Function):
    """y = x W^T whose backward adds dL/dW into W.main_grad (fp32) itself (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_2d, x_2d = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])  # [tokens, out], [tokens, in]
        main_grad = weight.main_grad  # [out, in] += grad^T x
        if main_grad.dtype == grad.dtype:
            main_grad.addmm_(grad_2d.t(), x_2d)
        else:
            torch.addmm(main_grad, grad_2d.t(), x_2d, out_dtype=main_grad.dtype, out=main_grad)
        weight.grad_added_to_main_grad = True
        return grad_x, torch.empty_like(weight)  # placeholder: only the main-grad hook sees it, and ignores it


def linear_into_main_grad(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T with gradient-accumulation fusion where W has a main_grad (else plain F.linear). [.., in] -> [.., out]"""
    if getattr(weight, "main_grad", None) is None or not torch.is_grad_enabled():
        return F.linear(x, weight)
    return _LinearIntoMainGrad.apply(x, weight)


def accumulate_grad_into_main_grad(param: nn.Parameter) -> None:
    """The post-accumulate-grad hook's work: main_grad += grad (unless a fused linear backward added it already);
    frees param.grad."""
    if not getattr(param, "grad_added_to_main_grad", False):
        param.main_grad.add_(param.grad)
    param.grad_added_to_main_grad = False
    param.grad = None


def set_gradient_accumulation_fusion(model: nn.Module, enabled: bool) -> None:
    """Turn gradient-accumulation fusion on or off for every Column/RowParallelLinear of `model` (off when built)."""
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            module.gradient_accumulation_fusion = enabled


def set_fp8_recipe(model: nn.Module, recipe: Fp8Recipe | None) -> None:
    """Run every Column/RowParallelLinear of `model` with FP8 GEMMs of `recipe` (None: the model's dtype, as when
    built). The caller picks the part of the model: the trainer passes the blocks, never the output head."""
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            module.fp8_recipe = recipe


def is_tensor_parallel_replicated(param: nn.Parameter) -> bool:
    """True for a parameter every tensor rank holds whole (norm weights, row-parallel biases)."""
    return getattr(param, "tensor_parallel_dim", None) is None


def allreduce_sequence_parallel_grads(model: nn.Module, layout: ParallelLayout) -> None:
    """Sum over the tensor ranks of `layout` the gradients of replicated parameters (call after backward, before
    the optimizer and before data-parallel reduction). Under sequence parallelism each such parameter saw
    only this rank's sequence shard. Acts on `main_grad` where a parameter has one, else on `.grad`;
    no-op without sequence parallelism."""
    if not layout.sequence_parallel:
        return
    grads_by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in model.parameters():
        if not param.requires_grad or not is_tensor_parallel_replicated(param):
            continue
        grad = getattr(param, "main_grad", None)
        grad = param.grad if grad is None else grad
        if grad is not None:
            grads_by_dtype.setdefault(grad.dtype, []).append(grad)
    for grads in grads_by_dtype.values():  # one collective per dtype instead of one per parameter
        flat = comm.all_reduce(torch.cat([grad.reshape(-1) for grad in grads]), layout.tensor_group)
        for grad, reduced in zip(grads, flat.split([grad.numel() for grad in grads])):
            grad.copy_(reduced.view_as(grad))


def parameter_seed(seed: int, name: str, block: int = 0) -> int:
    """A seed that depends only on the run's seed, the parameter's name in the full model and the row block."""
    return (seed * 1_000_003 + zlib.crc32(name.encode()) + block * 7_919) % (2**63)


def _draw_rows(name: str, seed: int, std: float, full_shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the full parameter, drawn block by block. -> [stop - start, *full_shape[1:]]."""
    blocks = []
    for block in range(start // INIT_BLOCK_ROWS, -(-stop // INIT_BLOCK_ROWS)):
        generator = torch.Generator(device="cpu").manual_seed(parameter_seed(seed, name, block))
        blocks.append(torch.empty((INIT_BLOCK_ROWS,) + tuple(full_shape[1:])).normal_(0.0, std, generator=generator))
    first = start // INIT_BLOCK_ROWS * INIT_BLOCK_ROWS
    return torch.cat(blocks)[start - first:stop - first]


@torch.no_grad()
def initialize_parameters(module: nn.Module, seed: int, layout: ParallelLayout) -> None:
    """Give every parameter with `init_std` its layout-independent values (module docstring): this tensor rank's
    slice, at the tensor size of `layout` (the one the module was built for)."""
    rank, size = layout.tensor_rank, layout.tensor_size
    for name, param in module.named_parameters():
        std = getattr(param, "init_std", None)
        if std is None:
            continue
        full_shape, dim = tuple(param.full_shape), param.tensor_parallel_dim
        split = dim is not None and size > 1
        if split and full_shape[dim] % size:
            raise ValueError(f"parameter {name} of shape {list(full_shape)} cannot be split {size} ways along "
                             f"dimension {dim}; its size there must be a multiple of the tensor-parallel size")
        if split and dim == 0:  # draw only this rank's rows
            rows = full_shape[0] // size
            values = _draw_rows(name, seed, std, full_shape, rank * rows, (rank + 1) * rows)
        else:
            values = _draw_rows(name, seed, std, full_shape, 0, full_shape[0])
            if split:
                values = values.chunk(size, dim=dim)[rank]
        if values.shape != param.shape:
            raise ValueError(f"parameter {name} has local shape {list(param.shape)} but its slice {rank} of {size} "
                             f"of full shape {list(full_shape)} is {list(values.shape)}; pass the layout the "
                             f"module was built for")
        param.copy_(values)
