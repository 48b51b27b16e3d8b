"""Shared by the inference tests: a small SentencePiece tokenizer, a small random Llama, its checkpoint and export.

    tokenizer_path = sentencepiece_tokenizer(folder)          # BPE, 400 pieces (bytes included), <s>=1 </s>=2, no pad
    model = small_model()                                     # sharpened random weights: peaked, stable greedy
    checkpoint = write_checkpoint(folder, model, tokenizer_path, tensor_parallel_size=2)
"""
import dataclasses
import io
import sys
from pathlib import Path

import sentencepiece

from megatron_llama.checkpoint import write_model_checkpoint
from megatron_llama.config import DataConfig, ModelConfig, RunConfig
from megatron_llama.model.llama import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_model import sharpen_  # noqa: E402

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "A journey of a thousand miles begins with one step.",
             "user: hello there, how are you today?", "system: I am fine, thank you for asking!",
             "Moonlight before my bed; I wonder if it is frost on the ground.", "床前明月光，疑是地上霜。",
             "Numbers 0 1 2 3 4 5 6 7 8 9 and symbols <|im_start|> [INST] <<SYS>> :;,.!?"] * 20
CONFIG = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
                     vocab_size=400, max_position_embeddings=128, norm_epsilon=1e-6)


def sentencepiece_tokenizer(folder: Path) -> str:
    """Train (in well under a second) a BPE SentencePiece model of CONFIG.vocab_size pieces; returns its path."""
    path = folder / "tokenizer.model"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        model = io.BytesIO()
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(SENTENCES), model_writer=model, vocab_size=CONFIG.vocab_size, model_type="bpe",
            character_coverage=1.0, byte_fallback=True, hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
            num_threads=1, minloglevel=2)
        path.write_bytes(model.getvalue())
    return str(path)


def small_model(config: ModelConfig = CONFIG, seed: int = 1):
    return sharpen_(build_model(config, seed=seed), std=0.12).eval()


def write_checkpoint(folder: Path, model, tokenizer_path: str, tensor_parallel_size: int = 1,
                     pipeline_parallel_size: int = 1) -> str:
    recorded = RunConfig(data=DataConfig(tokenizer_type="SentencePieceTokenizer", tokenizer_model=tokenizer_path))
    write_model_checkpoint(str(folder), 10, model.config, model.state_dict(), recorded,
                           tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size)
    return str(folder)


def tied(config: ModelConfig = CONFIG) -> ModelConfig:
    return dataclasses.replace(config, untie_embeddings_and_output_weights=False)
