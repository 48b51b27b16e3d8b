"""Throughput of our training step on one device: tokens/s, MFU and peak memory.

The step is exactly the trainer's (assembly.build_run, then training.train_step): bf16 model weights, fp32
main grads accumulated over the micro-batches, fp32 master params in AdamW (apex FusedAdam when it
imports, else torch's fused AdamW), global-norm clipping, on random tokens. MFU = tokens/s/GPU x
ModelConfig.flops_per_token(seq) / 989e12 (docs/performance.md). The RESULT line has the fields of
benchmarks/hf_baseline.py (the Hugging Face reference), so run both in one command on one GPU and compare. The fusions of the trainer are
on by default on CUDA: compiled elementwise regions (model/compile.py) and the fused output head + cross
entropy (parallel/fused_cross_entropy.py), gradient-accumulation fusion (parallel/layers.py);
--no-compile-blocks, --unfused-cross-entropy and --no-gradient-accumulation-fusion turn them off. Before timing,
on CUDA, a check runs one sequence through the model with each fusion alone, all, and none, and through an fp32
copy (no TF32): the fused loss's and grads' errors against fp32 may not exceed ERROR_GROWTH_TOLERANCE x the
eager bf16 model's. --fp8-format e4m3|hybrid and --fp8-recipe tensorwise|rowwise run the blocks' GEMMs in fp8
(parallel/fp8.py, as the trainer's flags do); the check then holds the fusions to that rule with the blocks in bf16
and reports the fp8 model's loss and grad errors against fp32 on their own line (fp8 rounding, not a fusion, sets
them), failing only if they are not finite. --profile adds a breakdown of one step's GPU time by kernel kind.

    python benchmarks/bench_train_step.py --layers 8 --seq 2048 --mbs 4 --accum 4      # ours
    python benchmarks/hf_baseline.py --layers 8 --seq 2048 --mbs 4 --accum 4      # Hugging Face
    python benchmarks/bench_train_step.py --layers 8 --seq 2048 --mbs 4 --accum 4 --fp8-format hybrid  # fp8

Defaults are the standard shape: 8 layers of Llama-2-7B dimensions (hidden 4096, ffn 11008, 32 heads,
vocab 32000), seq 2048, micro-batch 4, 4 micro-batches per step, bf16, sdpa attention.
CPU smoke test (fp32):
    python benchmarks/bench_train_step.py --device cpu --layers 2 --hidden 64 --ffn 176 --heads 4 \\
        --vocab 1000 --seq 32 --mbs 2 --accum 2 --steps 2 --warmup 1
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import time

import torch
from model_shape import add_model_shape_arguments, model_config

from megatron_llama.assembly import build_run
from megatron_llama.config import RunConfig, TrainingConfig
from megatron_llama.config_checks import check_fp8
from megatron_llama.metrics import model_flops_utilization, peak_memory_gib
from megatron_llama.model.compile import compile_blocks, default_on_cuda
from megatron_llama.model.llama import build_model
from megatron_llama.objectives.language_model import token_mean_loss
from megatron_llama.parallel.fp8 import FP8_FORMATS, FP8_RECIPES, Fp8Recipe
from megatron_llama.parallel.layers import set_fp8_recipe, set_gradient_accumulation_fusion
from megatron_llama.parallel.state import ParallelLayout
from megatron_llama.training import train_step


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_shape_arguments(parser)
    parser.add_argument("--query-groups", type=int, help="key/value heads (default: one per query head)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--mbs", type=int, default=4, help="micro-batch size")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="model weights (CPU: always fp32)")
    parser.add_argument("--attention-backend", choices=("sdpa", "xformers", "eager"), default="sdpa")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--compile-blocks", action=argparse.BooleanOptionalAction,
                        help="compiled elementwise regions (default: on CUDA only)")
    parser.add_argument("--unfused-cross-entropy", action="store_true",
                        help="materialise the logits, then vocab_parallel_cross_entropy (the reference path)")
    parser.add_argument("--gradient-accumulation-fusion", action=argparse.BooleanOptionalAction,
                        help="weight-gradient GEMMs accumulate into the fp32 main grads (default: on CUDA only)")
    parser.add_argument("--fp8-format", choices=FP8_FORMATS, help="the blocks' GEMMs in fp8 (default: none)")
    parser.add_argument("--fp8-recipe", choices=FP8_RECIPES, default="tensorwise", help="scaling of the fp8 GEMMs")
    parser.add_argument("--profile", action="store_true", help="GPU time of one step by kernel kind")
    return parser.parse_args(argv)


ERROR_GROWTH_TOLERANCE = 1.25  # the fused model's error against fp32 may exceed the eager model's by this factor


KERNEL_KINDS = (  # first match wins; names of cuBLAS / cuDNN / flash / inductor / torch kernels on Hopper
    ("attention", r"flash|fmha|attention|cudnn|sdpa"),
    ("matmul", r"gemm|nvjet|xmma|cutlass|splitk"),
    ("optimizer", r"adam|multi_tensor|foreach|norm_kernel|lpnorm"),
    ("compiled elementwise", r"^triton_"),
    ("communication", r"nccl"),
    ("other elementwise / copies", r""),
)


def kernel_kind(name: str) -> str:
    return next(kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name, re.IGNORECASE))


def profile_step(step) -> None:
    """One step under torch.profiler: GPU milliseconds per kernel kind and the 25 most costly kernels."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        step()
        torch.cuda.synchronize()
    by_kind, by_name = collections.Counter(), collections.Counter()
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_kind[kernel_kind(event.name)] += event.device_time_total / 1e3
            by_name[event.name[:90]] += event.device_time_total / 1e3
    total = sum(by_kind.values())
    print(f"PROFILE total GPU {total:.1f} ms per step")
    for kind, ms in by_kind.most_common():
        print(f"PROFILE {kind:28s} {ms:8.1f} ms {100 * ms / total:5.1f}%")
    for name, ms in by_name.most_common(25):
        print(f"PROFILE   {ms:8.1f} ms  {name}")


