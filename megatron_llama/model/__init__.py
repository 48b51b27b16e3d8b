"""The Llama network and its attention backends."""
