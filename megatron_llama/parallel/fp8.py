"""FP8 GEMMs for the blocks' linear layers: current scaling, the autograd function, and the checks.

What it owns: y = x W^T computed with both operands cast to 8-bit floats (Micikevicius et al. 2022, "FP8 Formats
for Deep Learning"), its backward (dgrad dx = dy W, wgrad dW = dy^T x), and the refusal of settings FP8 GEMMs
cannot run. The layers decide where it is used (the blocks' Column/RowParallelLinear); the output head, embedding,
norms and attention stay in bf16.

    recipe = Fp8Recipe(format="hybrid", scaling="tensorwise")        # --fp8-format, --fp8-recipe
    check_fp8_supported(device, {"hidden size": 4096, ...}, params_dtype=torch.bfloat16)
    y = fp8_linear(x, weight, recipe, main_grad_fusion=True,          # [b, s, in] -> [b, s, out]
                   sequence_parallel_group=tp_group)                  # x a sequence shard [b, s / tp, in]

Formats: "e4m3" casts every operand to float8_e4m3fn (3 mantissa bits, max 448); "hybrid" casts the forward
operands (x, W) to e4m3fn and the gradient dy to float8_e5m2 (2 mantissa bits, max 57344): gradients need range
more than precision.

Scaling is "current" (dynamic): each operand's scale comes from its own amax at the moment it is cast,
scale = 2^floor(log2(fp8_max / amax)), and the GEMM multiplies its fp32 accumulator by the inverse scales.
There is no amax history, so there is no scaling state: nothing to checkpoint, a bf16 checkpoint resumes in fp8
and back, and activation recompute re-derives identical scales from identical inputs. Scales are powers of two,
so multiplying by them is exact: the fp8 cast is the only rounding, and a dequantized operand is exactly
representable in bf16.

    recipe       operand scales                                   GEMMs in fp8
    tensorwise   one fp32 scale per tensor                         forward, dgrad, wgrad (each cast writes the
                                                                   transposed copy, x^T, W^T, dy^T, in one pass)
    rowwise      one scale per row along the reduction dim:        forward (x per token, W per output row),
                 torch._scaled_mm's rowwise mode, scale_a [m, 1],  dgrad (dy per token, W per input column);
                 scale_b [1, n]                                    wgrad in bf16: dy^T times x dequantized
                                                                   from its fp8 bytes (exact, see above)

Rowwise wgrad stays bf16 because a wgrad scaled per row would scale x and dy along the tokens, a second cast of
each along the other axis (and, with sequence parallelism, an amax all-reduce per column); torchao's rowwise
recipe with a high-precision weight gradient makes the same choice.

Sequence parallelism: the column-parallel input is all-gathered along s. We cast once, on the local shard, and
gather the fp8 bytes: half the bytes of a bf16 gather, and 1/tp of the cast work. A tensorwise scale must then be
agreed over the tensor-parallel group, so the shard's amax is all-reduced with MAX before the cast (and each rank
casts exactly as one process casting the whole input would). Rowwise scales belong to a token row, which lives
whole on one rank: no all-reduce is needed, and the row scales travel with the bytes. Weights are tensor-parallel
shards, each scaled on its own rank (a shard's own amax gives it the finest scale).

Main grads: with main_grad_fusion and a weight that has an fp32 `main_grad`, the weight gradient is added into it
and autograd gets a placeholder, with `weight.grad_added_to_main_grad = True` (the contract of
layers.linear_into_main_grad). Tensorwise wgrad comes out of the fp8 GEMM in fp32 and is added; rowwise wgrad is
one bf16 GEMM accumulating into main_grad.

Where it runs: torch._scaled_mm on CUDA GPUs of compute capability 8.9 or newer (every GEMM dimension a multiple
of 16); everywhere else, and with Fp8Recipe(emulate=True), an emulation that casts to the same fp8 dtype with the
same scales and multiplies the fp8 values in fp32 before applying the inverse scales, as the GPU does. On CUDA the
scale + cast (+ transpose) of an operand is one torch.compile'd function after one amax reduction. No torchao.
Measurements and how the layers call it: docs/fp8.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from megatron_llama.parallel import comm
from megatron_llama.parallel.mappings import SEQUENCE_DIM

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("tensorwise", "rowwise")
FP8_DIM_MULTIPLE = 16  # torch._scaled_mm takes matrices whose dimensions are multiples of 16
FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper have FP8 tensor cores
AMAX_FLOOR = 1e-12  # an all-zero operand gets a finite scale


@dataclass(frozen=True)
class Fp8Recipe:
    """Which fp8 dtypes and which scaling the blocks' GEMMs use (module docstring)."""

    format: str = "hybrid"
    """--fp8-format: "e4m3" (every operand float8_e4m3fn) or "hybrid" (x, W e4m3fn; gradients float8_e5m2)."""
    scaling: str = "tensorwise"
    """--fp8-recipe: "tensorwise" (one scale per tensor) or "rowwise" (one scale per row of each GEMM operand)."""
    emulate: bool | None = None
    """True: emulate the fp8 GEMMs in fp32 even on an FP8 GPU (a reference); None: emulate only where there are no
    FP8 GEMMs (the CPU)."""

    def __post_init__(self):
        if self.format not in FP8_FORMATS:
            raise ValueError(f"--fp8-format {self.format!r} is not one of {', '.join(FP8_FORMATS)}")
        if self.scaling not in FP8_RECIPES:
            raise ValueError(f"--fp8-recipe {self.scaling!r} is not one of {', '.join(FP8_RECIPES)}")

    @property
    def rowwise(self) -> bool:
        return self.scaling == "rowwise"

    @property
    def forward_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn

    @property
    def gradient_dtype(self) -> torch.dtype:
        return torch.float8_e5m2 if self.format == "hybrid" else torch.float8_e4m3fn

    def emulates_on(self, device: torch.device) -> bool:
        return self.emulate if self.emulate is not None else not has_fp8_gemm(device)


