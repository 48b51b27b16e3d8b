"""The command-line start-up shared by tools/generate.py and tools/chat_server.py: the model flags, the process
groups (under torchrun: one process per tensor rank), and the model, tokenizer and generator.

    parser = argparse.ArgumentParser(); add_model_arguments(parser); args = parser.parse_args()
    generator = start_generator(args)          # every rank; rank 0 of the tensor group speaks to the user
    ...
    stop_process_groups()
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch

from megatron_llama.data.chat_template import CHAT_TEMPLATES, DEFAULT_CHAT_TEMPLATE
from megatron_llama.data.tokenizer import TOKENIZER_TYPES
from megatron_llama.inference.generator import Generator
from megatron_llama.inference.loading import ModelSource, load_for_inference
from megatron_llama.model.compile import compile_blocks, default_on_cuda
from megatron_llama.parallel import state, world

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="our checkpoint directory (any tensor/pipeline layout it was saved at)")
    source.add_argument("--hf", help="a Hugging Face Llama folder on local disk")
    group.add_argument("--iteration", type=int, help="checkpoint iteration to load (default: the latest)")
    group.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, help="overrides the recorded tokenizer")
    group.add_argument("--tokenizer-model", help="tokenizer file or folder (with --tokenizer-type)")
    group.add_argument("--chat-template", choices=list(CHAT_TEMPLATES), default=DEFAULT_CHAT_TEMPLATE,
                       help="how conversations (\"messages\") become a prompt")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1,
                       help="tensor ranks; launch this many processes with torchrun")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    group.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                       help="weights and activations (auto: bfloat16 on CUDA, float32 on CPU)")
    group.add_argument("--max-length", type=int, help="longest prompt + completion (default: the model's context)")
    group.add_argument("--cuda-graph", action="store_true", help="replay each decode step as a CUDA graph (CUDA)")
    group.add_argument("--compile-blocks", action=argparse.BooleanOptionalAction,
                       help="fuse each block's elementwise work with torch.compile (default: on CUDA only)")


def start_process_groups(tensor_parallel_size: int, device: str) -> state.ParallelLayout:
    """The tensor group of a torchrun launch (WORLD_SIZE processes), or the single-process layout."""
    world_size = world.world_size()
    if world_size != tensor_parallel_size:
        raise ValueError(f"--tensor-model-parallel-size {tensor_parallel_size} needs exactly that many processes, "
                         f"but {world_size} were launched; use torchrun --nproc_per_node {tensor_parallel_size}")
    if world_size == 1:
        return state.current_layout()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    world.start_default_group(device, timeout=datetime.timedelta(hours=24))
    return state.initialize_model_parallel(tensor_parallel_size)


def stop_process_groups() -> None:
    """Undo start_process_groups: the tensor group, then the default group (started there whenever there is one)."""
    if world.is_distributed():
        state.destroy_model_parallel()
        world.stop_default_group(started=True)


def start_generator(args: argparse.Namespace) -> tuple[Generator, ModelSource]:
    """Process groups, then this rank's model and the tokenizer, wrapped in a Generator."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device == "cuda" else torch.float32)
    start_process_groups(args.tensor_model_parallel_size, device)
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    source = ModelSource(load=args.load, hf=args.hf, iteration=args.iteration, tokenizer_type=args.tokenizer_type,
                         tokenizer_model=args.tokenizer_model)
    model, tokenizer = load_for_inference(source, device=device, dtype=dtype)
    compile_blocks(model, enabled=default_on_cuda(args.compile_blocks, device))
    return Generator(model, tokenizer, max_length=args.max_length, use_cuda_graph=args.cuda_graph), source
