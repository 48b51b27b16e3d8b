"""Throughput of our training step on one device: tokens/s, MFU and peak memory.

The step is exactly the trainer's (megatron_llama.training.train_step): bf16 model weights, fp32
main grads accumulated over the micro-batches, fp32 master params in AdamW (apex FusedAdam when it
imports, else torch's fused AdamW), global-norm clipping, on random tokens. MFU = tokens/s/GPU x
ModelConfig.flops_per_token(seq) / 989e12 (DESIGN.md). The RESULT line has the fields of
shared/bench/hf_baseline.py, so run both in one command on one GPU and compare. The fusions of the trainer are
on by default on CUDA: compiled elementwise regions (model/compile.py) and the fused output head + cross
entropy (parallel/fused_cross_entropy.py); --no-compile-blocks and --unfused-cross-entropy turn them off.
Before timing, on CUDA, a check compares the fused model with the eager one on one batch (same weights):
losses and main grads must agree within bf16 rounding (LOSS_TOLERANCE, GRAD_TOLERANCE); --profile adds
a breakdown of one step's GPU time by kernel kind.

    python benchmarks/bench_train_step.py --layers 8 --seq 2048 --mbs 4 --accum 4      # ours
    python ../shared/bench/hf_baseline.py --layers 8 --seq 2048 --mbs 4 --accum 4      # Hugging Face

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

from megatron_llama.config import ModelConfig
from megatron_llama.metrics import model_flops_utilization, peak_memory_gib
from megatron_llama.model.compile import compile_blocks
from megatron_llama.model.llama import build_model
from megatron_llama.optim.mixed_precision import build_optimizer
from megatron_llama.training import train_step


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--query-groups", type=int, help="key/value heads (default: one per query head)")
    parser.add_argument("--vocab", type=int, default=32000)
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
    parser.add_argument("--profile", action="store_true", help="GPU time of one step by kernel kind")
    return parser.parse_args(argv)


LOSS_TOLERANCE = 2e-3  # |mean loss fused - eager| / eager: bf16 activations rounded at other places
GRAD_TOLERANCE = 3e-2  # ||main grads fused - eager|| / ||eager||

KERNEL_KINDS = (  # first match wins; names of cuBLAS / cuDNN / flash / inductor / torch kernels on Hopper
    ("matmul", r"gemm|nvjet|xmma|cutlass|splitk|sm90_"),
    ("attention", r"flash|fmha|attention|cudnn"),
    ("optimizer", r"adam|multi_tensor|foreach|norm_kernel|lpnorm"),
    ("compiled elementwise", r"^triton_"),
    ("communication", r"nccl"),
    ("other elementwise / copies", r""),
)


def kernel_kind(name: str) -> str:
    return next(kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name, re.IGNORECASE))


def profile_step(step) -> None:
    """One step under torch.profiler: GPU milliseconds per kernel kind and the ten most costly kernels."""
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
    for name, ms in by_name.most_common(10):
        print(f"PROFILE   {ms:8.1f} ms  {name}")


def check_fused_against_eager(model, optimizer, batch, compiled: bool, fused_cross_entropy: bool) -> None:
    """Loss and main grads of one micro-batch with the fusions on and off (same weights); raises when they differ."""
    results = []
    for fused in (True, False):
        compile_blocks(model, enabled=compiled and fused)
        model.fuse_cross_entropy = fused_cross_entropy and fused
        optimizer.zero_grad()
        loss = model(*batch).float().mean()
        loss.backward()
        grads = torch.cat([param.main_grad.flatten() for param in model.parameters()])
        results.append((float(loss), grads))
    (fused_loss, fused_grads), (eager_loss, eager_grads) = results
    loss_diff = abs(fused_loss - eager_loss) / abs(eager_loss)
    grad_diff = float((fused_grads - eager_grads).norm() / eager_grads.norm())
    print(f"CHECK fused vs eager: loss {fused_loss:.5f} vs {eager_loss:.5f} (relative {loss_diff:.1e}, tolerance "
          f"{LOSS_TOLERANCE:.0e}); main grads relative L2 {grad_diff:.1e} (tolerance {GRAD_TOLERANCE:.0e})", flush=True)
    if not (loss_diff <= LOSS_TOLERANCE and grad_diff <= GRAD_TOLERANCE):
        raise SystemExit("CHECK FAILED: the fused model does not compute the eager model's loss and gradients")
    compile_blocks(model, enabled=compiled)
    model.fuse_cross_entropy = fused_cross_entropy


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" and device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        props = torch.cuda.get_device_properties(device)
        print("gpu", props.name, props.total_memory // 2**20, "MiB", "torch", torch.__version__, flush=True)
    config = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                         num_attention_heads=args.heads, num_query_groups=args.query_groups, vocab_size=args.vocab,
                         max_position_embeddings=args.seq, attention_backend=args.attention_backend)
    model = build_model(config, seed=0, device=device, dtype=dtype)
    model.train()
    compiled = args.compile_blocks if args.compile_blocks is not None else device.type == "cuda"
    compile_blocks(model, enabled=compiled)
    model.fuse_cross_entropy = not args.unfused_cross_entropy
    optimizer, description = build_optimizer(model, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                             clip_grad=1.0)
    print(description, flush=True)
    generator = torch.Generator(device=device).manual_seed(0)
    tokens_in_step = args.accum * args.mbs * args.seq

    def step() -> float:
        batches = []
        for _ in range(args.accum):
            text = torch.randint(0, args.vocab, (args.mbs, args.seq + 1), device=device, generator=generator)
            batches.append((text[:, :-1], text[:, 1:]))  # [b, s + 1] -> inputs, labels [b, s]
        loss, _ = train_step(model, optimizer, batches, lr=1e-4, tokens_in_global_batch=tokens_in_step)
        return loss

    if device.type == "cuda" and (compiled or not args.unfused_cross_entropy):
        text = torch.randint(0, args.vocab, (args.mbs, args.seq + 1), device=device, generator=generator)
        check_fused_against_eager(model, optimizer, (text[:, :-1], text[:, 1:]), compiled,
                                  not args.unfused_cross_entropy)
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
    flops_per_token = config.flops_per_token(args.seq)
    if args.profile and device.type == "cuda":
        profile_step(step)
    result = dict(impl="megatron_llama", mode=str(dtype).replace("torch.", ""), attention=args.attention_backend,
                  compile_blocks=compiled, fused_cross_entropy=not args.unfused_cross_entropy,
                  optimizer=description.removeprefix("optimizer: "), layers=args.layers, seq=args.seq,
                  mbs=args.mbs, accum=args.accum, params=sum(param.numel() for param in model.parameters()),
                  step_s=round(step_s, 4), tokens_per_s=round(tokens_per_s),
                  mfu_989=round(model_flops_utilization(flops_per_token, tokens_per_s), 4),
                  tflops=round(tokens_per_s * flops_per_token / 1e12, 1),
                  peak_mem_gib=round(peak_memory_gib(device), 1), loss=loss, device=str(device))
    print("RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