def set_fusions(model, compiled: bool, fused_cross_entropy: bool, grad_accumulation_fusion: bool) -> None:
    compile_blocks(model, enabled=compiled)
    model.fuse_cross_entropy = fused_cross_entropy
    set_gradient_accumulation_fusion(model, grad_accumulation_fusion)


def loss_and_grads(model, optimizer, batch) -> tuple[float, torch.Tensor]:
    """Mean loss of one micro-batch and the fp32 gradients of every parameter (main grads, else .grad)."""
    if optimizer is not None:
        optimizer.zero_grad()
    loss = model(*batch).float().mean()
    loss.backward()
    grads = torch.cat([(param.main_grad if optimizer is not None else param.grad).float().flatten()
                       for param in model.parameters()])
    return float(loss), grads


def check_fused_against_eager(model, optimizer, config, batch, fusions: tuple[bool, bool, bool],
                              fp8_recipe: Fp8Recipe | None) -> None:
    """Loss and grads of one micro-batch, each fusion alone, all of them, and none, against an fp32 copy of the
    model (no TF32): the fused model's error may not exceed ERROR_GROWTH_TOLERANCE x the eager model's. With
    `fp8_recipe` those run with the blocks' GEMMs in bf16; then the fp8 model with every fusion is reported on its
    own: its error against fp32 is fp8 rounding's, so it is printed beside the eager bf16 model's, not held to the
    rule (it must be finite)."""
    reference = build_model(config, seed=0, device=batch[0].device, dtype=torch.float32)
    reference.load_state_dict(model.state_dict())
    torch.backends.cuda.matmul.allow_tf32 = False
    ref_loss, ref_grads = loss_and_grads(reference, None, batch)
    torch.backends.cuda.matmul.allow_tf32 = True
    del reference
    set_fp8_recipe(model.layers, None)
    names = ("compiled blocks", "fused cross entropy", "grad-accumulation fusion")
    variants = {"eager": (False, False, False), "all fusions": fusions}
    variants.update({name: tuple(i == index for i in range(3)) for index, name in enumerate(names) if fusions[index]})
    errors = {}
    for name, switches in variants.items():
        set_fusions(model, *switches)
        loss, grads = loss_and_grads(model, optimizer, batch)
        errors[name] = (abs(loss - ref_loss) / ref_loss, float((grads - ref_grads).norm() / ref_grads.norm()))
        print(f"CHECK {name:26s} loss {loss:.6f} (fp32 {ref_loss:.6f}, relative error {errors[name][0]:.1e}); "
              f"grads relative L2 error {errors[name][1]:.2e}", flush=True)
    set_fusions(model, *fusions)
    allowed = [ERROR_GROWTH_TOLERANCE * error + 1e-6 for error in errors["eager"]]
    if not all(error <= limit for error, limit in zip(errors["all fusions"], allowed)):
        raise SystemExit(f"CHECK FAILED: fused errors {errors['all fusions']} exceed {ERROR_GROWTH_TOLERANCE} x "
                         f"the eager model's {errors['eager']}")
    print(f"CHECK passed: fused errors within {ERROR_GROWTH_TOLERANCE} x the eager bf16 model's", flush=True)
    set_fp8_recipe(model.layers, fp8_recipe)
    if fp8_recipe is None:
        return
    loss, grads = loss_and_grads(model, optimizer, batch)
    loss_error, grad_error = abs(loss - ref_loss) / ref_loss, float((grads - ref_grads).norm() / ref_grads.norm())
    loss_ratio, grad_ratio = (error / max(eager, 1e-12) for error, eager in zip((loss_error, grad_error),
                                                                                errors["eager"]))
    print(f"CHECK fp8 {fp8_recipe.format} {fp8_recipe.scaling}, all fusions: loss {loss:.6f} (fp32 {ref_loss:.6f}, "
          f"relative error {loss_error:.1e}, {loss_ratio:.1f}x the eager bf16 model's); grads relative L2 error "
          f"{grad_error:.2e} ({grad_ratio:.1f}x)", flush=True)
    if not (torch.isfinite(torch.tensor(loss)) and torch.isfinite(grads).all()):
        raise SystemExit(f"CHECK FAILED: the fp8 model's loss {loss} or grads are not finite")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" and device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        props = torch.cuda.get_device_properties(device)
        print("gpu", props.name, props.total_memory // 2**20, "MiB", "torch", torch.__version__, flush=True)
    fusions = (default_on_cuda(args.compile_blocks, device), not args.unfused_cross_entropy,
               default_on_cuda(args.gradient_accumulation_fusion, device))
    config = RunConfig(
        model=model_config(args, max_position_embeddings=args.seq, num_query_groups=args.query_groups,
                           attention_backend=args.attention_backend),
        training=TrainingConfig(micro_batch_size=args.mbs, global_batch_size=args.mbs * args.accum,
                                seq_length=args.seq, lr=1e-4, adam_beta2=0.95, weight_decay=0.1, clip_grad=1.0,
                                precision="bf16" if dtype == torch.bfloat16 else "fp32", device=device.type, seed=0,
                                compile_blocks=fusions[0], cross_entropy_loss_fusion=fusions[1],
                                gradient_accumulation_fusion=fusions[2], fp8_format=args.fp8_format,
                                fp8_recipe=args.fp8_recipe))
    check_fp8(config)  # --fp8-format: an FP8 GPU (or the CPU's emulation) and GEMM dimensions it can take
    layout = ParallelLayout.single_process()  # dp=1: the fp32 main grads, nothing communicated
    run = build_run(config, layout, device)  # the trainer's own assembly
    model, optimizer, buffers = run.model, run.optimizer, run.buffers
    model.train()
    description = run.optimizer_description
    print(description, flush=True)
    generator = torch.Generator(device=device).manual_seed(0)
    tokens_in_step = args.accum * args.mbs * args.seq
    loss_fn = token_mean_loss(tokens_in_step)

    def step() -> float:
        batches = []
        for _ in range(args.accum):
            text = torch.randint(0, args.vocab, (args.mbs, args.seq + 1), device=device, generator=generator)
            batches.append((text[:, :-1], text[:, 1:]))  # [b, s + 1] -> inputs, labels [b, s]
        loss, _ = train_step(model, optimizer, batches, lr=1e-4, buffers=buffers, loss_fn=loss_fn, layout=layout)
        return loss

    if device.type == "cuda" and (any(fusions) or args.fp8_format):
        text = torch.randint(0, args.vocab, (1, args.seq + 1), device=device, generator=generator)
        check_fused_against_eager(model.chunks[0], optimizer, config.model, (text[:, :-1], text[:, 1:]), fusions,
                                  config.training.fp8)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    step_s = (time.perf_counter() - started) / args.steps
    tokens_per_s = tokens_in_step / step_s
    flops_per_token = config.model.flops_per_token(args.seq)
    if args.profile and device.type == "cuda":
        profile_step(step)
    result = dict(impl="megatron_llama", mode=str(dtype).replace("torch.", ""), attention=args.attention_backend,
                  compile_blocks=fusions[0], fused_cross_entropy=fusions[1], grad_accumulation_fusion=fusions[2],
                  fp8=f"{args.fp8_format} {args.fp8_recipe}" if args.fp8_format else None,
                  optimizer=description.removeprefix("optimizer: "), layers=args.layers, seq=args.seq,
                  mbs=args.mbs, accum=args.accum, params=sum(param.numel() for param in model.parameters()),
                  step_s=round(step_s, 4), tokens_per_s=round(tokens_per_s),
                  mfu_989=round(model_flops_utilization(flops_per_token, tokens_per_s), 4),
                  tflops=round(tokens_per_s * flops_per_token / 1e12, 1),
                  peak_mem_gib=round(peak_memory_gib(device), 1), loss=loss, device=str(device))
    print("RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
