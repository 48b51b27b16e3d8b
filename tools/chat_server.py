"""Serve a model over an OpenAI-compatible API with a chat web page.

    python tools/chat_server.py --load checkpoints/run1 [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    python tools/chat_server.py --hf hf/run1 --chat-template chatml
    torchrun --nproc_per_node 2 tools/chat_server.py --tensor-model-parallel-size 2 --load checkpoints/run1

Open http://127.0.0.1:8000/ for the chat page, or point any OpenAI client at http://127.0.0.1:8000/v1
(/v1/completions, /v1/chat/completions with "stream", /v1/models, /health). The server binds to 127.0.0.1 (this
machine only) unless --host says otherwise; --api-key requires 'Authorization: Bearer KEY' on /v1/. Requests run
one at a time (queued). With tensor parallelism rank 0 speaks HTTP and the other ranks follow it. Ctrl-C or
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
from megatron_llama.inference.serving import ServingEngine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1/ request")
    server.add_argument("--model-name", help="the model's id in the API (default: the folder's name)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
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
                    args.model_name or source.name, args.api_key)
    engine.start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")  # returns on SIGINT / SIGTERM
    finally:
        engine.shutdown()
        stop_process_groups()


if __name__ == "__main__":
    main()
