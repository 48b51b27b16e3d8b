"""Serve a model over an OpenAI-compatible API with a chat web page.

    python tools/chat_server.py --load checkpoints/run1 [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    python tools/chat_server.py --hf hf/run1 --chat-template chatml
    torchrun --nproc_per_node 2 tools/chat_server.py --tensor-model-parallel-size 2 --load checkpoints/run1

Open http://127.0.0.1:8000/ for the chat page, or point any OpenAI client at http://127.0.0.1:8000/v1
(/v1/completions, /v1/chat/completions with "stream", /v1/models, /health). The server binds to 127.0.0.1 (this
machine only) unless --host says otherwise, and then answers only requests whose Host is localhost, 127.0.0.1 or
[::1] (--allowed-hosts adds names); bound beyond loopback without --api-key it warns. --api-key requires
'Authorization: Bearer KEY' on every route but /health and the page. Bodies over --max-request-bytes get 413,
requests of more than --max-prompts-per-request prompts 400. Requests run one at a time (queued). With tensor parallelism rank 0 speaks HTTP and the other ranks follow it. Ctrl-C or
SIGTERM stops it cleanly. Needs fastapi and uvicorn (pip install fastapi uvicorn).
"""
from __future__ import annotations

import argparse
import sys

import uvicorn

from megatron_llama.checkpoint import CheckpointError
from megatron_llama.data.chat_template import get_chat_template
from megatron_llama.data.tokenizer import TokenizerError
from megatron_llama.hf_conversion import ConversionError
from megatron_llama.inference.launch import add_model_arguments, start_generator, stop_process_groups
from megatron_llama.inference.openai_api import build_app
from megatron_llama.inference.request_guards import ServerPolicy, unguarded_warning
from megatron_llama.inference.serving import ServingEngine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health and /")
    server.add_argument("--allowed-hosts", nargs="+", default=[], metavar="NAME",
                        help="Host names accepted beside localhost, 127.0.0.1 and [::1] ('*': any)")
    server.add_argument("--max-request-bytes", type=int, default=ServerPolicy.max_request_bytes,
                        help="the largest request body accepted (413 beyond)")
    server.add_argument("--max-prompts-per-request", type=int, default=ServerPolicy.max_prompts_per_request,
                        help="the most prompts one /v1/completions request may hold (400 beyond)")
    server.add_argument("--model-name", help="the model's id in the API (default: the folder's name)")
    args = parser.parse_args(argv)
    for flag in ("max_request_bytes", "max_prompts_per_request"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    return args


def server_policy(args: argparse.Namespace) -> ServerPolicy:
    return ServerPolicy(bind_host=args.host, allowed_hosts=tuple(args.allowed_hosts), api_key=args.api_key,
                        max_request_bytes=args.max_request_bytes,
                        max_prompts_per_request=args.max_prompts_per_request)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    policy = server_policy(args)
    warning = unguarded_warning(policy)
    if warning is not None:
        print(f"chat_server: {warning}", file=sys.stderr, flush=True)
    try:
        generator, source = start_generator(args)
        generator.warm_up()
    except (CheckpointError, ConversionError, TokenizerError, ValueError, OSError) as error:
        sys.exit(f"chat_server: error: {error}")
    engine = ServingEngine(generator)
    if not engine.is_leader:
        engine.follow()
        stop_process_groups()
        return
    app = build_app(engine, generator.tokenizer, get_chat_template(args.chat_template),
                    args.model_name or source.name, policy)
    engine.start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")  # returns on SIGINT / SIGTERM
    finally:
        engine.shutdown()
        stop_process_groups()


if __name__ == "__main__":
    main()