def has_fp8_gemm(device: torch.device) -> bool:
    """True where torch._scaled_mm runs: a CUDA GPU of compute capability 8.9 or newer."""
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY)


def check_fp8_supported(device: torch.device | str, gemm_dims: Mapping[str, int], *,
                        params_dtype: torch.dtype | None = None) -> None:
    """Raise ValueError, naming --fp8-format, when the blocks' GEMMs cannot run in fp8 on `device`.

    gemm_dims: each GEMM dimension of this rank by what it is, e.g. {"hidden size": 4096, "ffn hidden size / tp":
    5504, "tokens per micro-batch (micro-batch x seq length / cp)": 8192}; each must be a multiple of 16. The CPU
    is accepted: it runs the emulation (the dimension rule still applies, so CI catches what a GPU would refuse).
    """
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        raise ValueError(f"--fp8-format needs torch._scaled_mm and the float8 dtypes (torch 2.4 or newer); this is "
                         f"torch {torch.__version__}")
    if params_dtype == torch.float16:
        raise ValueError("--fp8-format cannot be combined with --fp16: the fp8 GEMMs take and return bf16 "
                         "(use --bf16 with --fp8-format, or drop --fp8-format)")
    device = torch.device(device)
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            raise ValueError(f"--fp8-format needs a GPU with FP8 tensor cores (compute capability "
                             f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer: Ada, Hopper, Blackwell); "
                             f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}; "
                             f"drop --fp8-format on this GPU")
    elif device.type != "cpu":
        raise ValueError(f"--fp8-format runs on CUDA GPUs (compute capability 8.9 or newer) or emulated on the CPU, "
                         f"not on {device.type}")
    misfits = [f"{name} = {size}" for name, size in gemm_dims.items() if size % FP8_DIM_MULTIPLE]
    if misfits:
        raise ValueError(f"--fp8-format: FP8 GEMMs need every matrix dimension to be a multiple of "
                         f"{FP8_DIM_MULTIPLE}, but {', '.join(misfits)}; choose multiples of {FP8_DIM_MULTIPLE} "
                         f"or drop --fp8-format")


