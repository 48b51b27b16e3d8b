"""The Llama network, its attention backends, and one pipeline rank's chunks of it (stage_model.py)."""
