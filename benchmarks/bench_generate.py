"""Generation speed of our KV-cache generator (megatron_llama/inference/) on one device.

Greedy decoding of --new-tokens tokens after a --prompt-len-token prompt of random ids, for each batch size, on a
Llama with Llama-2-7B layer dimensions (hidden 4096, ffn 11008, 32 heads, vocabulary 32000) and random weights in
bf16 (fp32 on CPU). One RESULT line per batch size with the fields of benchmarks/hf_generate.py: time to first
token (prefill), decode tokens/s (all sequences), total. Run both in one command on one GPU and compare:

    python benchmarks/bench_generate.py --layers 8 --batch 1 32 [--cuda-graph]      # ours
    python benchmarks/hf_generate.py --layers 8 --batch 1 32                         # Hugging Face

At batch 1 decoding reads every weight once per token: tokens/s <= memory bandwidth / weight bytes
(docs/performance.md). CPU smoke test:
    python benchmarks/bench_generate.py --device cpu --layers 2 --hidden 64 --ffn 176 --heads 4 --vocab 1000 \\
        --prompt-len 16 --new-tokens 8 --batch 1 2
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import time

import torch
from model_shape import add_model_shape_arguments, model_config

from megatron_llama.config import ModelConfig
from megatron_llama.inference.generator import Generator
from megatron_llama.inference.kv_cache import SPAN_GRANULE
from megatron_llama.model.compile import EAGER_KERNELS, compile_blocks, default_on_cuda
from megatron_llama.model.llama import build_model


CHECK_LAYERS, CHECKED_TOKENS = 2, 32


class RandomIdsTokenizer:
    """The tokenizer interface the generator needs, for token ids that no text stands behind."""

    bos, eod, pad = None, None, 0

    def detokenize(self, ids: list[int]) -> str:
        return ""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_shape_arguments(parser)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--cuda-graph", action="store_true", help="replay each decode step as a CUDA graph")
    parser.add_argument("--compile-blocks", action=argparse.BooleanOptionalAction,
                        help="fused elementwise regions (model/compile.py; default: on CUDA only)")
    parser.add_argument("--profile", action="store_true",
                        help="also time the decode step alone (graph replays back to back) and list its kernels")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    return parser.parse_args(argv)


def timed(device: torch.device, work) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def check_graph_against_eager(config: ModelConfig, device: torch.device, prompts: list[list[int]]):
    """The CUDA-graph decoder must give the eager decoder's greedy tokens, row for row. Checked on a fp32 copy of
    the shape with CHECK_LAYERS layers: the graph attends over every cache slot through a mask, the eager step over
    the filled slots only, so bf16 sums round apart and flip near-ties of a random-weight model's flat logits; in
    fp32 a differing token means a wrong mask, slot or position. The prompts are cut so that the checked tokens
    cross from one attended span (and CUDA graph) to the next."""
    prompts = [prompt[:SPAN_GRANULE - CHECKED_TOKENS // 2] for prompt in prompts]
    small = dataclasses.replace(config, num_layers=CHECK_LAYERS)
    model = build_model(small, seed=0, device=device, dtype=torch.float32)
    eager = Generator(model, RandomIdsTokenizer()).generate(prompts, CHECKED_TOKENS)
    graphed = Generator(model, RandomIdsTokenizer(), use_cuda_graph=True).generate(prompts, CHECKED_TOKENS)
    same = sum(a.tokens == b.tokens for a, b in zip(eager, graphed))
    print(f"CHECK cuda graph vs eager (fp32, {CHECK_LAYERS} layers): {same}/{len(prompts)} rows generate the same "
          f"{CHECKED_TOKENS} greedy tokens", flush=True)
    if same < len(prompts):
        raise SystemExit("CHECK FAILED: the CUDA-graph decode step differs from the eager one")


@torch.inference_mode()
def profile_decode_step(generator: Generator, batch: int, filled: int, device: torch.device) -> None:
    """GPU time of one decode step after `filled` cached tokens (their slots hold zeros), without the host's work
    between steps (sampling, bookkeeping), and the kernels that fill it: what the generation loop adds on top is
    the gap to the measured tokens/s."""
    cache, decode = generator.cache_and_decoder(batch, generator.max_length)
    cache.begin_step(torch.ones(batch, filled, dtype=torch.bool, device=device))
    cache.begin_decode_step()
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    steps = 50
    seconds = timed(device, lambda: [decode(ids, ids) for _ in range(steps)]) / steps
    print(f"PROFILE batch {batch}, {filled} tokens cached: decode step alone {1e3 * seconds:.3f} ms "
          f"({batch / seconds:.0f} tokens/s if nothing else ran)", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        decode(ids, ids)
        torch.cuda.synchronize(device)
    kernels, launches = collections.Counter(), collections.Counter()
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name[:100]] += event.device_time_total / 1e3
            launches[event.name[:100]] += 1
    print(f"PROFILE   kernels of one step: {sum(launches.values())} launches, {sum(kernels.values()):.3f} ms GPU "
          f"time", flush=True)
    for name, ms in kernels.most_common(20):
        print(f"PROFILE   {ms:8.3f} ms  {launches[name]:4d}x  {name}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = model_config(args, max_position_embeddings=args.prompt_len + args.new_tokens)
    model = build_model(config, seed=0, device=device, dtype=dtype)
    compile_blocks(model, enabled=default_on_cuda(args.compile_blocks, device))
    generator = Generator(model, RandomIdsTokenizer(), use_cuda_graph=args.cuda_graph)
    ids = torch.Generator().manual_seed(0)
    for batch in args.batch:
        prompts = torch.randint(3, args.vocab, (batch, args.prompt_len), generator=ids).tolist()
        with torch.no_grad():
            if args.cuda_graph:
                check_graph_against_eager(config, device, prompts)
            for _ in range(2):  # warm-up: kernels, allocator, and the CUDA graph of this batch size
                generator.generate(prompts, args.new_tokens)
            first_token_s = timed(device, lambda: generator.generate(prompts, 1))
            completions = []
            total_s = timed(device, lambda: completions.extend(generator.generate(prompts, args.new_tokens)))
        if args.profile and device.type == "cuda":
            profile_decode_step(generator, batch, args.prompt_len + args.new_tokens // 2, device)
        new = min(len(completion.tokens) for completion in completions)
        print("RESULT", json.dumps(dict(
            impl="megatron_llama", cuda_graph=args.cuda_graph, dtype=str(dtype).replace("torch.", ""),
            compile_blocks=model.kernels is not EAGER_KERNELS, layers=args.layers, batch=batch,
            prompt_len=args.prompt_len, new_tokens=new,
            ttft_s=round(first_token_s, 4), total_s=round(total_s, 3),
            decode_tokens_per_s=round(batch * (new - 1) / max(total_s - first_token_s, 1e-9)))), flush=True)


if __name__ == "__main__":
    main()