@dataclass
class Fp8Operand:
    """A GEMM operand in fp8: `data` [rows, k] row-major, dequantized = data * inverse_scale, where
    inverse_scale is fp32 [] (tensorwise) or [rows, 1] (rowwise)."""

    data: torch.Tensor
    inverse_scale: torch.Tensor

    def transposed(self) -> Fp8Operand:
        """The same values as [k, rows] row-major: a copy of the bytes under the same (tensorwise) scale."""
        if self.inverse_scale.dim():
            raise ValueError("a rowwise-scaled operand cannot be transposed: its scales run along the other axis")
        return Fp8Operand(self.data.t().contiguous(), self.inverse_scale)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.data.float() * self.inverse_scale).to(dtype)


def operand_amax(x: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """max |x| over the tensor ([]) or over each row ([rows, 1]), in x's dtype (exact): one reduction kernel."""
    if rowwise:
        return torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True)
    return torch.linalg.vector_norm(x, float("inf"))


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest power of two s with amax * s <= max of `dtype` (fp32, amax's shape)."""
    largest = torch.finfo(dtype).max
    return torch.exp2(torch.floor(torch.log2(largest / amax.float().clamp(min=AMAX_FLOOR))))


def _scale_and_cast(x: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype, with_transpose: bool):
    """x [rows, k] (any strides) -> (fp8 [rows, k] row-major, fp8 [k, rows] row-major or None, fp32 inverse
    scale). Saturates at the dtype's max. with_transpose (tensorwise only) writes the transposed copy in the same
    pass, so the backward's transposed operands cost no second read."""
    largest = torch.finfo(dtype).max
    scale = scale_from_amax(amax, dtype)
    scaled = (x.float() * scale).clamp(-largest, largest).to(dtype)
    transposed = scaled.t().contiguous() if with_transpose else None
    return scaled.contiguous(), transposed, scale.reciprocal()


_compiled_scale_and_cast = None


def _cast(x: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype, with_transpose: bool):
    """_scale_and_cast as one fused kernel on CUDA (torch.compile'd once, shapes dynamic), eager elsewhere.
    The compiled graph is keyed on dtype, scale shape and input strides: a handful of variants per recipe."""
    global _compiled_scale_and_cast
    if not x.is_cuda:
        return _scale_and_cast(x, amax, dtype, with_transpose)
    if _compiled_scale_and_cast is None:
        _compiled_scale_and_cast = torch.compile(_scale_and_cast, dynamic=True)
    return _compiled_scale_and_cast(x.detach(), amax.detach(), dtype, with_transpose)  # no requires_grad guard


def _operand_amax(x: torch.Tensor, rowwise: bool, amax: torch.Tensor | None, amax_group) -> torch.Tensor:
    if amax is None:
        amax = operand_amax(x, rowwise)
        if amax_group is not None and not rowwise:
            amax = comm.all_reduce(amax, amax_group, op=torch.distributed.ReduceOp.MAX)
    return amax


def quantize(x: torch.Tensor, dtype: torch.dtype, *, rowwise: bool, amax: torch.Tensor | None = None,
             amax_group=None) -> Fp8Operand:
    """x [rows, k] (a transposed view is fine: the result is row-major) -> Fp8Operand with current scaling.

    amax: use this amax instead of x's own; amax_group: all-reduce the tensorwise amax with MAX over this
    process group first, so every member casts with the scale of the whole (gathered) tensor.
    """
    data, _, inverse_scale = _cast(x, _operand_amax(x, rowwise, amax, amax_group), dtype, False)
    return Fp8Operand(data, inverse_scale)


def quantize_with_transpose(x: torch.Tensor, dtype: torch.dtype) -> tuple[Fp8Operand, Fp8Operand]:
    """Tensorwise: x [rows, k] -> (the operand [rows, k], the same values as [k, rows]), cast in one pass."""
    data, transposed, inverse_scale = _cast(x, operand_amax(x, rowwise=False), dtype, True)
    return Fp8Operand(data, inverse_scale), Fp8Operand(transposed, inverse_scale)


def scaled_matmul(a: Fp8Operand, b: Fp8Operand, out_dtype: torch.dtype, *, emulate: bool,
                  use_fast_accum: bool = False) -> torch.Tensor:
    """a b^T with a [m, k], b [n, k] in fp8, accumulated in fp32, times both inverse scales. -> [m, n] out_dtype"""
    b_inverse_scale = b.inverse_scale.t() if b.inverse_scale.dim() else b.inverse_scale  # [1, n] or []
    if emulate:
        product = a.data.float() @ b.data.float().t()  # [m, n], exact fp8 products summed in fp32
        return (product * a.inverse_scale * b_inverse_scale).to(out_dtype)
    # cuBLAS wants A row-major and B column-major: b.data.t() is exactly that view of [n, k] row-major bytes.
    return torch._scaled_mm(a.data, b.data.t(), scale_a=a.inverse_scale, scale_b=b_inverse_scale,
                            out_dtype=out_dtype, use_fast_accum=use_fast_accum)


def _add_product_into(main_grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """main_grad += a @ b in one GEMM accumulating in main_grad's dtype (fp32)."""
    if main_grad.dtype == a.dtype:
        main_grad.addmm_(a, b)
    else:
        torch.addmm(main_grad, a, b, out_dtype=main_grad.dtype, out=main_grad)


def _gather_sequence(operand: Fp8Operand, local_shape: torch.Size, group) -> Fp8Operand:
    """All-gather an operand cast from a sequence shard [b, s / tp, k] along s (as bytes: every backend moves
    uint8, not every one fp8). -> the operand of [b * s, k] tokens"""
    batch, k = local_shape[0], local_shape[-1]
    data = operand.data.view(torch.uint8).view(batch, -1, k)  # [b, s / tp, k]
    data = comm.all_gather_along(data, SEQUENCE_DIM, group).reshape(-1, k).view(operand.data.dtype)  # [b * s, k]
    inverse_scale = operand.inverse_scale
    if inverse_scale.dim():  # rowwise: [b * s / tp, 1] -> [b * s, 1]
        inverse_scale = comm.all_gather_along(inverse_scale.view(batch, -1, 1), SEQUENCE_DIM, group).reshape(-1, 1)
    return Fp8Operand(data, inverse_scale)


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T with fp8 operands; backward dgrad and wgrad as the recipe defines (module docstring).

    Saved for backward, in fp8: tensorwise, x^T [in, tokens] and W^T [in, out] (the layouts wgrad and dgrad
    take, written by the forward's casts); rowwise, x [tokens, in] and W itself (dgrad casts it per column)."""

    @staticmethod
    def forward(ctx, x, weight, recipe: Fp8Recipe, main_grad_fusion: bool, sequence_parallel_group,
                allreduce_amax: bool):
        emulate = recipe.emulates_on(x.device)
        x_2d = x.reshape(-1, x.shape[-1])  # [tokens (local), in]
        out_shape = list(x.shape[:-1]) + [weight.shape[0]]
        if sequence_parallel_group is not None:
            amax_group = sequence_parallel_group if allreduce_amax else None
            x_fp8 = quantize(x_2d, recipe.forward_dtype, rowwise=recipe.rowwise, amax_group=amax_group)
            x_fp8 = _gather_sequence(x_fp8, x.shape, sequence_parallel_group)  # [tokens (all ranks), in]
            out_shape[SEQUENCE_DIM] *= comm.group_size(sequence_parallel_group)
            x_for_wgrad = x_fp8 if recipe.rowwise else x_fp8.transposed()
        elif recipe.rowwise:
            x_fp8 = x_for_wgrad = quantize(x_2d, recipe.forward_dtype, rowwise=True)
        else:
            x_fp8, x_for_wgrad = quantize_with_transpose(x_2d, recipe.forward_dtype)  # [tokens, in], [in, tokens]
        if recipe.rowwise:
            weight_fp8 = quantize(weight, recipe.forward_dtype, rowwise=True)  # [out, in]
            weight_t = (None, None)  # dgrad casts W per input column in backward
        else:
            weight_fp8, weight_t_fp8 = quantize_with_transpose(weight, recipe.forward_dtype)  # [out, in], [in, out]
            weight_t = (weight_t_fp8.data, weight_t_fp8.inverse_scale)
        y = scaled_matmul(x_fp8, weight_fp8, x.dtype, emulate=emulate, use_fast_accum=True)  # [tokens, out]
        ctx.save_for_backward(x_for_wgrad.data, x_for_wgrad.inverse_scale, *weight_t, weight)
        ctx.recipe, ctx.emulate, ctx.group, ctx.x_dtype = recipe, emulate, sequence_parallel_group, x.dtype
        ctx.main_grad_fusion, ctx.local_shape = main_grad_fusion, x.shape
        return y.view(out_shape)

    @staticmethod
    def backward(ctx, grad):
        x_data, x_inverse_scale, weight_t_data, weight_t_inverse_scale, weight = ctx.saved_tensors
        recipe, emulate = ctx.recipe, ctx.emulate
        need_grad_x, need_grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        x_for_wgrad = Fp8Operand(x_data, x_inverse_scale)
        grad_2d = grad.reshape(-1, grad.shape[-1])  # [tokens, out]
        if recipe.rowwise:
            grad_fp8 = quantize(grad_2d, recipe.gradient_dtype, rowwise=True) if need_grad_x else None
        elif need_grad_weight:
            # [tokens, out] and [out, tokens]
            grad_fp8, grad_t_fp8 = quantize_with_transpose(grad_2d, recipe.gradient_dtype)
        else:
            grad_fp8 = quantize(grad_2d, recipe.gradient_dtype, rowwise=False)

        grad_x = None
        if need_grad_x:
            if recipe.rowwise:  # W scaled per input column for this GEMM: a second cast, of W^T's rows
                weight_t_fp8 = quantize(weight.t(), recipe.forward_dtype, rowwise=True)  # [in, out]
            else:
                weight_t_fp8 = Fp8Operand(weight_t_data, weight_t_inverse_scale)  # [in, out]
            grad_x = scaled_matmul(grad_fp8, weight_t_fp8, ctx.x_dtype, emulate=emulate)  # [tokens, in]
            if ctx.group is not None:  # the sequence-parallel f's backward: sum over ranks, keep this shard
                batch = ctx.local_shape[0]
                grad_x = comm.reduce_scatter_along(grad_x.view(batch, -1, grad_x.shape[-1]), SEQUENCE_DIM, ctx.group)
            grad_x = grad_x.reshape(ctx.local_shape)

        grad_weight = None
        if need_grad_weight:
            main_grad = getattr(weight, "main_grad", None) if ctx.main_grad_fusion else None
            if recipe.rowwise:  # bf16 GEMM of dy^T and x dequantized exactly from its fp8 bytes
                x_2d = x_for_wgrad.dequantize(grad.dtype)  # [tokens, in]
                if main_grad is not None:
                    _add_product_into(main_grad, grad_2d.t(), x_2d)
                else:
                    grad_weight = (grad_2d.t() @ x_2d).to(weight.dtype)  # [out, in]
            else:
                out_dtype = main_grad.dtype if main_grad is not None else weight.dtype
                grad_weight = scaled_matmul(grad_t_fp8, x_for_wgrad, out_dtype,
                                            emulate=emulate)  # [out, tokens] x [in, tokens]^T -> [out, in]
                if main_grad is not None:
                    main_grad.add_(grad_weight)
            if main_grad is not None:
                weight.grad_added_to_main_grad = True
                grad_weight = torch.empty_like(weight)  # placeholder: only the main-grad hook sees it, and ignores it
        return grad_x, grad_weight, None, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe, *, main_grad_fusion: bool = False,
               sequence_parallel_group=None, allreduce_amax: bool = True) -> torch.Tensor:
    """x W^T with fp8 GEMMs (no bias: a layer adds its own). [.., in] -> [.., out]

    main_grad_fusion: add dL/dW into weight.main_grad (fp32) where the weight has one (module docstring).
    sequence_parallel_group: x is this rank's sequence shard [b, s / tp, in]; it is cast here and all-gathered
    along s as fp8 bytes (the output is [b, s, out]), and dL/dx is reduce-scattered back to the shard.
    allreduce_amax: agree the tensorwise input scale over that group (False only to show what goes wrong).
    """
    return _Fp8Linear.apply(x, weight, recipe, main_grad_fusion, sequence_parallel_group, allreduce_amax)
