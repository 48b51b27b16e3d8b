"""Forward + backward of one linear layer at Llama-7B block shapes: bf16 torch.matmul against fp8_linear.

    python benchmarks/bench_fp8_gemm.py            # one GPU of compute capability 8.9+ (an H100 or H200)

Each case times y = x W^T, then dx = dy W and dW = dy^T x (6 * tokens * in * out FLOPs), with CUDA events over
20 repetitions after 3 warm-ups (median of 5 such rounds). The fp8 time includes every amax, scale, cast and
transpose, and adding dW into an fp32 main_grad (gradient-accumulation fusion); "fp8 GEMMs only" times the three
torch._scaled_mm calls on operands cast beforehand, the floor the casts sit on. The relative errors
‖fp8 − bf16‖ / ‖bf16‖ of y, dx and dW check the fp8 path against bf16; "vs emulation" compares the GPU's
_scaled_mm with parallel/fp8.py's fp32 emulation on the same fp8 bytes and scales (it checks the scale and layout
conventions on the hardware; only bf16 output rounding should differ).
"""
from __future__ import annotations

import statistics

import torch

from megatron_llama.parallel.fp8 import Fp8Recipe, fp8_linear, quantize, scaled_matmul

SHAPES = [  # (name, tokens, in, out): micro-batch 4 x seq 2048, Llama-2-7B
    ("qkv", 8192, 4096, 12288),
    ("attention out", 8192, 4096, 4096),
    ("gate+up", 8192, 4096, 22016),
    ("down", 8192, 11008, 4096),
]
RECIPES = [Fp8Recipe("hybrid", "tensorwise"), Fp8Recipe("e4m3", "rowwise"), Fp8Recipe("hybrid", "rowwise")]


def milliseconds(step, repeats: int = 20, rounds: int = 5) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(rounds):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            step()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / repeats)
    return statistics.median(times)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def bench_shape(tokens: int, in_features: int, out_features: int, recipe: Fp8Recipe) -> dict:
    device = torch.device("cuda")
    x = torch.randn(tokens, in_features, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(out_features, in_features, device=device) * 0.02).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(tokens, out_features, device=device, dtype=torch.bfloat16)
    weight.main_grad = torch.zeros(out_features, in_features, device=device)

    def bf16_step():  # plain autograd: dW in bf16 into weight.grad
        x.grad = weight.grad = None
        (x @ weight.t()).backward(grad)

    def bf16_fused_step():  # our bf16 layers' path (layers.linear_into_main_grad): dW added into fp32 main_grad
        x @ weight.t()
        grad @ weight
        torch.addmm(weight.main_grad, grad.t(), x, out_dtype=torch.float32, out=weight.main_grad)

    def fp8_step():
        x.grad = weight.grad = None
        fp8_linear(x, weight, recipe, main_grad_fusion=True).backward(grad)

    fp8_operands = [quantize(x.detach(), recipe.forward_dtype, rowwise=recipe.rowwise),
                    quantize(weight.detach(), recipe.forward_dtype, rowwise=recipe.rowwise),
                    quantize(grad, recipe.gradient_dtype, rowwise=recipe.rowwise),
                    quantize(weight.detach().t(), recipe.forward_dtype, rowwise=recipe.rowwise)]
    x_fp8, weight_fp8, grad_fp8, weight_t_fp8 = fp8_operands
    if not recipe.rowwise:
        grad_t_fp8, x_t_fp8 = grad_fp8.transposed(), x_fp8.transposed()

    def fp8_gemms_step():
        scaled_matmul(x_fp8, weight_fp8, torch.bfloat16, emulate=False, use_fast_accum=True)
        scaled_matmul(grad_fp8, weight_t_fp8, torch.bfloat16, emulate=False)
        if recipe.rowwise:
            torch.addmm(weight.main_grad, grad.t(), x.detach(), out_dtype=torch.float32, out=weight.main_grad)
        else:
            scaled_matmul(grad_t_fp8, x_t_fp8, torch.float32, emulate=False)

    flops = 6 * tokens * in_features * out_features
    with torch.no_grad():
        bf16_fused_ms = milliseconds(bf16_fused_step)
        fp8_gemms_ms = milliseconds(fp8_gemms_step)
    result = {"bf16 ms": milliseconds(bf16_step), "bf16 fused ms": bf16_fused_ms, "fp8 ms": milliseconds(fp8_step),
              "fp8 GEMMs only ms": fp8_gemms_ms}
    for key in list(result):
        result[key.replace("ms", "TFLOP/s")] = flops / result[key] / 1e9

    x.grad = weight.grad = None
    y_bf16 = x @ weight.t()
    y_bf16.backward(grad)
    reference = (y_bf16.detach(), x.grad, weight.grad.float())
    x.grad = weight.grad = None  # the fp8 backward's placeholder would otherwise be added into the reference
    weight.main_grad.zero_()
    y_fp8 = fp8_linear(x, weight, recipe, main_grad_fusion=True)
    y_fp8.backward(grad)
    result.update({"rel err y": relative_error(y_fp8, reference[0]), "rel err dx": relative_error(x.grad, reference[1]),
                   "rel err dW": relative_error(weight.main_grad, reference[2])})
    emulated = scaled_matmul(x_fp8, weight_fp8, torch.bfloat16, emulate=True)
    result["y vs emulation"] = relative_error(scaled_matmul(x_fp8, weight_fp8, torch.bfloat16, emulate=False),
                                              emulated)
    return result


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    header = ["recipe", "shape", "bf16 TFLOP/s", "bf16 fused TFLOP/s", "fp8 TFLOP/s", "fp8 GEMMs only TFLOP/s",
              "speed-up vs fused",
              "rel err y", "rel err dx", "rel err dW", "y vs emulation"]
    print(" | ".join(header))
    for recipe in RECIPES:
        torch._dynamo.reset()  # each recipe compiles its own few casts
        for name, tokens, in_features, out_features in SHAPES:
            try:
                result = bench_shape(tokens, in_features, out_features, recipe)
            except RuntimeError as error:  # e.g. a GEMM this torch / cuBLAS does not offer
                print(f"{recipe.format}-{recipe.scaling} | {name} | failed: {str(error).splitlines()[0]}")
                continue
            result["speed-up vs fused"] = result["bf16 fused ms"] / result["fp8 ms"]
            print(" | ".join([f"{recipe.format}-{recipe.scaling}", name]
                             + [f"{result[key]:.4g}" for key in header[2:]]), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
