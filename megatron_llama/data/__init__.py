"""Data: indexed token files, tokenizers, GPT and blended datasets."""
