"""megatron_llama: raw corpora to a trained, exported Llama model, Megatron-style."""

__version__ = "0.1.0"
