"""Optimizer construction, mixed precision, learning-rate schedule, gradient clipping."""
