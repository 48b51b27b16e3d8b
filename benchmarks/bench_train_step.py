"""Throughput of our training step on one device: tokens/s, MFU and peak memory.

The step is exactly the trainer's (megatron_llama.training.train_step): bf16 model weights, fp32
main grads accumulated over the micro-batches, fp32 master params in AdamW (apex FusedAdam when it
imports, else torch's fused AdamW), global-norm clipping, on random tokens. MFU = tokens/s/GPU x
ModelConfig.flops_per_token(seq) / 989e12 (docs/performance.md). The RESULT line has the fields of
shared/bench/hf_baseline.py, so run both in one command on one GPU and compare:

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
import json
import time

import torch

from megatron_llama.config import ModelConfig
from megatron_llama.metrics import model_flops_utilization, peak_memory_gib
from megatron_llama.model.llama import build_model
from megatron_llama.optim.builder import build_optimizer
from megatron_llama.parallel.data_parallel import DataParallelBuffers
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
    return parser.parse_args(argv)


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
    buffers = DataParallelBuffers(model)  # dp=1: the fp32 main grads, nothing communicated
    optimizer, description = build_optimizer(model, buffers, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                             clip_grad=1.0)
    print(description, flush=True)
    generator = torch.Generator(device=device).manual_seed(0)
    tokens_in_step = args.accum * args.mbs * args.seq

    def step() -> float:
        batches = []
        for _ in range(args.accum):
            text = torch.randint(0, args.vocab, (args.mbs, args.seq + 1), device=device, generator=generator)
            batches.append((text[:, :-1], text[:, 1:]))  # [b, s + 1] -> inputs, labels [b, s]
        loss, _ = train_step(model, optimizer, batches, lr=1e-4, tokens_in_global_batch=tokens_in_step,
                             buffers=buffers)
        return loss

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
    result = dict(impl="megatron_llama", mode=str(dtype).replace("torch.", ""), attention=args.attention_backend,
                  optimizer=description.removeprefix("optimizer: "), layers=args.layers, seq=args.seq,
                  mbs=args.mbs, accum=args.accum, params=sum(param.numel() for param in model.parameters()),
                  step_s=round(step_s, 4), tokens_per_s=round(tokens_per_s),
                  mfu_989=round(model_flops_utilization(flops_per_token, tokens_per_s), 4),
                  tflops=round(tokens_per_s * flops_per_token / 1e12, 1),
                  peak_mem_gib=round(peak_memory_gib(device), 1), loss=loss, device=str(device))
    print("RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
