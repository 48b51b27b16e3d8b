"""The model shape every benchmark of this folder takes: Llama-2-7B layer dimensions, 8 layers by default.

    add_model_shape_arguments(parser)        # --layers --hidden --ffn --heads --vocab
    config = model_config(args, max_position_embeddings=2048)
"""
from __future__ import annotations

import argparse

from megatron_llama.config import ModelConfig


def add_model_shape_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)


def model_config(args: argparse.Namespace, max_position_embeddings: int, **overrides) -> ModelConfig:
    """The ModelConfig of the parsed shape arguments."""
    return ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                       num_attention_heads=args.heads, vocab_size=args.vocab,
                       max_position_embeddings=max_position_embeddings, **overrides)
